"""Structured pruning that keeps accuracy (issue 15): calibrated channel selection and the consumers' least-squares
refit (--granularity channel --reconstruct)."""
import json

import numpy as np
import onnx
from onnx import helper

from conftest import init, invoke, make_model, run, sample, vi

from onnxprune.channel_scores import calibrated_label_scores
from onnxprune.compact.labels import build
from onnxprune.graph import find_layers
from onnxprune.pipeline import PruneConfig, prune_loaded


def redundant_mlp(scale=0.05):
    """x [N, 6] -> Gemm (8 units; unit 7 = scale * (unit 0 + unit 1), linear: no activation) -> Gemm (4 outputs).
    Unit 7 carries little energy and is a linear combination of kept units: removing it and refitting the
    consumer gives the dense output back exactly."""
    r = np.random.default_rng(0)
    w1 = r.standard_normal((6, 8)).astype(np.float32)
    w1[:, 7] = scale * (w1[:, 0] + w1[:, 1])
    b1 = np.zeros(8, dtype=np.float32)
    w2 = r.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 4])],
                      [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", np.zeros(4, np.float32))])


def _calibration(n=64, seed=1):
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((16, 6)).astype(np.float32)} for _ in range(n // 16)]


def test_calibrated_scores_rank_the_low_energy_channel_first():
    m = redundant_mlp()
    layers, _ = find_layers(m)
    values = {l.name: onnx.numpy_helper.to_array(l.tensor) for l in layers}
    g = build(m, layers)
    s = calibrated_label_scores(m, g, values, _calibration())
    fc1 = next(p for p in g.producers if p.layer.name == "w1")
    own = s[g.chans[fc1.out].lab]
    assert int(np.argmin(own)) == 7
    assert abs(own.sum() - 1.0) < 1e-9  # shares of the one consumer's output


def test_consumer_refit_recovers_the_dense_output_exactly():
    from onnxprune.io.model import LoadedModel
    m = redundant_mlp()
    dense = onnx.ModelProto()
    dense.CopyFrom(m)
    cal = _calibration()
    # no damping: the least-squares refit itself is exact (the default damping trades exactness for stability)
    cfg = PruneConfig(sparsity=0.06, granularity="channel", reconstruct=True, calibration=cal,
                      compact=False, damping=1e-9, channel_floor=0.0)
    loaded = LoadedModel(model=m)
    report = prune_loaded(loaded, cfg)
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.model.graph.initializer}["w1"]
    assert np.all(w1[:, 7] == 0) and np.count_nonzero(w1[:, :7]) == w1[:, :7].size  # the one channel went
    x = np.random.default_rng(5).standard_normal((32, 6)).astype(np.float32)
    np.testing.assert_allclose(run(loaded.model, {"x": x})[0], run(dense, {"x": x})[0], rtol=1e-4, atol=1e-4)
    layer = next(r for r in report.reconstruction["layers"] if r["name"] == "w2")
    assert layer["rel_error_after"] < 1e-6 < layer["rel_error_before"]


def test_channel_pruning_with_reconstruct_keeps_the_sample_cnn_within_two_points(tmp_path):
    model, data = sample("cnn_torch")
    r = invoke(model, "-s", "0.5", "--granularity", "channel", "--reconstruct", "--data", data, "--json",
               "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0, r.output
    v = doc["validation"]
    assert v["dense"] - v["pruned"] <= 0.02
    assert doc["options"]["channel_plan"]["selection"] == "calibrated"
    assert doc["compaction"]["applied"] and doc["figures"]["ratio"]["params_total"] <= 0.6
