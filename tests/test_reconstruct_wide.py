"""Wide layers solved a block of output rows at a time (reconstruct/wide.py): the exact count, the same support
and refit as the whole-layer solve, the spilled selection equal to ``select.prune_mask``."""
import numpy as np
import pytest
from onnx import helper

from conftest import init, make_model, vi, weights
from onnxprune import prune
from onnxprune.reconstruct import wide
from onnxprune.select import prune_mask


def _model(rng, bias: bool):
    """x [N, 48] -> MatMul [48, 40] -> Relu -> Gemm [24, 40] (transB, with or without C) -> y [N, 24]."""
    w1 = rng.standard_normal((48, 40)).astype(np.float32)
    w2 = rng.standard_normal((24, 40)).astype(np.float32) * 0.3
    inits = [init("w1", w1), init("w2", w2)]
    gemm_in = ["r", "w2"]
    if bias:
        inits.append(init("c2", rng.standard_normal(24).astype(np.float32)))
        gemm_in.append("c2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", gemm_in, ["y"], transB=1, alpha=0.7)]
    return make_model(nodes, [vi("x", ["N", 48])], [vi("y", ["N", 24])], inits)


@pytest.mark.parametrize("samples, bias", [(16, False), (16, True), (240, False), (240, True)])
def test_row_blocks_match_the_whole_layer(samples, bias, monkeypatch):
    """Few sample rows (the low-rank route) and many (H's inverse), with and without a bias the refit changes."""
    rng = np.random.default_rng(samples + bias)
    m = _model(rng, bias)
    x = rng.standard_normal((samples, 48)).astype(np.float32)
    cal = [{"x": x[:samples // 2]}, {"x": x[samples // 2:]}]
    opts = dict(effective=False, reconstruct=True, calibration=cal, reconstruct_mask="obs")
    whole, rep_whole = prune(m, 0.7, **opts)
    monkeypatch.setattr(wide, "WIDE_BYTES", 0)
    monkeypatch.setattr(wide, "ROW_BYTES", 8 * 49 * 7)  # 7 rows a block: the last block is short
    monkeypatch.setattr(wide, "READ_VALUES", 100)
    blocks, rep_blocks = prune(m, 0.7, **opts)
    a, b = weights(whole), weights(blocks)
    for name in a:
        assert np.count_nonzero(a[name] == 0) == np.count_nonzero(b[name] == 0)
        same = (a[name] == 0) == (b[name] == 0)
        assert same.mean() > 0.99, name  # the scores of a block equal the whole layer's up to rounding
        np.testing.assert_allclose(a[name][same], b[name][same], rtol=1e-4, atol=1e-5)
    for ra, rb in zip(rep_whole.reconstruction["layers"], rep_blocks.reconstruction["layers"]):
        assert rb["row_blocks"] > 1 and "row_blocks" not in ra
        assert ra["method"] == rb["method"] and rb["method"] != "plain"
        assert rb["rel_error_after"] == pytest.approx(ra["rel_error_after"], rel=1e-3, abs=1e-9)
        assert rb["rel_error_before"] == pytest.approx(ra["rel_error_before"], rel=1e-6, abs=1e-12)  # float32 y_d


def test_spilled_selection_equals_prune_mask(monkeypatch):
    """Ties (by canonical index), -inf (existing zeros), -0.0 against +0.0, a NaN: the same mask, any count."""
    monkeypatch.setattr(wide, "READ_VALUES", 37)
    rng = np.random.default_rng(5)
    og, d = 9, 13
    shape = (d, og)  # a MatMul weight [in, out]: rows are its columns
    index = np.arange(og * d).reshape(shape).T
    scores = rng.choice([0.0, -0.0, 0.5, 1.0, 2.0, 3e-300, 7.25], size=(og, d))
    scores[rng.random((og, d)) < 0.1] = -np.inf
    spill = wide._Spill(d)
    try:
        for a in range(0, og, 4):
            spill.append(scores[a:a + 4])
        for n_prune in (0, 1, 5, 17, 40, 60, og * d - 1, og * d):
            got = wide.select_spilled(spill, og * d, n_prune, lambda at: index.reshape(-1)[at], shape, (1, 0))
            flat = np.empty(og * d)
            flat[index.reshape(-1)] = scores.reshape(-1)
            want = prune_mask(flat, n_prune, shape, (1, 0))[index].reshape(-1)
            assert np.array_equal(got, want), n_prune
            assert got.sum() == n_prune
    finally:
        spill.close()
    nan = np.array([np.nan, 1.0, np.inf, -np.inf, 0.0])
    assert np.array_equal(np.argsort(wide._keys(nan), kind="stable"), [3, 4, 1, 0, 2])
