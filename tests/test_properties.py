import numpy as np
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper

from onnxprune import METHODS, prune

from conftest import init, make_model, run, vi


def model_from(arrays):
    nodes, prev, inits = [], "x", []
    for i, w in enumerate(arrays):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        inits.append(init(f"w{i}", w))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return make_model(nodes, [vi("x", [1, arrays[0].shape[0]])], [vi("y", None)], inits)


@st.composite
def mlps(draw):
    dims = draw(st.lists(st.integers(1, 12), min_size=2, max_size=4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    arrays = []
    for a, b in zip(dims, dims[1:]):
        w = rng.standard_normal((a, b)).astype(np.float32)
        if draw(st.booleans()):
            w = np.round(w, 1)  # many ties and some zeros
        arrays.append(w)
    return arrays


def values(model):
    return [numpy_helper.to_array(t) for t in model.graph.initializer]


@settings(max_examples=60, deadline=None)
@given(mlps(), st.floats(0.0, 0.999), st.sampled_from(list(METHODS)))
def test_exact_count_zeros_stay_and_deterministic(arrays, s, method):
    m = model_from(arrays)
    n = sum(a.size for a in arrays)
    zeros = sum(int((a == 0).sum()) for a in arrays)
    try:
        out, report = prune(m, sparsity=s, method=method, min_keep="0", effective=False)
    except Exception as exc:  # only uniform+ may be infeasible, and it must say so
        assert method == "uniform+" and "at most" in str(exc)
        return
    got = sum(int((v == 0).sum()) for v in values(out))
    assert got == max(zeros, round(s * n))
    for before, after in zip(arrays, values(out)):
        assert (after[before == 0] == 0).all()  # never revived
        assert ((after == 0) | (after == before)).all()  # only zeroing
    again, _ = prune(m, sparsity=s, method=method, min_keep="0", effective=False)
    assert again.SerializeToString() == out.SerializeToString()


@settings(max_examples=20, deadline=None)
@given(mlps(), st.floats(0.0, 0.9), st.floats(0.0, 0.9))
def test_global_magnitude_masks_are_nested(arrays, s1, s2):
    lo, hi = sorted((s1, s2))
    m = model_from(arrays)
    a, _ = prune(m, sparsity=lo, method="global", effective=False)
    b, _ = prune(m, sparsity=hi, method="global", effective=False)
    for wa, wb in zip(values(a), values(b)):
        assert (wb[wa == 0] == 0).all()


@settings(max_examples=20, deadline=None)
@given(mlps())
def test_sparsity_zero_outputs_bit_identical(arrays):
    m = model_from(arrays)
    out, _ = prune(m, sparsity=0.0)
    x = np.random.default_rng(0).standard_normal((1, arrays[0].shape[0])).astype(np.float32)
    assert np.array_equal(run(m, {"x": x})[0], run(out, {"x": x})[0])


@settings(max_examples=40, deadline=None)
@given(mlps(), st.floats(0.5, 0.99), st.integers(0, 1000))
def test_removal_never_changes_outputs(arrays, s, seed):
    """Unnamed MatMul + bias Add + Relu chains, random masks: removal (default) matches no removal."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(arrays):
        inits += [init(f"w{i}", w), init(f"b{i}", rng.standard_normal(w.shape[1]).astype(np.float32))]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]),
                  helper.make_node("Relu", [f"z{i}"], [f"h{i}"])]
        prev = f"h{i}"
    m = make_model(nodes, [vi("x", [4, arrays[0].shape[0]])], [vi(prev, None)], inits)
    a, ra = prune(m, sparsity=s, method="random", seed=seed, effective=False)
    b, rb = prune(m, sparsity=s, method="random", seed=seed)
    x = rng.standard_normal((4, arrays[0].shape[0])).astype(np.float32)
    np.testing.assert_allclose(run(b, {"x": x})[0], run(a, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert rb.totals()["effective_zeros"] == ra.totals()["effective_zeros"]
    assert rb.totals()["zeros_after"] >= ra.totals()["zeros_after"]
