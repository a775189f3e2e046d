import numpy as np
import pytest

from onnxprune import scores as S
from onnxprune.allocation import global_counts
from onnxprune.threshold import global_prune_counts


def reference(mags, kind):
    fn = S.lamp_sorted if kind == "lamp" else S.sorted_magnitude
    return [fn(m) for m in mags]


@pytest.mark.parametrize("kind", ["lamp", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99, 0.9999])
def test_matches_full_sort_reference(kind, sparsity):
    rng = np.random.default_rng(1)
    mags = [np.abs(rng.normal(0, s, n)).astype(np.float32) for s, n in
            ((0.02, 300_000), (1.0, 70_000), (0.3, 5_000), (0.05, 120_000), (2.0, 33))]
    mags[1][:20_000] = 0  # existing zeros
    p = max(20_000, int(round(sparsity * sum(m.size for m in mags))))
    got, hints = global_prune_counts(mags, kind, p)
    assert got.sum() == p
    assert got.tolist() == global_counts(reference(mags, kind), p).tolist()
    for m, k, t in zip(mags, got, hints):  # each hint brackets its layer's cut
        if t is not None:
            assert (m < np.float32(t)).sum() <= k <= (m <= np.float32(t)).sum()


@pytest.mark.parametrize("kind", ["lamp", "magnitude"])
def test_heavy_ties_and_tiny_layers(kind):
    rng = np.random.default_rng(2)
    mags = [np.round(np.abs(rng.normal(0, 1, n)), 1).astype(np.float32) for n in (50_000, 3, 1, 9_000)]
    for p in (1, 100, 30_000, 59_000):
        assert global_prune_counts(mags, kind, p)[0].tolist() == global_counts(reference(mags, kind), p).tolist()


def test_periodic_layout_defeats_the_sample_but_not_the_result():
    # every 64th weight is large: the strided sample sees only those; the answer must still be exact
    a = np.full(64 * 4000, 0.01, dtype=np.float32)
    a[::64] = 5.0
    b = np.abs(np.random.default_rng(0).normal(0, 1, 10_000)).astype(np.float32)
    for kind in ("lamp", "magnitude"):
        p = 200_000
        assert global_prune_counts([a, b], kind, p)[0].tolist() == global_counts(reference([a, b], kind), p).tolist()


def test_prune_mask_hint_is_checked_and_gives_the_same_mask():
    from onnxprune.select import prune_mask
    s = np.array([0.5, 0.1, 0.5, 0.9, 0.5, 0.2], dtype=np.float32)
    want = prune_mask(s, 3)
    for hint in (0.5, 0.1, 0.9, 7.0, None):  # right and wrong hints alike
        assert (prune_mask(s, 3, hint=hint) == want).all()
