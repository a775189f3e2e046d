"""The CRNN-like sample (sample_models/crnn.onnx, built by sample_models/make_crnn_sample.py): a conv stem with
BatchNormalization, a depthwise conv and a residual Add, a Reshape/Transpose to a time-first sequence, a
bidirectional LSTM and a per-position softmax [N, T, C] (blank = 0), with 200 labelled test lines."""
import json
import os

import numpy as np
import onnx
import pytest

from conftest import SAMPLES, invoke, run

from onnxprune.compare import ctc_greedy

MODEL = os.path.join(SAMPLES, "crnn.onnx")
DATA = os.path.join(SAMPLES, "crnn_test.npz")


@pytest.fixture(scope="module")
def test_set():
    with np.load(DATA) as d:
        return d["x"], d["y"]


@pytest.fixture(scope="module")
def dense_probs(test_set):
    return run(MODEL, {"x": test_set[0]})[0]


def test_sample_is_small_and_well_formed():
    assert os.path.getsize(MODEL) < 500_000
    m = onnx.load(MODEL)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 10 and {o.domain: o.version for o in m.opset_import}[""] == 17
    ops = [n.op_type for n in m.graph.node]
    for op in ("Conv", "BatchNormalization", "Add", "Reshape", "Transpose", "LSTM", "MatMul", "Softmax"):
        assert op in ops, op
    assert any(a.name == "group" and a.i > 1 for n in m.graph.node if n.op_type == "Conv" for a in n.attribute)


def test_test_set_shapes(test_set):
    x, y = test_set
    assert x.shape == (200, 1, 32, 128) and x.dtype == np.float32
    assert y.shape == (200, 32) and y.dtype == np.int64
    assert 0 <= y.min() and y.max() <= 10 and (y == 0).mean() > 0.3  # blanks between glyphs


def test_dense_accuracy_and_decoding(test_set, dense_probs):
    x, y = test_set
    assert dense_probs.shape == (200, 32, 11)
    np.testing.assert_allclose(dense_probs.sum(-1), 1.0, atol=1e-4)
    acc = (dense_probs.argmax(-1) == y).mean()
    decoded = np.mean([ctc_greedy(p, 0) == ctc_greedy(t, 0) for p, t in zip(dense_probs.argmax(-1), y)])
    # measured when the sample was made: per-position 0.9994, whole lines decoded 0.985
    assert acc > 0.99, acc
    assert decoded > 0.95, decoded


def test_channel_pruning_runs(tmp_path):
    """The lead is changing channel allocation: only that the CLI finishes (0 done, 1 gate failed) with a
    parseable report and, when it wrote a model, the model runs with the same output shape. When written: exit 0,
    30.2% of the prunable weights removed (conv1 16->10, conv2/dw/pw 32->18 channels; proj and cls kept: the LSTM
    is read as all-to-all), MACs 0.465x, per-position accuracy 0.9994 -> 0.50 (no gate asked)."""
    out = tmp_path / "crnn_pruned.onnx"
    r = invoke(MODEL, "-s", "0.3", "--granularity", "channel", "-o", out, "--data", DATA, "--json")
    assert r.exit_code in (0, 1), r.output
    doc = json.loads(r.output)
    assert isinstance(doc, dict)
    if r.exit_code == 0:
        with np.load(DATA) as d:
            probs = run(str(out), {"x": d["x"][:8]})[0]
        assert probs.shape == (8, 32, 11)
