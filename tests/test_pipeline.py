import hashlib
import os
import re

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import METHODS, prune
from onnxprune.errors import InputError, RequestError
from onnxprune.io import LoadedModel, load_model, save_model

from conftest import SAMPLE_MODELS, init, make_model, run, sample, two_layer_mlp, vi, weights

PRUNABLE = {"mlp_gemm": ["fc1.weight", "fc2.weight", "fc3.weight"],
            "mlp_matmul": ["dense1/kernel", "dense2/kernel", "dense3/kernel"],
            "cnn": ["conv1.weight", "dw.weight", "pw.weight", "branch.weight", "fc1.weight", "fc2.weight"],
            "cnn_torch": ["conv1.weight", "dw.weight", "pw.weight", "fc1.weight", "fc2.weight"]}


def zero_count(model, names):
    w = weights(model)
    return sum(int(w[n].size - np.count_nonzero(w[n])) for n in names)


def strip(model, names):
    """The model with the named tensors' data removed: what must stay byte-identical."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in names:
            t.ClearField("raw_data")
            del t.float_data[:]
    return m.SerializeToString(deterministic=True)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(SAMPLE_MODELS))
def test_every_method_on_every_sample(name, method, tmp_path):
    path, data = sample(name)
    model, report = prune(path, sparsity=0.8, method=method, min_keep="1%", effective=False)
    names = PRUNABLE[name]
    n = sum(weights(model)[k].size for k in names)
    assert zero_count(model, names) == round(0.8 * n) == report.totals()["zeros_after"]
    # detached-unit removal (the default) only adds zeros that cannot change the outputs
    removed, rep2 = prune(path, sparsity=0.8, method=method, min_keep="1%")
    assert zero_count(removed, names) == rep2.totals()["zeros_after"] >= round(0.8 * n)
    assert rep2.totals()["effective_zeros"] == report.totals()["effective_zeros"] >= round(0.8 * n)
    x = np.load(data)["x"][:64]
    np.testing.assert_allclose(run(removed, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert [l.name for l in report.layers] == names
    assert all(l.zeros_after < l.params for l in report.layers)
    # only the weights changed; the rest is byte-identical
    assert strip(model, names) == strip(onnx.load(path), names)
    biases = [t.name for t in onnx.load(path).graph.initializer if "bias" in t.name]  # removal may edit these
    assert strip(removed, names + biases) == strip(onnx.load(path), names + biases)
    assert rep2.connectivity["unknown_ops"] == [] and rep2.connectivity["layers_not_analysed"] == []
    out = str(tmp_path / "out.onnx")
    save_model(LoadedModel(model=model), out)
    onnx.checker.check_model(out, full_check=True)
    x = np.load(data)["x"]
    logits = run(out, {"x": x})[0]
    assert logits.shape == (len(x), 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_gemm_and_matmul_layouts_give_the_same_masks(method):
    g, _ = prune(sample("mlp_gemm")[0], sparsity=0.9, method=method, min_keep="1%", effective=False)
    m, _ = prune(sample("mlp_matmul")[0], sparsity=0.9, method=method, min_keep="1%", effective=False)
    wg, wm = weights(g), weights(m)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(wg[f"fc{i}.weight"] == 0, (wm[f"dense{i}/kernel"] == 0).T)


def test_lamp_keeps_a_small_layer_alive_where_global_collapses_it():
    a = np.array([[0.3, -1.0], [2.0, 0.5]], np.float32)
    b = np.array([[0.1], [0.25]], np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
                   [vi("x", [1, 2])], [vi("y", None)], [init("a", a), init("b", b)])
    lamp, _ = prune(m, sparsity=0.5, method="lamp", effective=False)
    glob, _ = prune(m, sparsity=0.5, method="global", effective=False)
    assert weights(lamp)["a"].tolist() == [[0, -1.0], [2.0, 0]] and weights(lamp)["b"].tolist() == [[0], [0.25]]
    assert weights(glob)["a"].tolist() == [[0, -1.0], [2.0, 0.5]] and not weights(glob)["b"].any()


def test_input_model_proto_is_not_modified():
    m = two_layer_mlp()
    before = m.SerializeToString()
    prune(m, sparsity=0.9)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_low_and_high_precision_weights_keep_their_dtype(dtype):
    m = two_layer_mlp(dtype=dtype)  # inputs, weights and outputs of one dtype: a model ONNX Runtime accepts
    out, report = prune(m, sparsity=0.75, effective=False)
    for t in out.graph.initializer:
        assert numpy_helper.to_array(t).dtype == np.dtype(dtype)
    assert report.totals()["zeros_after"] == round(0.75 * 192)
    if dtype == np.float16:
        assert run(out, {"x": np.ones((2, 8), np.float16)})[0].dtype == np.float16


def test_fp16_stored_in_int32_data_is_written_back_in_place():
    m = two_layer_mlp(dtype=np.float16)
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.FLOAT16, arr.shape, arr.view(np.uint16).ravel().tolist()))
    out, _ = prune(m, sparsity=0.5, effective=False)
    t = out.graph.initializer[0]
    assert not t.HasField("raw_data") and len(t.int32_data) == 128
    assert (numpy_helper.to_array(t) == 0).sum() >= 1


def test_constant_node_weights_like_paddle():
    src = onnx.load(sample("mlp_gemm")[0])
    keep = [t for t in src.graph.initializer if not t.name.endswith(".weight")]
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
              for t in src.graph.initializer if t.name.endswith(".weight")]
    del src.graph.initializer[:]
    src.graph.initializer.extend(keep)
    nodes = consts + list(src.graph.node)
    del src.graph.node[:]
    src.graph.node.extend(nodes)
    out, report = prune(src, sparsity=0.9, effective=False)
    assert {l.kind for l in report.layers} == {"constant"}
    assert report.totals()["zeros_after"] == round(0.9 * 6464)
    x = np.load(sample("mlp_gemm")[1])["x"]
    assert run(out, {"x": x})[0].shape == (500, 10)


def test_tied_weight_counted_once_same_mask():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 4])], [vi("y", None)], [init("w", w)])
    out, report = prune(m, sparsity=0.5, effective=False)
    assert len(report.layers) == 1 and report.layers[0].params == 16 and report.layers[0].zeros_after == 8


def test_nan_weight_refused_naming_tensor():
    m = two_layer_mlp()
    w = numpy_helper.to_array(m.graph.initializer[1]).copy()
    w[0, 0] = np.nan
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w2"))
    with pytest.raises(InputError, match="w2"):
        prune(m, sparsity=0.5, effective=False)


def test_existing_zeros_stay_and_count_and_already_sparser():
    m = two_layer_mlp()
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[:, :12] = 0  # 96 of 128 zero
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    out, report = prune(m, sparsity=0.75, effective=False)
    assert report.totals()["zeros_after"] == 144
    assert (weights(out)["w1"][w == 0] == 0).all()
    out, report = prune(m, sparsity=0.3, effective=False)
    assert report.already_sparser and report.totals()["zeros_after"] == 96
    assert out.SerializeToString() == m.SerializeToString()


def test_nothing_prunable_and_quantized_refused():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    with pytest.raises(RequestError, match="nothing to prune"):
        prune(m, sparsity=0.5, effective=False)
    out, _ = prune(m, sparsity=0.0)
    assert out.SerializeToString() == m.SerializeToString()
    q = make_model([helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [vi("x", [2, 4])], [vi("y", None)], [init("q", np.ones((4, 4), np.int8)), init("s", np.float32(0.1))])
    with pytest.raises(RequestError, match="quantized"):
        prune(q, sparsity=0.5)


def test_all_excluded_is_a_request_error():
    with pytest.raises(RequestError, match="excluded"):
        prune(two_layer_mlp(), sparsity=0.5, exclude=("w*",))


def test_exclude_leaves_layer_dense_and_target_applies_to_the_rest():
    out, report = prune(sample("cnn")[0], sparsity=0.5, exclude=("fc1*",), effective=False)
    fc1 = next(l for l in report.layers if l.name == "fc1.weight")
    assert fc1.excluded and fc1.zeros_after == 0
    rest = sum(l.params for l in report.layers if not l.excluded)
    assert report.totals()["zeros_after"] == round(0.5 * rest)


def test_weights_in_if_branches_are_pruned():
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["t"])], "then", [], [vi("t", [1, 4])],
                               [init("wt", np.arange(1, 17, dtype=np.float32).reshape(4, 4))])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "we"], ["e"])], "else", [], [vi("e", [1, 4])],
                               [init("we", -np.arange(1, 17, dtype=np.float32).reshape(4, 4))])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])])
    out, report = prune(m, sparsity=0.5, method="global", effective=False)
    assert report.totals()["zeros_after"] == 16
    wt = numpy_helper.to_array(out.graph.node[0].attribute[0].g.initializer[0])
    assert (wt == 0).sum() + (numpy_helper.to_array(out.graph.node[0].attribute[1].g.initializer[0]) == 0).sum() == 16
    onnx.checker.check_model(out, full_check=True)
    run(out, {"x": np.ones((1, 4), np.float32), "c": np.array(True)})


def test_sparsity_zero_leaves_outputs_and_bytes_identical(tmp_path):
    path, data = sample("cnn")
    out = str(tmp_path / "same.onnx")
    loaded = load_model(path)
    onnxprune.prune_loaded(loaded, onnxprune.PruneConfig(sparsity=0.0))
    save_model(loaded, out)
    x = np.load(data)["x"]
    assert np.array_equal(run(path, {"x": x})[0], run(out, {"x": x})[0])
    assert onnx.load(out).SerializeToString() == onnx.load(path).SerializeToString()


def test_deterministic_output_bytes(tmp_path):
    path = sample("cnn")[0]
    digests = []
    for k in range(2):
        loaded = load_model(path)
        onnxprune.prune_loaded(loaded, onnxprune.PruneConfig(sparsity=0.97, method="random", seed=3))
        out = str(tmp_path / f"o{k}.onnx")
        written = save_model(loaded, out)
        digests.append(hashlib.sha256(open(out, "rb").read()).hexdigest())
        assert written[os.path.abspath(out)] == digests[-1]
    assert digests[0] == digests[1]


def test_external_data_stays_external_next_to_output(tmp_path):
    src = onnx.load(sample("mlp_gemm")[0])
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir(), outdir.mkdir()
    inp = str(indir / "m.onnx")
    onnx.save(src, inp, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data_before = open(indir / "m.onnx.data", "rb").read()
    loaded = load_model(inp)
    onnxprune.prune_loaded(loaded, onnxprune.PruneConfig(sparsity=0.9))
    out = str(outdir / "p.onnx")
    save_model(loaded, out)
    assert open(indir / "m.onnx.data", "rb").read() == data_before
    assert [f for f in os.listdir(outdir) if re.fullmatch(r"p\.onnx\.[0-9a-f]{16}\.data", f)] \
        and not [f for f in os.listdir(outdir) if f.startswith(".onnxprune")]
    raw = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    onnx.checker.check_model(out, full_check=True)
    x = np.load(sample("mlp_gemm")[1])["x"]
    assert run(out, {"x": x})[0].shape == (500, 10)
    # the in-memory model still has its data after saving
    assert all(t.HasField("raw_data") for t in loaded.model.graph.initializer)


def test_transposed_weights_prune_and_analyse_like_gemm():
    """The Gemm sample rewritten as MatMul(x, Transpose(W)) + Add: same masks, same effective sparsity."""
    src = onnx.load(sample("mlp_gemm")[0])
    nodes = []
    for n in src.graph.node:
        if n.op_type == "Gemm":
            w, b = n.input[1], n.input[2]
            nodes += [helper.make_node("Transpose", [w], [w + "_t"], perm=[1, 0]),
                      helper.make_node("MatMul", [n.input[0], w + "_t"], [n.output[0] + "_mm"]),
                      helper.make_node("Add", [n.output[0] + "_mm", b], list(n.output))]
        else:
            nodes.append(n)
    del src.graph.node[:]
    src.graph.node.extend(nodes)
    for method in ("lamp", "random", "lap"):
        g, rg = prune(sample("mlp_gemm")[0], sparsity=0.97, method=method, effective=False)
        t, rt = prune(src, sparsity=0.97, method=method, effective=False)
        for i in (1, 2, 3):
            np.testing.assert_array_equal(weights(g)[f"fc{i}.weight"] == 0, weights(t)[f"fc{i}.weight"] == 0)
        assert rt.connectivity["unknown_ops"] == [] and rt.totals()["effective_zeros"] == rg.totals()["effective_zeros"]
    x = np.load(sample("mlp_gemm")[1])["x"][:16]
    removed, _ = prune(src, sparsity=0.97, method="random")
    plain, _ = prune(src, sparsity=0.97, method="random", effective=False)
    np.testing.assert_allclose(run(removed, {"x": x})[0], run(plain, {"x": x})[0], rtol=1e-5, atol=1e-5)
