"""Outputs cut off from the inputs (A), parameters inside subgraphs (B), removal to its fixed point (C)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import init, invoke, make_model, run, sample, vi
from onnxprune.figures import figures
from onnxprune.pipeline import prune


def _gemm_mlp(w2_scale=1e-3, skip=False, seed=0):
    """x -> fc1 -> Relu -> fc2 -> Relu -> fc3 (+ x when ``skip``) -> y; also an input passthrough 'xp' and a
    constant output 'c'. fc2's weights are ``w2_scale`` small: global magnitude pruning at 50% empties it."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((8, 16)), rng.standard_normal(16)
    w2, b2 = rng.standard_normal((16, 8)) * w2_scale, rng.standard_normal(8)
    w3, b3 = rng.standard_normal((8, 8)), rng.standard_normal(8)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["z"], name="fc3"),
             helper.make_node("Add", ["z", "x"], ["y"]) if skip else helper.make_node("Identity", ["z"], ["y"]),
             helper.make_node("Identity", ["x"], ["xp"]),
             helper.make_node("Identity", ["c0"], ["c"])]
    inits = [init(n, np.asarray(a, np.float32)) for n, a in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3), ("c0", np.ones(8)))]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8]), vi("xp", ["N", 8]), vi("c", [8])], inits)


def _feeds(n=5, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}


# ---------------------------------------------------------------- A: outputs cut off from the inputs

@pytest.mark.parametrize("options", [{}, {"dry_run": True}, {"effective": False}])
def test_an_emptied_layer_on_every_path_is_reported(options):
    m, r = prune(_gemm_mlp(), 0.5, method="global", **options)
    assert r.collapsed_outputs == {"y": ["w2"]}  # not 'xp' (an input passed through), not 'c' (a constant)
    assert ("output 'y' no longer depends on the inputs: layer 'w2' has no weight left (every path from the inputs "
            "to 'y' crosses an emptied layer)") in "\n".join(r.warnings)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["collapsed_outputs"] == {"y": ["w2"]}
    if not options:
        y = run(m, _feeds())[0]
        assert np.all(y == y[0])  # the claim holds: constant whatever the input


def test_a_skip_connection_around_the_emptied_layer_keeps_the_output():
    m, r = prune(_gemm_mlp(skip=True), 0.5, method="global")
    assert r.collapsed_outputs == {}
    assert not any("no longer depend" in w for w in r.warnings)


def test_an_excluded_or_dense_layer_is_no_collapse():
    _, r = prune(_gemm_mlp(), 0.5, method="global", exclude=("w2",))
    assert r.collapsed_outputs == {} and not any("no longer depend" in w for w in r.warnings)
    _, r = prune(_gemm_mlp(w2_scale=1.0), 0.5, method="global")  # fc2 keeps weights: every output lives
    assert r.collapsed_outputs == {}


def test_an_output_that_never_depended_on_the_inputs_is_not_reported():
    # w1 is all zeros in the dense model: 'y' was constant before pruning already
    model = _gemm_mlp()
    t = next(t for t in model.graph.initializer if t.name == "w1")
    t.CopyFrom(init("w1", np.zeros((8, 16), np.float32)))
    _, r = prune(model, 0.5, method="global")
    assert r.collapsed_outputs == {}


def test_a_layer_left_without_weights_on_the_reached_units_is_named():
    """fc1 keeps only hidden units 0-7; fc2's weights from those units are the smallest and go, its weights from
    units 8-15 (which no input reaches any more) remain: fc2 still cuts every path."""
    rng = np.random.default_rng(3)
    model = _gemm_mlp()
    w1 = rng.standard_normal((8, 16)) + 3.0
    w1[:, 8:] *= 1e-4
    w2 = rng.standard_normal((16, 8)) + 3.0
    w2[:8] *= 1e-3
    for t in model.graph.initializer:
        if t.name in ("w1", "w2"):
            t.CopyFrom(init(t.name, np.asarray(w1 if t.name == "w1" else w2, np.float32)))
    _, r = prune(model, 0.45, method="global", dry_run=True)
    assert r.collapsed_outputs == {"y": ["w2"]}
    assert "layer 'w2' has no weight left on the units the inputs still reach" in "\n".join(r.warnings)


def _cnn(second_scale=1e-3, seed=0):
    """conv1 3x3 (pad 1) -> Relu -> conv2 3x3 (pad 1) -> Relu -> GAP -> Flatten -> fc -> y, and a second head
    'aux' = GAP(conv1's Relu) that does not cross conv2."""
    rng = np.random.default_rng(seed)
    c1, c2 = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal((6, 6, 3, 3)) * second_scale
    fc = rng.standard_normal((6, 4))
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2", "c2b"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc"),
             helper.make_node("GlobalAveragePool", ["r1"], ["aux"])]
    inits = [init(n, np.asarray(a, np.float32)) for n, a in
             (("c1", c1), ("c1b", rng.standard_normal(6)), ("c2", c2), ("c2b", rng.standard_normal(6)),
              ("fc", fc), ("fcb", rng.standard_normal(4)))]
    return make_model(nodes, [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 4]), vi("aux", ["N", 6, 1, 1])], inits)


def test_cnn_emptied_conv_is_reported_for_its_output_only():
    m, r = prune(_cnn(), 0.75, method="global")
    assert r.collapsed_outputs == {"y": ["c2"]}  # 'aux' does not cross conv2
    x = np.random.default_rng(2).standard_normal((3, 2, 5, 5)).astype(np.float32)
    y, aux = run(m, {"x": x})
    assert np.all(y == y[0]) and not np.all(aux == aux[0])
    _, r = prune(_cnn(second_scale=1.0), 0.75, method="global")
    assert r.collapsed_outputs == {}


def test_the_cli_warns_and_reports_without_validation(tmp_model, tmp_path):
    path = tmp_model(_gemm_mlp())
    res = invoke(path, "--method", "global", "-s", "0.5", "--no-validate", "--json", "-q",
                 "-o", tmp_path / "out.onnx")
    d = json.loads(res.stdout)
    assert d["collapsed_outputs"] == {"y": ["w2"]}
    assert any("output 'y' no longer depends on the inputs" in w for w in d["warnings"])


# ---------------------------------------------------------------- B: parameters inside subgraphs

def _vad_like():
    """Every weight inside If branches (a Constant node in one, a subgraph initializer in the other), as in
    Silero VAD: the main graph holds no float tensor at all."""
    rng = np.random.default_rng(0)
    wa = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "wa")
    wb = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "wb")
    ba = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "ba")
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["wa_c"], value=wa), helper.make_node("Constant", [], ["ba_c"], value=ba),
         helper.make_node("MatMul", ["x", "wa_c"], ["ya"]), helper.make_node("Add", ["ya", "ba_c"], ["yt"])],
        "then", [], [vi("yt", ["N", 8])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "wb"], ["ye"])], "else", [], [vi("ye", ["N", 8])],
                               [wb])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", ["N", 16]), vi("cond", [], TensorProto.BOOL)], [vi("y", ["N", 8])])


def test_parameters_count_the_weights_inside_subgraphs(tmp_model, tmp_path):
    model = _vad_like()
    f = figures(model)
    assert f["params_prunable"] == 256 and f["params_total"] == 16 * 8 * 2 + 8
    pruned, r = prune(model, 0.5)
    assert sum(l.params for l in r.layers) == 256  # the report counts the subgraph weights ...
    assert figures(pruned)["params_total"] == 264  # ... and so does the payoff figure
    res = invoke(tmp_model(model), "-s", "0.5", "--no-validate", "--json", "-q", "-o", tmp_path / "out.onnx")
    d = json.loads(res.stdout)
    assert d["figures"]["before"]["params_total"] == 264 and d["figures"]["after"]["params_total"] == 264


# ---------------------------------------------------------------- C: removal reaches its fixed point in one run

def _tensors(model):
    out = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    for n in model.graph.node:
        for a in n.attribute:
            if a.name == "value":
                out[n.output[0]] = numpy_helper.to_array(a.t).tobytes()
    return out


def _chain_mlp():
    """Hidden unit 0 of fc1 has no incoming weight (a constant): folded into fc2's bias, after which it reaches
    nothing and its own bias entry is dead; a second removal pass used to find that."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((8, 6)), rng.standard_normal(6) + 1
    w1[:, 0] = 0
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3")]
    inits = [init(n, np.asarray(a, np.float32)) for n, a in
             (("w1", w1), ("b1", b1), ("w2", rng.standard_normal((6, 5))), ("b2", rng.standard_normal(5)),
              ("w3", rng.standard_normal((5, 3))), ("b3", rng.standard_normal(3)))]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 3])], inits)


def _chain_cnn():
    """conv1 (3x3, padded) channel 2 has no weight: a constant that the 1x1 conv2 folds into its bias; the next
    analysis then finds conv1's channel 2 reaching nothing (its bias entry dead)."""
    rng = np.random.default_rng(2)
    c1 = rng.standard_normal((4, 2, 3, 3))
    c1[2] = 0
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2", "c2b"], ["a2"], name="conv2"),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc")]
    inits = [init(n, np.asarray(a, np.float32)) for n, a in
             (("c1", c1), ("c1b", rng.standard_normal(4) + 1), ("c2", rng.standard_normal((5, 4, 1, 1))),
              ("c2b", rng.standard_normal(5)), ("fc", rng.standard_normal((5, 3))), ("fcb", rng.standard_normal(3)))]
    return make_model(nodes, [vi("x", ["N", 2, 6, 6])], [vi("y", ["N", 3])], inits)


def _twice(model, sparsity, **options):
    first, r1 = prune(model, sparsity, **options)
    t = r1.totals()
    second, r2 = prune(first, t["zeros_after"] / t["params"], **options)
    return first, r1, second, r2


@pytest.mark.parametrize("build, sparsity, options", [
    (_chain_mlp, 0.0, {}), (_chain_mlp, 0.3, {}), (_chain_cnn, 0.0, {}), (_chain_cnn, 0.4, {"method": "global"}),
    (lambda: onnx.load(sample("cnn")[0]), 0.8, {"method": "global"}),
    (lambda: onnx.load(sample("mlp_gemm")[0]), 0.9, {"method": "global"}),
])
def test_one_run_reaches_the_fixed_point(build, sparsity, options):
    model = build()
    first, r1, second, r2 = _twice(model, sparsity, **options)
    assert _tensors(second) == _tensors(first)  # the second run changes no tensor ...
    assert r2.connectivity["removal"]["biases_changed"] == []  # ... nor claims to
    assert r2.connectivity["removal"]["passes"] == 1 and r1.connectivity["removal"]["fixed_point"] is True
    # counts stay exact: the report's zeros are the written tensors' zeros
    written = _tensors(first)
    for row in r1.layers:
        t = next(t for t in first.graph.initializer if t.name == row.name)
        assert int(np.count_nonzero(numpy_helper.to_array(t) == 0)) == row.zeros_after, row.name
        assert written[row.name]
    # deterministic: the same input and options give the same bytes
    assert prune(model, sparsity, **options)[0].SerializeToString() == first.SerializeToString()


@pytest.mark.parametrize("build", [_chain_mlp, _chain_cnn])
def test_the_dead_bias_entry_goes_in_the_first_run_and_outputs_hold(build):
    model = build()
    first, r1 = prune(model, 0.0)
    bias = {"fc1": "b1", "conv1": "c1b"}[model.graph.node[0].name]
    assert numpy_helper.to_array(next(t for t in first.graph.initializer if t.name == bias))[
        0 if bias == "b1" else 2] == 0
    removal = r1.connectivity["removal"]
    assert removal["passes"] >= 2 and removal["folded_constant_inputs"] > 0
    x = {"x": np.random.default_rng(5).standard_normal(
        (4, 8) if bias == "b1" else (4, 2, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(first, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_a_product_of_activations_is_no_claim():
    """A @ V with V's layer emptied: V is its bias (a constant), but A @ V still follows the input. The unit
    analysis keeps V's side of such a product, so no collapse is claimed there."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a0"]), helper.make_node("Relu", ["a0"], ["a"]),
             helper.make_node("MatMul", ["x", "wv"], ["v0"]), helper.make_node("Add", ["v0", "bv"], ["v"]),
             helper.make_node("MatMul", ["a", "v"], ["y"])]
    inits = [init("wa", rng.standard_normal((8, 4)).astype(np.float32)),
             init("wv", (rng.standard_normal((8, 6)) * 1e-3).astype(np.float32)),
             init("bv", rng.standard_normal(6).astype(np.float32))]
    model = make_model(nodes, [vi("x", ["N", 4, 8])], [vi("y", ["N", 4, 6])], inits)
    m, r = prune(model, 0.6, method="global")
    assert next(l for l in r.layers if l.name == "wv").zeros_after == 48  # emptied
    assert r.collapsed_outputs == {}
    y = run(m, {"x": np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32)})[0]
    assert not np.all(y == y[0])


def test_an_output_cut_off_under_a_gate_is_exit_4(tmp_model, tmp_path):
    """An emptied layer on every path to an output: a warning always, exit 4 (nothing written) under a gate."""
    path = tmp_model(_gemm_mlp())
    out = tmp_path / "out.onnx"
    res = invoke(path, "--method", "global", "-s", "0.5", "--max-rel-error", "10", "-o", out)
    assert res.exit_code == 4, res.output
    assert "cuts output(s) 'y' (w2) off from the inputs" in res.stderr and not out.exists()


def _read_besides(kind):
    """x -> W1 -> Relu -> W2 -> y with W2's row 0 tiny (pruned: unit 0 of h reaches no output through W2), W1 also
    read besides its layer: a graph output, a Mul -> ReduceSum term, W1 @ W1, or a tied embedding (ids -> Gather(E) -> Wa
    with Wa's unit 0 tiny -> Relu -> MatMul with E^T: E's column 0 meets a constant input)."""
    rng = np.random.default_rng(0)
    if kind == "tied":
        E = (rng.standard_normal((12, 4)) + 2).astype(np.float32)
        wa = (rng.standard_normal((4, 4)) + 2).astype(np.float32)
        wa[:, 0] = 1e-3
        nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "wa"], ["a"]),
                 helper.make_node("Relu", ["a"], ["h"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
                 helper.make_node("MatMul", ["h", "Et"], ["z"]), helper.make_node("Add", ["z", "hb"], ["y"])]
        model = make_model(nodes, [vi("ids", ["N", 5], TensorProto.INT64)], [vi("y", ["N", 5, 12])],
                           [init("E", E), init("wa", wa), init("hb", np.full(12, 0.1, np.float32))])
        return model, {"ids": rng.integers(0, 12, (6, 5)).astype(np.int64)}
    w1 = (rng.standard_normal((4, 4)) + 2).astype(np.float32)
    w2 = rng.standard_normal((4, 3)).astype(np.float32)
    w2[0] = 1e-3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    outs = [vi("y", ["N", 3])]
    if kind == "output":
        nodes.append(helper.make_node("Identity", ["w1"], ["w1_out"]))
        outs.append(vi("w1_out", [4, 4]))
    elif kind == "self":  # W1 @ W1: the node is W1's layer on one input and reads W1 as data on the other
        nodes.append(helper.make_node("MatMul", ["w1", "w1"], ["w11"]))
        outs.append(vi("w11", [4, 4]))
    else:
        nodes += [helper.make_node("Mul", ["w1", "w1"], ["sq"]), helper.make_node("ReduceSum", ["sq"], ["l2"],
                                                                                 keepdims=0)]
        outs.append(vi("l2", []))
    model = make_model(nodes, [vi("x", ["N", 4])], outs, [init("w1", w1), init("w2", w2)])
    return model, {"x": rng.standard_normal((6, 4)).astype(np.float32)}


@pytest.mark.parametrize("kind", ["output", "mul", "self", "tied"])
def test_removal_leaves_a_weight_read_besides_its_layer(kind):
    """Units dead for a weight's layer may live for its other reader: removal leaves such a weight as selected
    and its effective count claims none of it dead (before: a graph output of W1 moved by 2.1, a tied
    embedding's logits by 42)."""
    model, feeds = _read_besides(kind)
    on, rep = prune(model, 0.5, method="global")
    off, _ = prune(model, 0.5, method="global", effective=False)
    for a, b in zip(run(on, feeds), run(off, feeds)):
        np.testing.assert_array_equal(a, b)
    name = "E" if kind == "tied" else "w1"
    row = next(r for r in rep.layers if r.name == name)
    assert row.zeros_after == row.zeros_after_selection == row.effective_zeros
    assert name in rep.connectivity["layers_not_analysed"]
