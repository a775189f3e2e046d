"""Validation on real-export shapes, through the CLI: a YOLO-style detector with dynamic H/W, a token-id encoder
whose first output passes an input through, a VAD with a scalar input and a state batched on axis 1, a dense map
output that collapses; data sanity, errors that keep their cause, terminal output, options that cannot do nothing."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import SAMPLES, ROOT, init, invoke, make_model, sample, vi

from onnxprune.errors import ConfigError
from onnxprune.inputs import input_specs, resolve_shapes


def copy(tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copy(os.path.join(SAMPLES, name), dst)
    return dst


def out_files(tmp_path):
    return sorted(f for f in os.listdir(tmp_path) if not f.endswith(".npz"))


# ---- 1. the headline command on any real export ----------------------------------------------------------------

def test_detector_dynamic_hw_is_pruned_and_validation_skipped_with_a_pasteable_hint(tmp_path):
    det = copy(tmp_path, "detector.onnx")
    r = invoke(det, "--sparsity", "0.95", "--method", "lamp", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and os.path.exists(doc["output"])
    v = doc["validation"]
    assert v["status"] == "skipped" and "'images'" in v["reason"]
    hint = v["reason"].split("e.g. ")[1].split(",")[0] + "," + ",".join(v["reason"].split("e.g. ")[1].split(",")[1:4])
    assert hint.startswith("--input-shape images:1,3,640,640")
    assert any("validation skipped" in w for w in doc["warnings"])
    # the hint pastes as it is
    r = invoke(det, "-s", "0.5", "--input-shape", "images:1,3,640,640", "--batches", "1", "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["validation"]["status"] == "ok"


def test_unresolved_shape_with_a_gate_is_a_usage_error_and_nothing_is_written(tmp_path):
    det = copy(tmp_path, "detector.onnx")
    before = out_files(tmp_path)
    for extra in (["--max-rel-error", "0.1"], ["-s", "auto", "--max-rel-error", "0.1"]):
        args = ["-s", "0.5"] + extra if extra[0] != "-s" else extra
        r = invoke(det, *args)
        assert r.exit_code == 2 and "--input-shape images:" in r.stderr
        assert out_files(tmp_path) == before


def test_shapes_resolved_from_metadata_and_shared_dim_params(tmp_path):
    m = onnx.load(os.path.join(SAMPLES, "detector.onnx"))
    helper.set_model_props(m, {"imgsz": "[64, 96]"})
    path = str(tmp_path / "det_meta.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--json", "-q", "--batch-size", "2", "--batches", "2")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["status"] == "ok" and v["outputs"][0]["shape"] == [2, 7, 16 * 24]
    # attention_mask shares 'sequence' with input_ids: one --input-shape resolves both
    enc = os.path.join(SAMPLES, "encoder.onnx")
    specs = resolve_shapes(onnx.load(enc), input_specs(onnx.load(enc)), 8, {"input_ids": [3, 12]})
    assert [s.shape for s in specs] == [[3, 12], [3, 12]]


# ---- 2. every output compared with a metric that fits it ---------------------------------------------------------

def test_encoder_outputs_classified_and_passthrough_never_gated(tmp_path):
    enc = copy(tmp_path, "encoder.onnx")
    r = invoke(enc, "-s", "0.9", "--input-shape", "input_ids:4,12", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    kinds = {o["name"]: (o["kind"], o["gated"]) for o in v["outputs"]}
    assert kinds == {"input_ids_out": ("integer", False), "last_hidden_state": ("dense", True),
                     "sentence_embedding": ("dense", True)}
    assert "uniform ids in [0, 100)" in v["data"] and "attention_mask: ones" in v["data"]
    assert v["metric"] == "rel_error" and v["output"] in ("last_hidden_state", "sentence_embedding")


def test_max_drop_on_a_model_without_classifier_outputs_is_refused(tmp_path):
    enc = copy(tmp_path, "encoder.onnx")
    r = invoke(enc, "-s", "0.99", "--input-shape", "input_ids:4,12", "--max-drop", "0.01")
    assert r.exit_code == 2 and "--max-drop applies to classification and per-position outputs" in r.stderr
    assert not os.path.exists(str(tmp_path / "encoder_pruned.onnx"))


def test_cosine_gate_on_embeddings_fails_at_99_percent(tmp_path):
    enc = copy(tmp_path, "encoder.onnx")
    r = invoke(enc, "-s", "0.99", "--input-shape", "input_ids:4,12", "--metric", "cosine", "--min-cosine", "0.99",
               "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["validation"]["passed"] is False and "cosine" in doc["error"]
    assert not os.path.exists(str(tmp_path / "encoder_pruned.onnx"))
    # one output chosen explicitly
    r = invoke(enc, "-s", "0.3", "--input-shape", "input_ids:4,12", "--gate-output", "sentence_embedding",
               "--max-rel-error", "10", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and [o["name"] for o in v["outputs"] if o["gated"]] == ["sentence_embedding"]
    assert invoke(enc, "-s", "0.3", "--input-shape", "input_ids:4,12", "--gate-output", "input_ids_out",
                  "--max-rel-error", "1").exit_code == 2


def test_search_uses_the_gate_metric(tmp_path):
    enc = copy(tmp_path, "encoder.onnx")
    r = invoke(enc, "-s", "auto", "--input-shape", "input_ids:4,12", "--metric", "cosine", "--min-cosine", "0.95",
               "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["validation"]["passed"]
    assert {c["metric"] for c in doc["search"]["curve"]} == {"cosine"}
    assert doc["search"]["chosen"] < 0.99 and all(c["passed"] == (c["value"] >= 0.95) for c in doc["search"]["curve"])


def test_detector_head_is_dense_not_argmax(tmp_path):
    det = copy(tmp_path, "detector.onnx")
    r = invoke(det, "-s", "0.95", "--input-shape", "images:2,3,32,32", "--synthetic", "uniform:0,1",
               "--max-rel-error", "0.05", "--json")
    doc = json.loads(r.stdout)
    out = doc["validation"]["outputs"][0]
    assert out["kind"] == "dense" and out["metric"] == "rel_error" and out["top1_agreement"] is None
    assert r.exit_code == 1 and out["rel_error"] > 0.05


def test_classifier_with_labels_keeps_accuracy_and_max_drop():
    path, data = sample("cnn")
    from onnxprune.data import load_data
    from onnxprune.metrics import Bounds
    from onnxprune.validate import Validator
    ds = load_data(data, input_specs(onnx.load(path)), 64)
    v = Validator(path, ds, "cpu", model=onnx.load(path), weight_names=["fc1.weight"],
                  bounds=Bounds(max_drop=0.0)).compare(path, latency=False)
    o = v.outputs[0]
    assert o.kind == "classification" and o.metric == "top1_accuracy" and v.passed and v.drop == 0
    assert o.top1_accuracy_dense == pytest.approx(0.986) and o.top5_accuracy_dense == 1.0


def test_sequence_scores_get_per_position_agreement_and_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Softmax", ["h"], ["probs"], axis=-1)]
    m = make_model(nodes, [vi("x", ["N", 7, 6])], [vi("probs", ["N", 7, 5])], [init("w", w)])
    path = str(tmp_path / "rec.onnx")
    onnx.save(m, path)
    x = rng.standard_normal((10, 7, 6)).astype(np.float32)
    y = np.argmax(x @ w, axis=-1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--json", "-q")
    o = json.loads(r.stdout)["validation"]["outputs"][0]
    assert r.exit_code == 0 and o["kind"] == "sequence" and o["metric"] == "top1_accuracy"
    assert o["top1_accuracy_dense"] == 1.0 and 0 <= o["top1_accuracy_pruned"] <= 1


# ---- 3. collapse is never silent --------------------------------------------------------------------------------

def test_collapsed_map_warns_every_run_and_fails_a_gate(tmp_path):
    seg = copy(tmp_path, "segmenter.onnx")
    r = invoke(seg, "-s", "0.99", "--json", "-o", tmp_path / "c.onnx")
    doc = json.loads(r.stdout)
    # a collapsed output fails the run without a gate too: nothing written unless --keep-failed
    assert r.exit_code == 1 and doc["validation"]["collapsed"] == ["map"] and not (tmp_path / "c.onnx").exists()
    assert any("collapsed" in w and "all zeros" in w for w in doc["warnings"])
    r = invoke(seg, "-s", "0.99", "--keep-failed", "-o", tmp_path / "c.onnx")
    assert r.exit_code == 1 and (tmp_path / "c.onnx").exists()
    assert "DAMAGED: output 'map' collapsed (all zeros)" in " ".join(r.stdout.split())
    # under a gate the emptied layer is seen before validation: exit 4, nothing written
    r = invoke(seg, "-s", "0.99", "--max-rel-error", "10", "-o", tmp_path / "g.onnx")
    assert r.exit_code == 4 and "off from the inputs" in r.stderr and not (tmp_path / "g.onnx").exists()


def test_constant_across_samples_is_collapse():
    from onnxprune.compare import float_stats
    from onnxprune.metrics import OutputStats
    st = OutputStats("y")
    d = [np.arange(12, dtype=np.float32).reshape(4, 3)]
    p = [np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (4, 1))]
    float_stats(st, d, p)
    assert st.collapsed == "constant across samples"


# ---- 4. realistic synthetic inputs and odd inputs ----------------------------------------------------------------

def test_vad_scalar_input_and_state_batched_on_axis_1(tmp_path):
    vad = copy(tmp_path, "vad.onnx")
    r = invoke(vad, "-s", "0.9", "--json", "-q", "--batch-size", "5", "--batches", "2")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["samples"] == 10 and "sr: 16000" in v["data"] and "state: zeros" in v["data"]
    assert {o["name"]: o["shape"] for o in v["outputs"]} == {"output": [5, 1], "stateN": [2, 5, 32]}
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "vad.npz", input=rng.standard_normal((7, 64)).astype(np.float32),
             state=rng.standard_normal((2, 7, 32)).astype(np.float32), sr=np.array(8000, np.int64))
    r = invoke(vad, "-s", "0.9", "--data", tmp_path / "vad.npz", "--batch-size", "3", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["samples"] == 7 and v["batches"] == 3


def test_bool_and_static_inputs_and_uniform_synthetic(tmp_path):
    nodes = [helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "f"], ["y"])]
    m = make_model(nodes, [vi("x", [3, 4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [3, 2])],
                   [init("w", np.ones((4, 2), np.float32))])
    path = str(tmp_path / "b.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--synthetic", "uniform:2,3", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and "flag: ones (True)" in v["data"] and "uniform(2, 3)" in v["data"]
    for bad in ("triangle", "uniform:3,2", "normal:0", "normal:nan,1"):
        assert invoke(path, "-s", "0.5", "--synthetic", bad).exit_code == 2


# ---- 5. data sanity --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["empty", "labels_range", "labels_negative", "labels_float", "labels_onehot",
                                  "shape", "rank", "count"])
def test_bad_data_is_exit_3_never_a_passing_gate(tmp_path, case):
    path, _ = sample("cnn")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 1, 8, 8)).astype(np.float32)
    y = np.arange(12) % 10
    arrays = {"empty": dict(x=x[:0], y=y[:0]), "labels_range": dict(x=x, y=y + 5),
              "labels_negative": dict(x=x, y=y - 3), "labels_float": dict(x=x, y=y.astype(np.float32)),
              "labels_onehot": dict(x=x, y=np.eye(10, dtype=np.int64)[y]), "shape": dict(x=x[:, :, :4]),
              "rank": dict(x=x[:, 0]), "count": dict(x=x, y=y[:5])}[case]
    np.savez(tmp_path / "d.npz", **arrays)
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--max-drop", "1", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()


def test_fewer_samples_than_a_fixed_batch_is_refused(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [8, 4])], [vi("y", [8, 3])], [init("w", np.ones((4, 3), np.float32))])
    path = str(tmp_path / "fixed.onnx")
    onnx.save(m, path)
    np.savez(tmp_path / "d.npz", x=np.ones((5, 4), np.float32))
    r = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--max-rel-error", "1")
    assert r.exit_code == 3 and "fewer than one batch" in r.stderr


def test_data_fifo_is_refused_not_a_hang(tmp_path):
    fifo = tmp_path / "x.npz"
    os.mkfifo(fifo)
    r = invoke(sample("cnn")[0], "-s", "0.5", "--data", fifo, "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "not a regular file" in r.stderr
    d = tmp_path / "dir"
    d.mkdir()
    os.mkfifo(d / "x.npy")
    assert invoke(sample("cnn")[0], "-s", "0.5", "--data", d, "-o", tmp_path / "o.onnx").exit_code == 3


# ---- 6. errors that keep their cause ------------------------------------------------------------------------------

def test_ir_version_error_keeps_its_cause_and_hints_no_validate(tmp_path):
    m = onnx.load(sample("mlp_gemm")[0])
    m.ir_version = 14
    path = str(tmp_path / "ir14.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "max supported IR version" in r.stderr and "--no-validate" in r.stderr
    assert invoke(path, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx").exit_code == 0


def test_model_that_loads_but_cannot_run_is_exit_3(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["M", 5])],
                   [init("w", np.ones((4, 3), np.float32)), init("shape", np.array([-1, 5], np.int64))])
    path = str(tmp_path / "bad_reshape.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--batch-size", "3", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "cannot run" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_broken_onnxruntime_install_is_explained_exit_4(monkeypatch, tmp_path):
    import onnxprune.validate as val
    monkeypatch.setattr(val, "_installed", lambda metadata, dist: True)
    r = invoke(sample("cnn")[0], "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 4 and "pip uninstall -y onnxruntime onnxruntime-gpu" in r.stderr


# ---- 7. a terminal that reads at 80 columns -----------------------------------------------------------------------

def deep_mlp(n_layers=30, width=4, long=False):
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(n_layers):
        name = (f"model.encoder.layers.{i}.block.feed_forward.intermediate_dense.weight" if long else f"w{i}")
        inits.append(init(name, rng.standard_normal((width, width)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [cur, name], [f"h{i}"], name=f"mm{i}"))
        cur = f"h{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return make_model(nodes, [vi("x", ["N", width])], [vi("y", ["N", width])], inits)


def test_compact_table_above_25_layers_and_full_and_none(tmp_path):
    path = str(tmp_path / "deep.onnx")
    onnx.save(deep_mlp(30, long=True), path)
    r = invoke(path, "-s", "0.5", "--no-validate")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and max(len(x) for x in lines) <= 80
    assert "smaller layers" in r.stdout and "--table full" in r.stdout and "…" in r.stdout
    full = invoke(path, "-s", "0.5", "--no-validate", "--table", "full")
    assert full.stdout.count("MatMul") == 30
    none = invoke(path, "-s", "0.5", "--no-validate", "--table", "none")
    assert "intermediate" not in none.stdout and "% direct" in none.stdout and "→" in none.stdout


def test_json_prints_nothing_but_the_document(cnn):
    r = invoke(cnn, "-s", "0.5", "--json", "--batches", "1")
    json.loads(r.stdout)  # the whole of stdout is one document
    assert r.exit_code == 0


def test_non_utf8_stdout_falls_back_to_ascii(tmp_path):
    env = dict(os.environ, PYTHONIOENCODING="cp1252")
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", sample("cnn")[0], "-s", "0.5", "--batches", "1",
                        "-o", str(tmp_path / "o.onnx")], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr.decode("cp1252", "replace")
    assert b"->" in r.stdout and b"Traceback" not in r.stderr


# ---- 8. options that cannot silently do nothing --------------------------------------------------------------------

def test_exclude_matching_nothing_is_a_usage_error_listing_layers(cnn, tmp_path):
    r = invoke(cnn, "-s", "0.5", "--exclude", "conv_1", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 2 and "conv1.weight" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_api_exclude_accepts_one_string():
    from onnxprune import prune
    _, report = prune(sample("cnn")[0], 0.5, exclude="conv1.weight")
    assert [l.name for l in report.layers if l.excluded] == ["conv1.weight"]
    with pytest.raises(ConfigError):
        prune(sample("cnn")[0], 0.5, exclude="nope*")


def test_unwritable_report_is_exit_5(cnn, tmp_path):
    r = invoke(cnn, "-s", "0.5", "--report", tmp_path / "missing" / "r.json", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 5
