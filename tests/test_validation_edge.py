"""Edge cases a review on real-style exports found: comparisons that could not mean what they said, batch axes in
unusual places, outputs whose shape moves with pruning, and the 80-column tables."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import init, invoke, make_model, vi


def save(tmp_path, model, name="m.onnx"):
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def mm_model(tmp_path, tail=(), out="y", out_shape=("N", 4), inputs=None, extra_inits=(), pre=(), name="m.onnx",
             width=8, units=4):
    rng = np.random.default_rng(0)
    nodes = list(pre) + [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")] + list(tail)
    if not tail:
        nodes.append(helper.make_node("Identity", ["h"], [out]))
    m = make_model(nodes, inputs or [vi("x", ["N", width])], [vi(out, list(out_shape))],
                   [init("w", rng.standard_normal((width, units)).astype(np.float32))] + list(extra_inits))
    return save(tmp_path, m, name)


def test_dense_nan_output_never_passes_a_gate(tmp_path):
    path = mm_model(tmp_path, tail=[helper.make_node("Sqrt", ["h"], ["y"])])  # negative -> NaN in the dense model
    r = invoke(path, "-s", "0.5", "--max-rel-error", "10", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "non-finite" in r.stderr and not (tmp_path / "o.onnx").exists()
    r = invoke(path, "-s", "0.5", "--json", "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and any("non-finite" in w for w in doc["warnings"])
    assert doc["validation"]["outputs"][0]["unreliable"]


def test_output_whose_length_moves_with_pruning_is_never_exit_70(tmp_path):
    tail = [helper.make_node("ReduceSum", ["h", "ax1"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["keep"]),
            helper.make_node("Compress", ["h", "keep"], ["dets"], axis=0)]
    path = mm_model(tmp_path, tail=tail, out="dets", out_shape=("K", 4),
                    extra_inits=[init("zero", np.array(0.0, np.float32)), init("ax1", np.array([1], np.int64))])
    for extra in ([], ["--max-rel-error", "10"], ["--gate-output", "dets", "--max-rel-error", "10"]):
        r = invoke(path, "-s", "0.6", "--json", "-o", tmp_path / "o.onnx", *extra)
        doc = json.loads(r.stdout)
        assert r.exit_code in (0, 1), doc["error"]
        assert doc["validation"]["outputs"][0]["kind"] == "dense"


def test_inputs_named_apart_by_the_exporter_share_the_batch(tmp_path):
    """torch's legacy exporter names every input's axes apart: both leading dims are the batch."""
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mf"], ["xm"]),
             helper.make_node("MatMul", ["xm", "w"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", ["x_dynamic_axes_1", 8]), vi("mask", ["mask_dynamic_axes_1", 8], TensorProto.INT64)],
                   [vi("y", ["x_dynamic_axes_1", 4])], [init("w", np.ones((8, 4), np.float32))])
    path = save(tmp_path, m)
    np.savez(tmp_path / "d.npz", x=np.ones((40, 8), np.float32), mask=np.ones((40, 8), np.int64))
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["samples"] == 40 and v["batches"] == 2


@pytest.mark.parametrize("layout", ["scalar_first", "state_first", "time_major"])
def test_batch_axis_found_by_name_not_position(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "scalar_first":
        inputs = [vi("sr", [], TensorProto.INT64), vi("x", ["batch", 8])]
        pre = [helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT)]
        nodes = pre + [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                       helper.make_node("Mul", ["h", "srf"], ["y"])]
        out = vi("y", ["batch", 4])
        data = dict(sr=np.array(16000, np.int64), x=rng.standard_normal((10, 8)).astype(np.float32))
    elif layout == "state_first":
        inputs = [vi("state", [2, "batch", 8]), vi("x", ["batch", 8])]
        nodes = [helper.make_node("ReduceSum", ["state", "ax0"], ["s"], keepdims=0),
                 helper.make_node("Add", ["x", "s"], ["xs"]),
                 helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")]
        out = vi("y", ["batch", 4])
        data = dict(state=np.zeros((2, 10, 8), np.float32), x=rng.standard_normal((10, 8)).astype(np.float32))
    else:
        inputs = [vi("x", ["time", "batch", 8])]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                 helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0, 2]),
                 helper.make_node("LogSoftmax", ["ht"], ["y"], axis=-1)]
        out = vi("y", ["batch", "time", 4])
        data = dict(x=rng.standard_normal((5, 10, 8)).astype(np.float32), y=np.zeros((10, 5), np.int64))
    m = make_model(nodes, inputs, [out], [init("w", rng.standard_normal((8, 4)).astype(np.float32))]
                   + ([init("ax0", np.array([0], np.int64))] if layout == "state_first" else []))
    path = save(tmp_path, m)
    r = invoke(path, "-s", "0.5", "--json", "-q", "--batch-size", "3", "--input-shape", "x:7,3,8"
               if layout == "time_major" else "x:3,8")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["samples"] == 12 and v["batch_size"] == 3, v
    np.savez(tmp_path / "d.npz", **data)
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--batch-size", "4", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["samples"] == 10 and v["batches"] == 3, v


def test_one_class_dense_predictions_make_agreement_meaningless(tmp_path):
    rng = np.random.default_rng(0)
    bias = np.zeros(12, np.float32)
    bias[3] = 100.0  # class 3 wins for every input
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc")]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("logits", ["N", 12])],
                   [init("w", rng.standard_normal((8, 12)).astype(np.float32)), init("b", bias)])
    path = save(tmp_path, m)
    r = invoke(path, "-s", "auto", "--max-drop", "0.01", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "predicts class 3" in r.stderr and not (tmp_path / "o.onnx").exists()
    r = invoke(path, "-s", "0.5", "--json", "-q", "-o", tmp_path / "o.onnx")
    assert any("predicts class 3" in w for w in json.loads(r.stdout)["warnings"])
    r = invoke(path, "-s", "0.5", "--metric", "rel-error", "--max-rel-error", "10", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0


def test_one_value_per_sample_is_compared_as_a_whole_not_by_sign(tmp_path):
    from onnxprune.compare import float_stats
    from onnxprune.metrics import OutputStats
    st = OutputStats("p")
    d = [np.array([[0.9], [0.1], [0.5], [0.7]], np.float32)]
    p = [np.array([[0.1], [0.9], [0.5], [0.2]], np.float32)]
    float_stats(st, d, p, [4])
    assert st.cosine < 0.8 and st.pearson < 0


def test_regressor_and_projection_heads_are_dense(tmp_path):
    path = mm_model(tmp_path, out="linear_1", out_shape=("N", 2), units=2)
    r = invoke(path, "-s", "0.5", "--json", "-q")
    assert json.loads(r.stdout)["validation"]["outputs"][0]["kind"] == "dense"
    assert invoke(path, "-s", "0.5", "--max-drop", "0.1").exit_code == 2


def test_float_attention_mask_is_ones_and_padding_mask_zeros(tmp_path):
    from onnxprune.inputs import input_specs, plan_fill
    m = make_model([helper.make_node("Identity", ["x"], ["y"])],
                   [vi("x", ["N", 4]), vi("attention_mask", ["N", 4]), vi("key_padding_mask", ["N", 4], TensorProto.BOOL)],
                   [vi("y", ["N", 4])])
    specs = input_specs(m)
    plan_fill(m, specs, ("normal", 0.0, 1.0))
    assert [s.fill.split(" ")[0] for s in specs] == ["normal(0,", "ones", "zeros"]


def test_search_where_nothing_passes_exits_1_and_writes_nothing(tmp_path):
    path = mm_model(tmp_path, width=64, units=32, out_shape=("N", 32))
    r = invoke(path, "-s", "auto", "--metric", "rel-error", "--max-rel-error", "0.000001", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 1 and "no sparsity on the grid" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_labels_score_the_gated_head(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="h1"),
             helper.make_node("Softmax", ["a"], ["class_probs"], axis=-1),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="h2"),
             helper.make_node("Softmax", ["b"], ["gender_probs"], axis=-1)]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("class_probs", ["N", 10]), vi("gender_probs", ["N", 2])],
                   [init("w1", rng.standard_normal((8, 10)).astype(np.float32)),
                    init("w2", rng.standard_normal((8, 2)).astype(np.float32))])
    path = save(tmp_path, m)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 8)).astype(np.float32), y=np.arange(20) % 10)
    r = invoke(path, "-s", "0.3", "--data", tmp_path / "d.npz", "--gate-output", "class_probs", "--max-drop", "1",
               "--json", "-q")
    outs = {o["name"]: o for o in json.loads(r.stdout)["validation"]["outputs"]}
    assert r.exit_code == 0 and outs["class_probs"]["labels"] and not outs["gender_probs"]["labels"]


def test_metadata_batch_never_overrides_batch_size(tmp_path):
    path = mm_model(tmp_path, inputs=[vi("x", ["batch", 8])], out_shape=("batch", 4))
    m = onnx.load(path)
    helper.set_model_props(m, {"batch": "1"})
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--batch-size", "16", "--batches", "2", "--json", "-q")
    assert json.loads(r.stdout)["validation"]["samples"] == 32


def test_unused_data_arrays_are_named(tmp_path):
    path = mm_model(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.ones((6, 8), np.float32), label=np.zeros(6, np.int64))
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--json", "-q")
    assert any("['label']" in w and "not used" in w for w in json.loads(r.stdout)["warnings"])


def test_validation_table_fits_80_columns_and_names_stay_distinct(tmp_path):
    from rich.console import Console
    from onnxprune.table import short_names
    names = [f"model.encoder.layers.{i}.mlp.fc1.weight.with.a.long.tail" for i in range(12)]
    shown = short_names(names)
    assert len(set(shown.values())) == 12 and all(len(v) <= 26 for v in shown.values())
    path = mm_model(tmp_path, tail=[helper.make_node("Softmax", ["h"], ["output_probabilities_of_all_classes"])],
                    out="output_probabilities_of_all_classes", units=4)
    r = invoke(path, "-s", "0.9", "--max-drop", "0.5", "--keep-failed", "-o", tmp_path / "o.onnx")
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    row = next(line for line in r.stdout.splitlines() if " class " in line)
    assert ("pass" in row or "FAIL" in row) and "1.0000" in row
    assert Console().width >= 80 or True
