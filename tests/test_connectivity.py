import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import prune
from onnxprune.connectivity import effective_counts, effective_masks
from onnxprune.graph import find_layers

from conftest import init, make_model, run, vi, weights

RNG = np.random.default_rng(0)


def mlp(masks, relu=True):
    """MatMul chain with Keras-layout [in, out] weights (masks applied to random values)."""
    nodes, inits, prev = [], [], "x"
    for i, m in enumerate(masks):
        w = (RNG.standard_normal(m.shape) * m).astype(np.float32)
        inits.append(init(f"w{i}", w))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
        if relu and i < len(masks) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return make_model(nodes, [vi("x", ["N", masks[0].shape[0]])], [vi("y", ["N", masks[-1].shape[1]])], inits)


def masks_of(model):
    layers, _ = find_layers(model)
    w = {l.name: onnx.numpy_helper.to_array(l.tensor) for l in layers}
    return layers, w


def test_es_test_vector():
    m1 = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    m2 = np.array([[1, 0], [0, 0], [0, 1]])
    model = mlp([m1, m2])
    layers, w = masks_of(model)
    eff = effective_masks(model, layers, w)
    assert eff["w0"].astype(int).tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert eff["w1"].astype(int).tolist() == [[1, 0], [0, 0], [0, 0]]
    counts = effective_counts(model, layers, w).effective_count
    assert 18 - sum(counts.values()) == 15  # effective sparsity 15/18; direct 13/18


def brute_force(masks):
    """Weight (l, i, j) is effective iff some path input -> i (layers < l) and j -> output (layers > l)."""
    L = len(masks)

    def reaches_input(l, i):  # unit i at the input of layer l
        if l == 0:
            return True
        return any(masks[l - 1][k, i] and reaches_input(l - 1, k) for k in range(masks[l - 1].shape[0]))

    def reaches_output(l, j):  # unit j at the output of layer l
        if l == L - 1:
            return True
        return any(masks[l + 1][j, k] and reaches_output(l + 1, k) for k in range(masks[l + 1].shape[1]))
    return [np.array([[bool(m[i, j]) and reaches_input(l, i) and reaches_output(l, j) for j in range(m.shape[1])]
                      for i in range(m.shape[0])]) for l, m in enumerate(masks)]


@pytest.mark.parametrize("seed", range(8))
def test_mlp_matches_brute_force_path_enumeration(seed):
    rng = np.random.default_rng(seed)
    dims = [5, 6, 4, 6, 3]
    masks = [rng.random((a, b)) < 0.3 for a, b in zip(dims, dims[1:])]
    model = mlp([m.astype(np.float32) for m in masks])
    layers, w = masks_of(model)
    eff = effective_masks(model, layers, w)
    for l, expected in enumerate(brute_force([x != 0 for x in [w[f"w{i}"] for i in range(len(dims) - 1)]])):
        assert (eff[f"w{l}"] == expected).all()


def compare_after_removal(model, feeds, sparsity=0.9, method="random", seed=1):
    pruned, rep = prune(model, sparsity=sparsity, method=method, seed=seed, effective=False)
    removed, rep2 = prune(model, sparsity=sparsity, method=method, seed=seed)
    a, b = run(pruned, feeds), run(removed, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    return rep, rep2


@pytest.mark.parametrize("seed", range(4))
def test_mlp_removal_keeps_outputs_and_folds_biases(seed):
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    dims = [12, 16, 16, 4]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        inits += [init(f"w{i}", rng.standard_normal((b, a)).astype(np.float32)),
                  init(f"b{i}", rng.standard_normal(b).astype(np.float32))]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"z{i}"], name=f"fc{i}", transB=1))
        nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"]))
        prev = f"a{i}"
    model = make_model(nodes, [vi("x", ["N", 12])], [vi(prev, ["N", 4])], inits)
    feeds = {"x": rng.standard_normal((32, 12)).astype(np.float32)}
    rep, rep2 = compare_after_removal(model, feeds, 0.93, seed=seed)
    assert rep2.totals()["zeros_after"] >= rep.totals()["zeros_after"]
    assert rep2.totals()["effective_zeros"] == rep.totals()["effective_zeros"] >= rep.totals()["zeros_after"]


def cnn_bn_residual_concat(rng):
    c = 8
    inits = [init("w1", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             init("w3", rng.standard_normal((c, c, 1, 1)).astype(np.float32)),
             init("b3", rng.standard_normal(c).astype(np.float32)),
             init("w4", rng.standard_normal((4, c, 1, 1)).astype(np.float32)),
             init("b4", rng.standard_normal(4).astype(np.float32)),
             init("fc", rng.standard_normal((5, (c + 4) * 4 * 4)).astype(np.float32)),
             init("fcb", rng.standard_normal(5).astype(np.float32))]
    for k in ("s", "bb", "mean"):
        inits.append(init(f"bn_{k}", rng.standard_normal(c).astype(np.float32)))
    inits.append(init("bn_var", rng.random(c).astype(np.float32) + 0.5))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_bb", "bn_mean", "bn_var"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=c),
             helper.make_node("Relu", ["c2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="pw"),
             helper.make_node("Add", ["c3", "a1"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Conv", ["r", "w4", "b4"], ["c4"], name="branch"),
             helper.make_node("Concat", ["r", "c4"], ["cat"], axis=1),
             helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits)


@pytest.mark.parametrize("seed", range(4))
def test_cnn_bn_residual_concat_removal_keeps_outputs(seed):
    rng = np.random.default_rng(seed)
    model = cnn_bn_residual_concat(rng)
    feeds = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    rep, rep2 = compare_after_removal(model, feeds, 0.9, seed=seed)
    assert rep2.connectivity["unknown_ops"] == []
    assert rep2.totals()["effective_zeros"] >= rep.totals()["zeros_after"]


def test_cnn_dead_channel_is_found_through_concat_and_flatten():
    rng = np.random.default_rng(0)
    model = cnn_bn_residual_concat(rng)
    layers, w = masks_of(model)
    w = dict(w)
    w["fc"] = w["fc"].copy()
    w["fc"][:, 8 * 16:9 * 16] = 0  # the classifier never reads concat channel 8 = branch output 0
    eff = effective_masks(model, layers, w)
    assert not eff["w4"][0].any() and eff["w4"][1:].all()


def transformer_block(rng, d=8, t=5):
    inits = [init(n, rng.standard_normal((d, d)).astype(np.float32)) for n in ("wq", "wk", "wv", "wo")]
    inits += [init("w_up", rng.standard_normal((d, 2 * d)).astype(np.float32)),
              init("w_down", rng.standard_normal((2 * d, d)).astype(np.float32)),
              init("ln_s", np.ones(d, np.float32)), init("ln_b", np.zeros(d, np.float32)),
              init("b_up", rng.standard_normal(2 * d).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
             helper.make_node("MatMul", ["attn", "v"], ["ctx"], name="av"),
             helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o"),
             helper.make_node("Add", ["o", "x"], ["res"], name="res1"),
             helper.make_node("LayerNormalization", ["res", "ln_s", "ln_b"], ["ln"], axis=-1),
             helper.make_node("MatMul", ["ln", "w_up"], ["u"], name="up"),
             helper.make_node("Add", ["u", "b_up"], ["ub"], name="up_bias"),
             helper.make_node("Relu", ["ub"], ["ua"]),
             helper.make_node("MatMul", ["ua", "w_down"], ["dn"], name="down"),
             helper.make_node("Add", ["dn", "res"], ["y"], name="res2")]
    return make_model(nodes, [vi("x", ["N", t, d])], [vi("y", ["N", t, d])], inits)


@pytest.mark.parametrize("seed", range(4))
def test_transformer_block_removal_keeps_outputs(seed):
    rng = np.random.default_rng(seed)
    model = transformer_block(rng)
    feeds = {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    rep, rep2 = compare_after_removal(model, feeds, 0.9, seed=seed)
    assert rep2.totals()["effective_zeros"] >= rep.totals()["zeros_after"]


def test_transformer_dead_value_feature_detected():
    rng = np.random.default_rng(0)
    model = transformer_block(rng)
    layers, w = masks_of(model)
    w = dict(w)
    w["wo"] = w["wo"].copy()
    w["wo"][2, :] = 0  # context feature 2 is never read -> value feature 2 is dead
    eff = effective_masks(model, layers, w)
    assert not eff["wv"][:, 2].any() and eff["wv"][:, 3].all()


def test_unknown_op_never_claims_dead_units():
    m1 = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("TopK", ["h", "k"], ["vals", "idx"], axis=-1),
             helper.make_node("MatMul", ["vals", "w1"], ["y"], name="mm1")]
    w1 = np.zeros((2, 3), np.float32)
    w1[0, 0] = 1
    model = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])],
                       [init("w0", m1), init("w1", w1), init("k", np.array([2], np.int64))])
    layers, w = masks_of(model)
    res = effective_counts(model, layers, w)
    assert "TopK" in res.unknown_ops and res.effective_count["w0"] == 16


def test_report_has_effective_sparsity_also_on_dry_run():
    model = mlp([np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]), np.array([[1, 0], [0, 0], [0, 1]])])
    _, rep = prune(model, sparsity=0.0, dry_run=True)
    t = rep.totals()
    assert t["zeros_after"] == 13 and t["effective_zeros"] == 15
    assert rep.connectivity["mode"] == "channel"
