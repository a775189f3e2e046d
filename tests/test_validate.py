import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxprune.data import input_specs, load_data, parse_input_shapes, synthesize
from onnxprune.errors import ConfigError, InputError, RequestError
from onnxprune.metrics import Bounds
from onnxprune.validate import Validator, make_session

from conftest import invoke, init, make_model, sample, two_layer_mlp, vi

HAS_CUDA = False
try:
    HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers() and \
        "CUDAExecutionProvider" in make_session(sample("mlp_gemm")[0], "cuda").get_providers()
except Exception:
    HAS_CUDA = False




def test_validation_on_by_default_with_labels(cnn):
    r = invoke(cnn, "-s", "0.5", "--data", sample("cnn")[1], "--json", "-q")
    assert r.exit_code == 0
    v = json.loads(r.stdout)["validation"]
    assert v["metric"] == "top1_accuracy" and v["samples"] == 500
    assert v["dense"] == pytest.approx(0.986) and abs(v["drop"]) < 0.02
    assert v["providers"] == ["CPUExecutionProvider"]  # what the session really ran, on this machine
    assert v["top5_dense"] is not None and v["latency_ms_dense"] > 0


def test_synthetic_inputs_without_labels_measure_agreement(cnn):
    r = invoke(cnn, "-s", "0.5", "--json", "-q", "--batch-size", "8", "--batches", "3")
    v = json.loads(r.stdout)["validation"]
    assert v["metric"] == "top1_agreement" and v["samples"] == 24 and v["dense"] == 1.0
    assert 0 <= v["pruned"] <= 1 and v["outputs"][0]["cosine"] > 0.5


def test_gate_fails_exit_1_and_writes_nothing(cnn, tmp_path):
    out = tmp_path / "out.onnx"
    r = invoke(cnn, "-s", "0.97", "--data", sample("cnn")[1], "--max-drop", "0.01", "-o", out, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["status"] == "failed" and doc["validation"]["passed"] is False and "gate" in doc["error"]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]


def test_keep_failed_writes_with_warning_and_still_exit_1(cnn, tmp_path):
    out = tmp_path / "out.onnx"
    r = invoke(cnn, "-s", "0.97", "--data", sample("cnn")[1], "--max-drop", "0.01", "-o", out, "--keep-failed")
    assert r.exit_code == 1 and out.exists() and "keep-failed" in r.stderr


def test_gate_passes_exit_0(cnn, tmp_path):
    r = invoke(cnn, "-s", "0.3", "--data", sample("cnn")[1], "--max-drop", "0.02", "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0 and (tmp_path / "o.onnx").exists()


def test_search_finds_highest_sparsity_within_budget(cnn, tmp_path):
    rep = tmp_path / "r.json"
    r = invoke(cnn, "-s", "auto", "--data", sample("cnn")[1], "--max-drop", "0.01", "-o", tmp_path / "o.onnx",
               "--report", rep, "-q")
    assert r.exit_code == 0
    doc = json.load(open(rep))
    chosen = doc["search"]["chosen"]
    curve = {round(c["sparsity"], 3): c for c in doc["search"]["curve"]}
    assert 0.3 < chosen < 0.995 and round(chosen * 200) == chosen * 200  # on the 0.5 % grid
    assert curve[round(chosen, 3)]["passed"]
    assert not curve[round(chosen + 0.005, 3)]["passed"]  # the next grid point was tried and failed
    assert doc["validation"]["drop"] <= 0.01 and doc["target_sparsity"] == chosen
    assert doc["totals"]["zeros_after"] >= round(chosen * 14304)
    assert sum(l["zeros_after_selection"] for l in doc["layers"]) == round(chosen * 14304)


def test_search_needs_max_drop_and_plot_needs_search(cnn):
    assert invoke(cnn, "-s", "auto").exit_code == 2
    assert invoke(cnn, "-s", "0.5", "--plot", "x.png").exit_code == 2
    assert invoke(cnn, "-s", "0.5", "--max-drop", "0.1", "--no-validate").exit_code == 2


def test_sensitivity_sorted_most_sensitive_first(cnn, tmp_path):
    r = invoke(cnn, "-s", "0.8", "--data", sample("cnn")[1], "--sensitivity", "--json", "-q", "-o", tmp_path / "o.onnx")
    rows = json.loads(r.stdout)["sensitivity"]
    assert len(rows) == 6 and [x["drop"] for x in rows] == sorted((x["drop"] for x in rows), reverse=True)


def test_dynamic_dims_need_input_shape(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", ["N", 2, "H", "W"])], [vi("y", None)],
                   [init("w", np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32))])
    path = str(tmp_path / "dyn.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--json")  # pruned and written; validation skipped with the reason
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["validation"]["status"] == "skipped" and os.path.exists(doc["output"])
    assert "--input-shape x:1,2,640,640" in doc["validation"]["reason"]
    r = invoke(path, "-s", "0.5", "--max-rel-error", "0.5", "-o", tmp_path / "gated.onnx")  # a gate needs it
    assert r.exit_code == 2 and "--input-shape x:" in r.stderr and not (tmp_path / "gated.onnx").exists()
    r = invoke(path, "-s", "0.5", "--input-shape", "x:1,2,640,640", "--batches", "1", "-q")  # the hint pastes
    assert r.exit_code == 0
    r = invoke(path, "-s", "0.5", "--input-shape", "x:2,2,5,5", "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["validation"]["samples"] == 8
    assert invoke(path, "-s", "0.5", "--input-shape", "x:2,2").exit_code == 2
    assert invoke(path, "-s", "0.5", "--input-shape", "nope:1").exit_code == 2


def test_data_formats(tmp_path):
    specs = input_specs(two_layer_mlp())
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float64)
    np.savez(tmp_path / "named.npz", x=x, labels=np.arange(10) % 4)
    d = load_data(str(tmp_path / "named.npz"), specs, 4)
    assert [b["x"].shape[0] for b in d.batches] == [4, 4, 2] and d.batches[0]["x"].dtype == np.float32
    assert d.labels.tolist() == (np.arange(10) % 4).tolist()
    np.savez(tmp_path / "single.npz", whatever=x)
    assert load_data(str(tmp_path / "single.npz"), specs, 5).samples == 10
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "x.npy", x)
    np.save(tmp_path / "dir" / "y.npy", np.zeros(10, np.int64))
    assert load_data(str(tmp_path / "dir"), specs, 10).labels is not None
    np.savez(tmp_path / "bad.npz", a=x, b=x)
    with pytest.raises(InputError, match="no array for input"):
        load_data(str(tmp_path / "bad.npz"), specs, 4)
    with pytest.raises(InputError):
        load_data(str(tmp_path / "missing.npz"), specs, 4)


def test_synthesize_is_seeded_and_shape_parsing():
    specs = input_specs(two_layer_mlp())
    a = synthesize(specs, 3, 2, seed=1, shapes={})
    b = synthesize(specs, 3, 2, seed=1, shapes={})
    assert np.array_equal(a.batches[1]["x"], b.batches[1]["x"]) and a.batches[0]["x"].shape == (3, 8)
    assert parse_input_shapes(["a/b:1,3,224,224"]) == {"a/b": [1, 3, 224, 224]}
    with pytest.raises(ConfigError):
        parse_input_shapes(["x:0,3"])


def test_identical_model_compares_equal(tmp_path):
    path = sample("mlp_gemm")[0]
    ds = synthesize(input_specs(onnx.load(path)), 16, 2, 0, {})
    v = Validator(path, ds, "cpu", bounds=Bounds(max_drop=0.0)).compare(path)
    assert v.passed and v.drop == 0 and v.outputs[0].max_abs_error == 0 and v.outputs[0].cosine == pytest.approx(1)


def test_nan_outputs_fail_the_gate(tmp_path):
    m = two_layer_mlp()
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    bad = two_layer_mlp()
    w = onnx.numpy_helper.to_array(bad.graph.initializer[1]).copy()
    w[:] = np.nan
    bad.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w, "w2"))
    bad_path = str(tmp_path / "bad.onnx")
    onnx.save(bad, bad_path)
    ds = synthesize(input_specs(m), 4, 2, 0, {})
    v = Validator(path, ds, "cpu", bounds=Bounds(max_rel_error=10.0)).compare(bad_path)
    assert v.passed is False and v.outputs[0].nonfinite_pruned > 0 and "non-finite" in v.outputs[0].collapsed


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a working CUDA provider")
def test_cuda_requested_without_gpu_is_refused_exit_4(cnn):
    with pytest.raises(RequestError, match="CPUExecutionProvider"):
        make_session(cnn, "cuda")
    assert invoke(cnn, "-s", "0.5", "--device", "cuda").exit_code == 4


def test_auto_falls_back_to_cpu_quietly(cnn, capfd):
    sess = make_session(cnn, "auto")
    assert sess.get_providers()[-1] == "CPUExecutionProvider"
    assert "libcu" not in capfd.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no working CUDA execution provider")
def test_gpu_validation_runs_on_cuda(cnn):
    r = invoke(cnn, "-s", "0.5", "--data", sample("cnn")[1], "--device", "cuda", "--json", "-q")
    v = json.loads(r.stdout)["validation"]
    assert r.exit_code == 0 and v["providers"][0] == "CUDAExecutionProvider" and abs(v["drop"]) < 0.05


def test_search_plot_png(cnn, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    r = invoke(cnn, "-s", "auto", "--data", sample("cnn")[1], "--max-drop", "0.02", "-o", tmp_path / "o.onnx",
               "--plot", png, "-q")
    assert r.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
