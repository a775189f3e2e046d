import numpy as np
import pytest

from onnxprune import allocation as A
from onnxprune import scores as S
from onnxprune.errors import RequestError


def ctx(arrays, prune_total, is_conv=None, min_keep=0):
    layers = []
    for i, w in enumerate(arrays):
        w = np.asarray(w, dtype=np.float64)
        layers.append(A.LayerInfo(size=w.size, zeros=int(w.size - np.count_nonzero(w)), shape=w.shape,
                                  is_conv=bool(is_conv and is_conv[i]), values=w))
    return A.Context(layers=layers, prune_total=prune_total, min_keep=min_keep)


TWO = [np.array([[0.3, -1.0], [2.0, 0.5]]), np.array([[0.1, 0.25]])]


def test_lamp_vs_global_two_layer_vector():
    # ALGORITHMS.md 2.7: prune 3 of 6. LAMP keeps A{-1, 2}, B{0.25}; global magnitude collapses B.
    assert A.alloc_lamp(ctx(TWO, 3)).tolist() == [2, 1]
    assert A.alloc_global(ctx(TWO, 3)).tolist() == [1, 2]


def test_global_counts_ties_are_deterministic():
    a, b = np.array([1.0, 1.0, 2.0]), np.array([1.0, 3.0])
    # three weights tie at 1.0; pruning two takes them from the earlier layer first
    assert A.global_counts([a, b], 2).tolist() == [2, 0]
    assert A.global_counts([a, b], 3).tolist() == [2, 1]
    assert A.global_counts([a, b], 0).tolist() == [0, 0]
    assert A.global_counts([a, b], 5).tolist() == [3, 2]


def test_global_counts_with_neg_inf_zeros():
    a = np.array([-np.inf, -np.inf, 0.5, 0.9])
    b = np.array([-np.inf, 0.1, 0.7])
    assert A.global_counts([a, b], 3).tolist() == [2, 1]
    assert A.global_counts([a, b], 4).tolist() == [2, 2]


def test_global_counts_matches_brute_force():
    rng = np.random.default_rng(3)
    arrays = [np.sort(np.round(rng.random(n), 2)) for n in (50, 7, 130)]
    pooled = sorted((v, li, j) for li, a in enumerate(arrays) for j, v in enumerate(a))
    for p in (1, 10, 77, 186):
        expect = np.bincount([li for _, li, _ in pooled[:p]], minlength=3)
        assert A.global_counts(arrays, p).tolist() == expect.tolist()


def test_lamp_allocation_equals_pooled_lamp_scores():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, s, n) for s, n in ((0.05, 3000), (1.0, 400), (0.2, 50))]
    p = 3000
    got = A.alloc_lamp(ctx(arrays, p))
    pooled = np.concatenate([S.lamp(a) for a in arrays])
    layer = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)])
    expect = np.bincount(layer[np.argsort(pooled, kind="stable")[:p]], minlength=3)
    assert got.tolist() == expect.tolist()


def test_uniform_exact_total_and_equal_fractions():
    arrays = [np.ones(1000), np.ones(333), np.ones(77)]
    c = A.alloc_uniform(ctx(arrays, 1269))  # 90 % of 1410
    assert c.sum() == 1269
    assert np.all(np.abs(c / np.array([1000, 333, 77]) - 0.9) <= 1 / 77)


def test_uniform_plus_first_conv_dense_last_keeps_20_percent():
    arrays = [np.ones((8, 1, 3, 3)), np.ones(1000), np.ones(100)]
    c = A.alloc_uniform_plus(ctx(arrays, int(round(0.9 * 1172)), is_conv=[True, False, False]))
    assert c[0] == 0 and c[2] == 80 and c.sum() == round(0.9 * 1172)
    with pytest.raises(RequestError):
        A.alloc_uniform_plus(ctx(arrays, 1100, is_conv=[True, False, False]))


def test_erk_densities_and_capping():
    shapes = [(16, 3, 3, 3), (64, 16, 3, 3), (512, 64, 3, 3), (10, 512)]
    sizes = np.array([int(np.prod(s)) for s in shapes])
    for density in (0.5, 0.1, 0.02):
        keep = A.erk_keep_fraction(shapes, sizes, density * sizes.sum())
        assert (keep <= 1).all() and (keep * sizes).sum() == pytest.approx(density * sizes.sum())
        raw = np.array([sum(s) for s in shapes]) / sizes
        free = keep < 1
        ratio = keep[free] / raw[free]
        np.testing.assert_allclose(ratio, ratio[0])  # uncapped layers: density proportional to sum(dims)/prod(dims)
    assert A.erk_keep_fraction(shapes, sizes, 0.5 * sizes.sum())[0] == 1.0  # first conv capped dense


@pytest.mark.parametrize("s,f", [(0.9, 6.172e-5), (0.99, 9.164e-4), (0.999, 1.092e-2)])
def test_igq_force_for_lenet_300_100(s, f):
    n = np.array([784 * 300, 300 * 100, 100 * 10])
    sp = A.igq_sparsities(n, s * n.sum())
    force = sp / (n * (1 - sp))
    assert force[0] == pytest.approx(f, rel=5e-3) and np.allclose(force, force[0])
    assert abs((sp * n).sum() / n.sum() - s) < 1 / n.sum()


def test_global_mt_vector_from_algorithms_md():
    n = np.array([500, 25000, 400000, 1000000, 5000])
    s = np.array([0.10, 0.60, 0.995, 0.9995, 0.95])
    total = int(round(0.9907725 * n.sum()))
    m = int(n.sum() * 0.05 / 100)
    assert m == 715
    kept = n - A.min_keep_counts(s * n, n, np.zeros(5, dtype=np.int64), m, total)
    assert np.all(np.abs(kept - np.array([500, 9973.5, 1296.5, 715, 715])) <= 1)
    assert kept.sum() == n.sum() - total


def test_fit_counts_respects_bounds_and_total():
    c = A.fit_counts(np.array([5.0, 5.0, 5.0]), np.array([4, 0, 0]), np.array([10, 3, 10]), 15, "t")
    assert c.sum() == 15 and c[1] <= 3 and c[0] >= 4


@pytest.mark.parametrize("name", list(A.ALLOCATIONS))
def test_every_allocation_exact_and_keeps_existing_zeros(name):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(s) for s in ((8, 1, 3, 3), (32, 8, 3, 3), (64, 288), (10, 64))]
    arrays[1].ravel()[:500] = 0.0
    c = ctx(arrays, int(round(0.8 * sum(a.size for a in arrays))), is_conv=[True, True, False, False],
            min_keep=5)
    counts = A.ALLOCATIONS[name](c)
    assert counts.sum() == c.prune_total
    assert (counts >= c.zeros).all() and (counts <= c.sizes).all()


@pytest.mark.parametrize("s,expected", [(0.9, [6.88, 31.92, 86.00]), (0.98, [1.09, 7.17, 60.80]),
                                        (0.99, [0.50, 3.51, 44.30])])
def test_lamp_gaussian_lenet_300_100_allocation(s, expected):
    """ALGORITHMS.md 2.7 tolerance vector: i.i.d. N(0, 0.05^2) layers, per-layer density in percent."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 0.05, shape) for shape in ((300, 784), (100, 300), (10, 100))]
    sizes = np.array([a.size for a in arrays])
    counts = A.alloc_lamp(ctx(arrays, int(round(s * sizes.sum()))))
    density = 100 * (1 - counts / sizes)
    np.testing.assert_allclose(density, expected, rtol=0.03)
