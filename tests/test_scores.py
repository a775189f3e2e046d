import numpy as np
import pytest

from onnxprune import scores as S
from onnxprune.select import apply_mask, prune_mask


def test_lamp_vector_from_algorithms_md():
    w = np.array([[0.3, -1.0], [2.0, 0.5]])
    expected = np.array([[0.09 / 5.34, 0.25 / 5.25], [1.0, 1.0 / 5.0]])
    # squares 0.09, 0.25, 1, 4 -> suffix sums 5.34, 5.25, 5, 4: scores 0.01685, 0.04762, 0.2, 1.0
    np.testing.assert_allclose(S.lamp(w), [[0.01685393, 0.2], [1.0, 0.04761905]], rtol=1e-6)
    np.testing.assert_allclose(S.lamp(w), [[expected[0, 0], 0.2], [1.0, expected[0, 1]]], rtol=1e-12)


def test_lamp_ties_follow_sort_position():
    # |w| = (1, 2, 2, 3) -> (1/18, 4/17, 4/13, 9/9); the later of two equal weights scores higher
    np.testing.assert_allclose(S.lamp(np.array([1.0, 2.0, -2.0, 3.0])), [1 / 18, 4 / 17, 4 / 13, 1.0])


def test_lamp_top_score_is_one_in_float64_on_large_layers():
    w = np.random.default_rng(0).normal(0, 0.05, 2_000_000).astype(np.float32)
    s = S.lamp_sorted(w)
    assert s[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(s) >= 0)  # monotone in magnitude order
    assert s.max() <= 1.0 + 1e-12


def test_lamp_zeros_and_all_zero_layer_never_nan():
    s = S.lamp_sorted(np.array([0.0, 0.0, 1.0, 2.0]))
    assert np.isneginf(s[:2]).all() and np.isfinite(s[2:]).all()
    assert np.isneginf(S.lamp_sorted(np.zeros(5))).all()


def test_lamp_scale_invariant():
    w = np.random.default_rng(1).standard_normal(100)
    np.testing.assert_allclose(S.lamp(w), S.lamp(w * 1000.0), rtol=1e-12)


def test_fp16_scores_in_float64_not_fp16():
    w = np.full(100_000, 1.0, dtype=np.float16)  # an fp16 sum of these overflows to inf
    s = S.lamp_sorted(w)
    assert s.dtype == np.float64 and np.isfinite(s).all() and s[-1] == 1.0


def test_prune_mask_exact_count_and_tie_break_by_index():
    scores = np.array([1.0, 0.5, 0.5, 0.5, 2.0])
    m = prune_mask(scores, 3)
    assert m.tolist() == [False, True, True, True, False]
    m = prune_mask(scores, 2)
    assert m.tolist() == [False, True, True, False, False]  # lowest flat index among ties first
    assert prune_mask(scores, 0).sum() == 0 and prune_mask(scores, 5).sum() == 5


def test_prune_mask_ties_use_canonical_layout():
    # The same weights stored [out, in] and [in, out]: ties are broken in (out, in) order in both.
    w = np.ones((2, 3))
    a = prune_mask(np.abs(w).ravel(), 2, w.shape, (0, 1)).reshape(w.shape)
    b = prune_mask(np.abs(w.T).ravel(), 2, w.T.shape, (1, 0)).reshape(w.T.shape)
    assert (a == b.T).all()


def test_random_scores_reproducible_and_layout_invariant():
    w = np.random.default_rng(0).standard_normal((4, 6))
    a = S.random_scores(w, 7, 0, (0, 1)).reshape(w.shape)
    b = S.random_scores(np.ascontiguousarray(w.T), 7, 0, (1, 0)).reshape(w.T.shape)
    np.testing.assert_array_equal(a, b.T)
    assert not np.array_equal(a, S.random_scores(w, 8, 0, (0, 1)).reshape(w.shape))


def test_apply_mask_keeps_dtype_and_zeros():
    w = np.array([0.0, 1.5, -2.0, 3.0], dtype=np.float16)
    out = apply_mask(w, prune_mask(S.magnitude(w), 2))
    assert out.dtype == np.float16 and out.tolist() == [0.0, 0.0, -2.0, 3.0]
