
import numpy as np
import onnx
import pytest
from onnx import helper

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
    names = {l.name for l in rep2.layers}
    actual = sum(int((v == 0).sum()) for k, v in weights(removed).items() if k in names)
    assert actual == rep2.totals()["zeros_after"]  # the report counts what was really zeroed
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


def lap_chain():
    """ALGORITHMS.md 3.6: W1 (3x2), W2 (2x3), W3 (1x2) in PyTorch [out, in] layout."""
    w1 = np.array([[1, 2], [0.5, 0.1], [3, 1]], np.float32)
    w2 = np.array([[1, 0.2, 0.5], [0.3, 2, 1]], np.float32)
    w3 = np.array([[2, 0.5]], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="l1", transB=1),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Gemm", ["ar", "w2"], ["b"], name="l2", transB=1),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Gemm", ["br", "w3"], ["y"], name="l3", transB=1)]
    return make_model(nodes, [vi("x", ["N", 2])], [vi("y", ["N", 1])], [init("w1", w1), init("w2", w2), init("w3", w3)])


def test_lap_scores_and_masks_vector():
    from onnxprune.connectivity import infer_shapes
    from onnxprune.lookahead import lap_scores, lookahead_factors
    model = lap_chain()
    layers, w = masks_of(model)
    values = [w[l.name] for l in layers]
    f = lookahead_factors(model, layers, values, infer_shapes(model))
    np.testing.assert_allclose(lap_scores(w["w1"], layers[0], f).reshape(3, 2), [[1.09, 4.36], [1.01, 0.0404], [11.25, 1.25]], rtol=1e-5)
    np.testing.assert_allclose(lap_scores(w["w2"], layers[1], f).reshape(2, 3), [[20, 0.0416, 10], [0.1125, 0.26, 2.5]], rtol=1e-5)
    np.testing.assert_allclose(lap_scores(w["w3"], layers[2], f).reshape(1, 2), [[5.16, 1.2725]], rtol=1e-5)
    out, _ = prune(model, sparsity=0.5, method="lap", effective=False)
    got = weights(out)
    assert (got["w1"] != 0).astype(int).tolist() == [[0, 1], [0, 0], [1, 1]]
    assert (got["w2"] != 0).astype(int).tolist() == [[1, 0, 1], [0, 0, 1]]  # keeps 0.5, drops 2.0
    assert (got["w3"] != 0).astype(int).tolist() == [[1, 0]]


def test_lap_with_batchnorm_vector():
    """ALGORITHMS.md 3.6 LAP-BN: beta after W1 = (1, 2, 0.5), after W2 = (0.1, 1)."""
    model = lap_chain()
    g = model.graph
    for name, beta in (("a", [1, 2, 0.5]), ("b", [0.1, 1])):
        n = len(beta)
        g.initializer.extend([init(f"{name}_g", np.array(beta, np.float32)), init(f"{name}_b", np.zeros(n, np.float32)),
                              init(f"{name}_m", np.zeros(n, np.float32)), init(f"{name}_v", np.ones(n, np.float32))])
    nodes = list(g.node)
    new = []
    for nd in nodes:
        if nd.op_type == "Relu":
            src = nd.input[0]
            new.append(helper.make_node("BatchNormalization", [src, f"{src}_g", f"{src}_b", f"{src}_m", f"{src}_v"],
                                        [f"{src}_bn"], epsilon=1e-10))
            nd = helper.make_node("Relu", [f"{src}_bn"], list(nd.output))
        new.append(nd)
    del g.node[:]
    g.node.extend(new)
    out, _ = prune(model, sparsity=0.5, method="lap", effective=False)
    got = weights(out)
    assert (got["w1"] != 0).astype(int).tolist() == [[0, 1], [1, 0], [1, 0]]
    assert (got["w2"] != 0).astype(int).tolist() == [[1, 0, 0], [0, 1, 1]]
    assert (got["w3"] != 0).astype(int).tolist() == [[0, 1]]


def test_conv_lap_factors_vector():
    """ALGORITHMS.md 3.2: conv1 [2,1,2,2], conv2 [3,2,1,1], fc [4,6] over 3 channels x 2 positions."""
    from onnxprune.connectivity import infer_shapes
    from onnxprune.lookahead import lookahead_factors
    c1 = np.arange(1, 9, dtype=np.float32).reshape(2, 1, 2, 2)
    c2 = np.array([[1, 2], [0, 1], [3, 0.5]], np.float32).reshape(3, 2, 1, 1)
    fc = (np.arange(1, 25, dtype=np.float32) / 10).reshape(4, 6)
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"], name="conv1"),
             helper.make_node("Conv", ["a", "c2"], ["b"], name="conv2"),
             helper.make_node("Flatten", ["b"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [vi("x", [1, 1, 3, 2])], [vi("y", [1, 4])], [init("c1", c1), init("c2", c2), init("fc", fc)])
    layers, w = masks_of(model)
    f = lookahead_factors(model, layers, [w[l.name] for l in layers], infer_shapes(model))
    _, _, b1 = f["c1"][0]
    _, f2, b2 = f["c2"][0]
    _, f3, _ = f["fc"][0]
    np.testing.assert_allclose(b1, [10, 5.25])
    np.testing.assert_allclose(f2, [30, 174])
    np.testing.assert_allclose(b2, [12.44, 16.12, 20.44], rtol=1e-6)
    np.testing.assert_allclose(f3, [5, 5, 1, 1, 9.25, 9.25])


@pytest.mark.parametrize("method", ["random", "lamp", "uniform"])
def test_target_effective_bisection(method):
    from conftest import sample
    path = sample("mlp_gemm")[0]
    n = 6464
    _, rep = prune(path, sparsity=0.95, method=method, target="effective", seed=2)
    info = rep.options["effective_target"]
    wanted = round(0.95 * n)
    assert info["wanted_zeros"] == wanted and rep.totals()["effective_zeros"] <= wanted
    assert rep.totals()["effective_zeros"] == info["effective_zeros"]
    # one more directly pruned weight would overshoot the effective target
    _, nxt = prune(path, sparsity=(info["direct_count"] + 1) / n, method=method, seed=2, effective=False)
    if round((info["direct_count"] + 1) / n * n) == info["direct_count"] + 1:
        assert nxt.totals()["effective_zeros"] > wanted
    assert sum(l.zeros_after_selection for l in rep.layers) == info["direct_count"] < wanted


@pytest.mark.parametrize("alloc", ["uniform", "lamp", "erk", "igq", "global"])
def test_lap_allocations_on_cnn_keep_outputs_after_removal(alloc):
    from conftest import sample
    path, data = sample("cnn")
    a, rep = prune(path, sparsity=0.9, method="lap", allocation=alloc, effective=False)
    b, rep2 = prune(path, sparsity=0.9, method="lap", allocation=alloc)
    assert rep.totals()["zeros_after"] == round(0.9 * 14304)
    x = np.load(data)["x"][:32]
    np.testing.assert_allclose(run(b, {"x": x})[0], run(a, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("middle", ["unsqueeze", "transpose", "split_concat", "slice"])
def test_dead_units_tracked_through_shape_ops(middle):
    """Feature 2 of the first layer is never read by the second: it must be found dead through each op."""
    w0 = np.ones((4, 6), np.float32)
    w1 = np.ones((6, 3), np.float32)
    w1[2, :] = 0
    inits = [init("w0", w0), init("w1", w1)]
    if middle == "unsqueeze":
        inits += [init("ax", np.array([1], np.int64))]
        mid = [helper.make_node("Unsqueeze", ["h", "ax"], ["u"]), helper.make_node("Squeeze", ["u", "ax"], ["m"])]
    elif middle == "transpose":
        mid = [helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0]),
               helper.make_node("Transpose", ["t"], ["m"], perm=[1, 0])]
    elif middle == "split_concat":
        inits += [init("sp", np.array([2, 4], np.int64))]
        mid = [helper.make_node("Split", ["h", "sp"], ["a", "b"], axis=1),
               helper.make_node("Relu", ["a"], ["ar"]),
               helper.make_node("Concat", ["ar", "b"], ["m"], axis=1)]
    else:
        w1 = np.ones((4, 3), np.float32)
        w1[0, :] = 0  # sliced feature 2 -> row 0 of w1
        inits = [init("w0", w0), init("w1", w1), init("st", np.array([2], np.int64)),
                 init("en", np.array([6], np.int64)), init("axs", np.array([1], np.int64))]
        mid = [helper.make_node("Slice", ["h", "st", "en", "axs"], ["m"])]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="l0")] + mid + \
        [helper.make_node("MatMul", ["m", "w1"], ["y"], name="l1")]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])], inits)
    layers, w = masks_of(model)
    eff = effective_masks(model, layers, w)
    dead = [0, 1, 2] if middle == "slice" else [2]
    assert not eff["w0"][:, dead].any()
    assert eff["w0"][:, [i for i in range(6) if i not in dead]].all()


@pytest.mark.parametrize("seed", range(3))
def test_sparse_pair_blocks_agree_with_boolean_blocks(seed, monkeypatch):
    """Sparse 2-D layers are analysed as (in, out) pairs; the answer must not depend on it."""
    from onnxprune import connectivity as C
    rng = np.random.default_rng(seed)
    dims = [80, 96, 64, 10]
    masks = [rng.random((a, b)) < 0.04 for a, b in zip(dims, dims[1:])]
    model = mlp([m.astype(np.float32) for m in masks])
    layers, w = masks_of(model)
    results = []
    for density in (0.0, 1.1):  # never pairs / always pairs
        monkeypatch.setattr(C.Coo, "DENSITY", density)
        res = effective_counts(model, layers, w)
        assert any(isinstance(c, C.Coo) for c in res.counts.values()) == (density > 1)
        results.append(res.effective_count)
    assert results[0] == results[1]


def test_constant_inputs_stay_in_place_when_the_probe_is_skipped(monkeypatch):
    """Above the probe's size limit nothing is folded, the outputs still match and the report says so."""
    from onnxprune import removal
    monkeypatch.setattr(removal, "PROBE_MAX_BYTES", 0)
    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip([12, 16, 16], [16, 16, 4])):
        inits += [init(f"w{i}", rng.standard_normal((b, a)).astype(np.float32)),
                  init(f"b{i}", rng.standard_normal(b).astype(np.float32))]
        nodes += [helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"z{i}"], transB=1),
                  helper.make_node("Relu", [f"z{i}"], [f"a{i}"])]
        prev = f"a{i}"
    model = make_model(nodes, [vi("x", ["N", 12])], [vi(prev, ["N", 4])], inits)
    rep, rep2 = compare_after_removal(model, {"x": rng.standard_normal((8, 12)).astype(np.float32)}, 0.93, seed=0)
    r = rep2.connectivity["removal"]
    assert r["folded_constant_inputs"] == 0 and r["left_in_place"] > 0


def test_unnamed_nodes_are_analysed():
    """Many exports leave nodes unnamed: the unit graph must still see every layer (ES vector, no names)."""
    m1 = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    m2 = np.array([[1, 0], [0, 0], [0, 1]], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 2])], [init("w1", m1), init("w2", m2)])
    _, rep = prune(model, sparsity=0.0, dry_run=True)
    assert rep.connectivity["unknown_ops"] == [] and rep.connectivity["layers_not_analysed"] == []
    assert rep.totals()["effective_zeros"] == 15
    _, rep = prune(model, sparsity=0.0, dry_run=True, effective_mode="exact")
    assert rep.connectivity["mode"] == "exact" and rep.totals()["effective_zeros"] == 15


@pytest.mark.parametrize("layout", ["c", "f", "strided"])
def test_coo_pairs_are_nonzero_in_row_major_order(layout):
    from onnxprune.connectivity import Coo
    rng = np.random.default_rng(3)
    for shape in [(5, 7), (300, 40), (1, 9), (9, 1)]:
        f = rng.random((shape[0], shape[1] * 2)) < 0.1
        x = {"c": np.ascontiguousarray(f[:, : shape[1]]), "f": np.asfortranarray(f[:, : shape[1]]),
             "strided": f[:, ::2]}[layout]
        c, (rows, cols) = Coo(x), np.nonzero(x)
        assert c.rows.tolist() == rows.tolist() and c.cols.tolist() == cols.tolist()
        assert (c.c_in, c.c_out) == x.shape
