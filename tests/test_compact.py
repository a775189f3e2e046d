"""Compaction: dead channels physically removed, outputs unchanged, shapes shrink only where they may."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.compact import compact
from onnxprune.data import input_specs, synthesize
from tests.conftest import init, make_model, run, sample, vi

RNG = np.random.default_rng(0)
SHAPES = {"cnn": {"x": [3, 1, 8, 8]}, "cnn_torch": {"x": [3, 1, 8, 8]}, "mlp_gemm": {"x": [3, 64]},
          "mlp_matmul": {"x": [3, 64]}, "detector": {"images": [2, 3, 32, 32]},
          "encoder": {"input_ids": [2, 7], "attention_mask": [2, 7]}, "vad": {"input": [2, 64], "state": [2, 2, 32]},
          "segmenter": {"x": [2, 1, 16, 16]}}


def _path(name):
    import os
    return sample(name)[0] if name in ("cnn", "cnn_torch", "mlp_gemm", "mlp_matmul") else \
        os.path.join(os.path.dirname(sample("cnn")[0]), f"{name}.onnx")


def _feeds(model, shapes, seed=1):
    return synthesize(input_specs(model), 2, 1, seed, shapes, model=model).batches[0]


def _same(a, b, feeds, atol=1e-5):
    ya, yb = run(a, feeds), run(b, feeds)
    assert len(ya) == len(yb)
    for p, q in zip(ya, yb):
        assert p.shape == q.shape and p.dtype == q.dtype
        np.testing.assert_allclose(q.astype(np.float64), p.astype(np.float64), rtol=1e-4, atol=atol)


def _io(model):
    return [i.SerializeToString() for i in model.graph.input] + [o.SerializeToString() for o in model.graph.output]


def _w(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _check(model):
    onnx.checker.check_model(model, full_check=True)


CASES = [(n, m) for n in ("cnn", "cnn_torch", "mlp_gemm", "mlp_matmul") for m in ("lamp", "global", "uniform")] + \
        [(n, m) for n in ("detector", "encoder", "vad", "segmenter") for m in ("lamp", "erk")]


@pytest.mark.parametrize("name,method", CASES)
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_sample_models_compact_exactly(name, method, sparsity):
    pruned, _ = onnxprune.prune(_path(name), sparsity, method=method)
    before = pruned.SerializeToString()
    res = compact(pruned)
    assert pruned.SerializeToString() == before  # copied, not modified
    _check(res.model)
    assert _io(res.model) == _io(pruned)
    _same(pruned, res.model, _feeds(pruned, SHAPES[name]))
    assert res.params_after <= res.params_before
    shrunk = sum(l.params_before - l.params_after for l in res.layers)
    assert shrunk == res.params_before - res.params_after
    if name in ("cnn", "cnn_torch", "mlp_gemm", "mlp_matmul", "segmenter", "detector") and sparsity == 0.99:
        assert res.channels_removed > 0 and res.params_after < res.params_before
    assert len(res.model.SerializeToString()) <= len(before) or res.params_after == res.params_before


def _conv(name, x, w, y, b=None, **kw):
    inputs = [x, name + ".w"] + ([name + ".b"] if b is not None else [])
    return helper.make_node("Conv", inputs, [y], name=name, **kw)


def _conv_inits(name, w, b=None):
    out = [init(name + ".w", w.astype(np.float32))]
    if b is not None:
        out.append(init(name + ".b", np.asarray(b, dtype=np.float32)))
    return out


def test_residual_add_drops_a_channel_only_when_every_branch_drops_it():
    w1 = RNG.standard_normal((4, 3, 1, 1))
    w2 = RNG.standard_normal((4, 3, 1, 1))
    w3 = RNG.standard_normal((5, 4, 3, 3))
    w1[0] = 0  # branch 1 alone drops channel 0: the other branch still feeds it
    w1[1] = w2[1] = 0  # both branches drop channel 1
    nodes = [_conv("c1", "x", w1, "y1"), _conv("c2", "x", w2, "y2"), helper.make_node("Add", ["y1", "y2"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]), _conv("c3", "r", w3, "y", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5, 6, 6])],
                   _conv_inits("c1", w1) + _conv_inits("c2", w2) + _conv_inits("c3", w3))
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "c1.w").shape == (3, 3, 1, 1) and _w(res.model, "c2.w").shape == (3, 3, 1, 1)
    assert _w(res.model, "c3.w").shape == (5, 3, 3, 3)
    np.testing.assert_array_equal(_w(res.model, "c1.w")[0], 0)  # channel 0 kept in the zeroed branch
    _same(m, res.model, {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)})


def test_concat_split_slice_offsets():
    wa, wb = RNG.standard_normal((4, 2, 1, 1)), RNG.standard_normal((4, 2, 1, 1))
    wa[1] = wa[3] = 0
    wb[2] = 0
    wc, wd, we = (RNG.standard_normal((2, c, 3, 3)) for c in (3, 5, 4))
    nodes = [_conv("a", "x", wa, "ya"), _conv("b", "x", wb, "yb"),
             helper.make_node("Concat", ["ya", "yb"], ["cat"], axis=1),
             helper.make_node("Split", ["cat", "sizes"], ["s1", "s2"], axis=1),
             helper.make_node("Slice", ["cat", "st", "en", "ax"], ["sl"]),
             _conv("c", "s1", wc, "o1", pads=[1, 1, 1, 1]), _conv("d", "s2", wd, "o2", pads=[1, 1, 1, 1]),
             _conv("e", "sl", we, "o3", pads=[1, 1, 1, 1])]
    inits = (_conv_inits("a", wa) + _conv_inits("b", wb) + _conv_inits("c", wc) + _conv_inits("d", wd)
             + _conv_inits("e", we) + [init("sizes", np.array([3, 5], np.int64)), init("st", np.array([2], np.int64)),
                                       init("en", np.array([6], np.int64)), init("ax", np.array([1], np.int64))])
    outs = [vi(o, ["N", 2, 5, 5]) for o in ("o1", "o2", "o3")]
    m = make_model(nodes, [vi("x", ["N", 2, 5, 5])], outs, inits)
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "a.w").shape[0] == 2 and _w(res.model, "b.w").shape[0] == 3
    assert _w(res.model, "c.w").shape[1] == 2 and _w(res.model, "d.w").shape[1] == 3 and _w(res.model, "e.w").shape[1] == 3
    split = next(n for n in res.model.graph.node if n.op_type == "Split")
    sl = next(n for n in res.model.graph.node if n.op_type == "Slice")
    consts = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert consts[split.input[1]].tolist() == [2, 3]
    assert consts[sl.input[1]].tolist() == [1] and consts[sl.input[2]].tolist() == [4]
    _same(m, res.model, {"x": RNG.standard_normal((2, 2, 5, 5)).astype(np.float32)})


def _bn_inits(name, c, shift=0.3):
    return [init(f"{name}.s", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{name}.b", np.full(c, shift, np.float32)),
            init(f"{name}.m", RNG.standard_normal(c).astype(np.float32) * 0.1),
            init(f"{name}.v", RNG.uniform(0.5, 1.5, c).astype(np.float32))]


def _bn(name, x, y):
    return helper.make_node("BatchNormalization", [x, f"{name}.s", f"{name}.b", f"{name}.m", f"{name}.v"], [y])


def test_depthwise_with_multiplier_updates_group_and_grouped_conv_keeps_channels():
    w1 = RNG.standard_normal((8, 3, 3, 3))
    dw = RNG.standard_normal((16, 1, 3, 3))
    w2 = RNG.standard_normal((6, 16, 1, 1))
    w1[3] = 0  # constant (BN shift) through the depthwise conv: only its readers' zero weights let it go
    w2[:, 6:8] = 0
    w1[5] = 0  # read with non-zero weights after a padded depthwise conv: stays
    gw = RNG.standard_normal((4, 3, 3, 3))  # group 2 over 6 channels
    nodes = [_conv("c1", "x", w1, "y1", pads=[1, 1, 1, 1]), _bn("bn", "y1", "b1"), helper.make_node("Relu", ["b1"], ["a1"]),
             _conv("dw", "a1", dw, "y2", pads=[1, 1, 1, 1], group=8), _conv("c2", "y2", w2, "y3"),
             helper.make_node("Relu", ["y3"], ["a3"]), _conv("g", "a3", gw, "y", pads=[1, 1, 1, 1], group=2)]
    m = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])],
                   _conv_inits("c1", w1) + _bn_inits("bn", 8) + _conv_inits("dw", dw) + _conv_inits("c2", w2)
                   + _conv_inits("g", gw))
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    w2z = w2.copy()
    w2z[0] = 0  # c2's output 0 feeds a grouped conv: kept
    m2.graph.initializer[[t.name for t in m2.graph.initializer].index("c2.w")].CopyFrom(init("c2.w", w2z.astype(np.float32)))
    for model in (m, m2):
        res = compact(model)
        _check(res.model)
        assert _w(res.model, "c1.w").shape[0] == 7
        assert _w(res.model, "dw.w").shape == (14, 1, 3, 3)
        dwn = next(n for n in res.model.graph.node if n.name == "dw")
        assert helper.get_attribute_value(next(a for a in dwn.attribute if a.name == "group")) == 7
        assert _w(res.model, "bn.s").shape == (7,)
        assert _w(res.model, "c2.w").shape == (6, 14, 1, 1)
        assert _w(res.model, "g.w").shape == (4, 3, 3, 3)
        _same(model, res.model, {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)})


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape", "ReshapeMatMul"])
def test_flatten_into_gemm_removes_feature_groups_and_folds_constants(flatten):
    w1 = RNG.standard_normal((4, 1, 3, 3))
    b1 = RNG.standard_normal(4)
    w1[2] = 0
    b1[2] = 0.5  # a constant 0.5 after Relu: folded into the Gemm bias
    w1[0] = 0
    b1[0] = -1.0  # Relu(-1) = 0: nothing to fold
    fc = RNG.standard_normal((5, 64))
    fb = RNG.standard_normal(5)
    nodes = [_conv("c1", "x", w1, "y1", b=b1, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y1"], ["a1"])]
    inits = _conv_inits("c1", w1, b1)
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["a1"], ["f"], axis=1))
    else:
        nodes.append(helper.make_node("Reshape", ["a1", "shape"], ["f"]))
        inits.append(init("shape", np.array([-1, 64], np.int64)))
    if flatten == "ReshapeMatMul":
        nodes += [helper.make_node("MatMul", ["f", "fc.w"], ["z"]), helper.make_node("Add", ["z", "fc.b"], ["y"])]
        inits += [init("fc.w", fc.T.astype(np.float32)), init("fc.b", fb.astype(np.float32))]
    else:
        nodes.append(helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1, alpha=0.5, beta=2.0))
        inits += [init("fc.w", fc.astype(np.float32)), init("fc.b", fb.astype(np.float32))]
    m = make_model(nodes, [vi("x", ["N", 1, 4, 4])], [vi("y", ["N", 5])], inits)
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "c1.w").shape == (2, 1, 3, 3)
    assert _w(res.model, "fc.w").shape == ((5, 32) if flatten != "ReshapeMatMul" else (32, 5))
    if flatten != "Flatten":
        shape = next(n for n in res.model.graph.node if n.op_type == "Reshape").input[1]
        assert _w(res.model, shape).tolist() == [-1, 32]
    assert res.folded_into
    _same(m, res.model, {"x": RNG.standard_normal((3, 1, 4, 4)).astype(np.float32)})


@pytest.mark.parametrize("pads,removed", [([1, 1, 1, 1], False), ([0, 0, 0, 0], True)])
def test_constant_channel_into_conv_folds_only_without_padding(pads, removed):
    w1 = RNG.standard_normal((3, 2, 1, 1))
    w1[1] = 0
    w2 = RNG.standard_normal((4, 3, 3, 3))
    nodes = [_conv("c1", "x", w1, "y1", b=[0.1, 0.7, -0.2]), helper.make_node("Relu", ["y1"], ["a1"]),
             _conv("c2", "a1", w2, "y", pads=pads)]
    hw = 5 if pads[0] else 3
    m = make_model(nodes, [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 4, hw, hw])],
                   _conv_inits("c1", w1, [0.1, 0.7, -0.2]) + _conv_inits("c2", w2))
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "c2.w").shape[1] == (2 if removed else 3)
    if removed:
        assert len(next(n for n in res.model.graph.node if n.name == "c2").input) == 3  # a bias was added
    _same(m, res.model, {"x": RNG.standard_normal((2, 2, 5, 5)).astype(np.float32)})


def _mlp(w1, w2, b1=None):
    nodes = [helper.make_node("Gemm", ["x", "w1"] + (["b1"] if b1 is not None else []), ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    inits = [init("w1", w1.astype(np.float32)), init("w2", w2.astype(np.float32))]
    if b1 is not None:
        inits.append(init("b1", b1.astype(np.float32)))
    return make_model(nodes, [vi("x", ["N", w1.shape[1]])], [vi("y", ["N", w2.shape[0]])], inits)


def test_align_keeps_the_highest_norm_dead_channels():
    w1 = RNG.standard_normal((16, 8))
    w2 = RNG.standard_normal((4, 16))
    dead = [1, 4, 6, 9, 13]  # unread: their (non-zero) rows can go
    w2[:, dead] = 0
    w1[dead] *= np.array([1.0, 5.0, 2.0, 3.0, 0.5])[:, None] / np.linalg.norm(w1[dead], axis=1, keepdims=True)
    m = _mlp(w1, w2)
    free = compact(m)
    assert _w(free.model, "w1").shape == (11, 8)
    res = compact(m, align=4)
    _check(res.model)
    w = _w(res.model, "w1")
    assert w.shape == (12, 8)
    assert any(np.allclose(row, w1[4]) for row in w)  # the highest-norm dead row is the one kept
    assert not any(np.allclose(row, w1[13]) for row in w)
    _same(m, res.model, {"x": RNG.standard_normal((5, 8)).astype(np.float32)})
    assert _w(compact(m, align=16).model, "w1").shape == (16, 8)  # 16 is the only multiple: nothing removed
    with pytest.raises(ValueError):
        compact(m, align=0)


def test_never_removes_every_channel_and_keeps_graph_io():
    w1 = np.zeros((6, 4))
    w2 = RNG.standard_normal((3, 6))
    m = _mlp(w1, w2)
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "w1").shape == (1, 4)
    assert _io(res.model) == _io(m)
    _same(m, res.model, {"x": RNG.standard_normal((2, 4)).astype(np.float32)})


def test_unknown_op_keeps_the_channels_it_reads():
    w1 = RNG.standard_normal((6, 4))
    w1[2] = 0
    w2 = RNG.standard_normal((3, 6))
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Hardmax", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    m = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])],
                   [init("w1", w1.astype(np.float32)), init("w2", w2.astype(np.float32))])
    res = compact(m)
    assert _w(res.model, "w1").shape == (6, 4) and res.kept_by.get("Hardmax") == 6 and res.channels_removed == 0


def test_dry_run_reports_without_changing_and_results_are_deterministic():
    pruned, _ = onnxprune.prune(sample("cnn")[0], 0.99, method="global")
    data = pruned.SerializeToString()
    dry = compact(pruned, apply_changes=False)
    assert pruned.SerializeToString() == data and not dry.applied
    a, b = compact(pruned), compact(pruned)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.to_dict() == {**dry.to_dict(), "applied": True, "folded_into": a.folded_into}
    assert a.channels_removed > 0
    again = compact(a.model)  # idempotent: nothing dead is left
    assert again.channels_removed == 0 and again.layers == []


def test_value_info_is_updated():
    pruned, _ = onnxprune.prune(sample("cnn_torch")[0], 0.99, method="global")
    inferred = onnx.shape_inference.infer_shapes(pruned)
    assert len(inferred.graph.value_info) > 0
    res = compact(inferred)
    _check(res.model)
    again = onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in again.graph.value_info}
    checked = 0
    for v in res.model.graph.value_info:
        if v.name in dims:
            assert [d.dim_value for d in v.type.tensor_type.shape.dim] == dims[v.name]
            checked += 1
    assert checked > 0
    assert res.channels_removed > 0


def transformer_block(d=16, ff=32, seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def lin(name, x, k, n, y):
        inits.extend([init(name + ".w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)),
                      init(name + ".b", rng.standard_normal(n).astype(np.float32) * 0.1)])
        nodes.extend([helper.make_node("MatMul", [x, name + ".w"], [name + ".mm"]),
                      helper.make_node("Add", [name + ".mm", name + ".b"], [y])])
    inits += [init("ln1.s", np.ones(d, np.float32)), init("ln1.b", np.zeros(d, np.float32)),
              init("ln2.s", rng.uniform(0.5, 1.5, d).astype(np.float32)), init("ln2.b", np.zeros(d, np.float32)),
              init("scale", np.array(1 / np.sqrt(d), np.float32))]
    nodes.append(helper.make_node("LayerNormalization", ["x", "ln1.s", "ln1.b"], ["n1"], axis=-1))
    lin("q", "n1", d, d, "q")
    lin("k", "n1", d, d, "k")
    lin("v", "n1", d, d, "v")
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["att"])]
    lin("o", "att", d, d, "o")
    nodes += [helper.make_node("Add", ["x", "o"], ["r1"]),
              helper.make_node("LayerNormalization", ["r1", "ln2.s", "ln2.b"], ["n2"], axis=-1)]
    lin("ff1", "n2", d, ff, "h")
    nodes.append(helper.make_node("Relu", ["h"], ["g"]))
    lin("ff2", "g", ff, d, "f")
    nodes.append(helper.make_node("Add", ["r1", "f"], ["y"]))
    return make_model(nodes, [vi("x", ["B", "L", d])], [vi("y", ["B", "L", d])], inits)


@pytest.mark.parametrize("method", ["lamp", "uniform"])
def test_transformer_block(method):
    m = transformer_block()
    feeds = {"x": RNG.standard_normal((2, 5, 16)).astype(np.float32)}
    for s in (0.9, 0.99):
        pruned, _ = onnxprune.prune(m, s, method=method)
        res = compact(pruned)
        _check(res.model)
        assert _io(res.model) == _io(m)
        _same(pruned, res.model, feeds)
    # FFN neurons with zero input weights carry relu(bias): folded into the next layer's Add bias
    w = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    w["ff1.w"][:, :10] = 0
    w["v.w"][:, 3] = 0
    w["o.w"][3, :] = 0
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(w[t.name], t.name))
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "ff1.w").shape == (16, 22) and _w(res.model, "ff2.w").shape == (22, 16)
    assert _w(res.model, "v.w").shape == (16, 15) and _w(res.model, "o.w").shape == (15, 16)
    assert _w(res.model, "q.w").shape == (16, 16)  # q and k meet in q @ k^T: kept
    _same(m, res.model, feeds)


def test_constant_node_weights_and_biases_behind_identity():
    pruned, _ = onnxprune.prune(sample("mlp_gemm")[0], 0.99, method="global")
    g = pruned.graph
    front = []
    for t in list(g.initializer):
        front += [helper.make_node("Constant", [], [t.name + "_c"], value=t),
                  helper.make_node("Identity", [t.name + "_c"], [t.name])]
    del g.initializer[:]
    nodes = front + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    res = compact(pruned)
    _check(res.model)
    assert res.channels_removed > 0
    # the replaced biases' Constant/Identity pairs are gone; the weights were rewritten where they live
    outs = {o for n in res.model.graph.node for o in n.output}
    assert "fc1.bias" not in outs and "fc1.weight" in outs
    _same(pruned, res.model, {"x": RNG.standard_normal((3, 64)).astype(np.float32)})


def test_float16_model():
    w1 = RNG.standard_normal((8, 16)).astype(np.float16)
    w2 = RNG.standard_normal((16, 4)).astype(np.float16)
    w2[3:9] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 8], TensorProto.FLOAT16)], [vi("y", ["N", 4], TensorProto.FLOAT16)],
                   [init("w1", w1), init("w2", w2)])
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "w1").shape == (8, 10) and _w(res.model, "w1").dtype == np.float16
    _same(m, res.model, {"x": RNG.standard_normal((2, 8)).astype(np.float16)}, atol=1e-2)


def test_figures_sizes_params_and_macs(tmp_path):
    import gzip
    import os
    from onnxprune.figures import figures, ratios
    path = sample("cnn")[0]
    f = figures(path, {"x": [1, 1, 8, 8]})
    data = open(path, "rb").read()
    assert f["file_bytes"] == os.path.getsize(path)
    assert f["gzip_bytes"] == len(gzip.compress(data, compresslevel=6, mtime=0))
    # conv1 16x(1x3x3) at 8x8, depthwise 16x(1x3x3) at 8x8, pointwise 16x16 at 8x8, branch 8x(16x3x3) at 8x8, fc
    assert f["macs_per_layer"] == {"conv1.weight": 9216, "dw.weight": 9216, "pw.weight": 16384,
                                   "branch.weight": 73728, "fc1.weight": 12288, "fc2.weight": 320}
    assert f["macs"] == 121152 and f["macs_complete"] and f["batch"] == 1
    assert f["params_prunable"] == f["nonzero_prunable"] == 14304 and f["params_total"] > 14304
    assert figures(path, {"x": [4, 1, 8, 8]})["macs"] == 121152  # per sample
    pruned, _ = onnxprune.prune(path, 0.9, method="global")
    res = compact(pruned)
    p = figures(res.model, {"x": [1, 1, 8, 8]})
    assert p["params_prunable"] == res.params_after and p["macs"] < f["macs"]
    z = figures(pruned, {"x": [1, 1, 8, 8]})  # zero-filled, not compacted: same size, smaller gzip
    assert z["nonzero_prunable"] < z["params_prunable"] == 14304 and z["gzip_bytes"] < 0.5 * f["gzip_bytes"]
    assert figures(pruned, {"x": [1, 1, 8, 8]}) == z  # deterministic
    r = ratios(f, p)
    assert 0 < r["macs"] < 1 and 0 < r["file_bytes"] < 1
    det = figures(_path("detector"))  # dynamic H, W unknown: no MACs
    assert det["macs"] is None and not det["macs_complete"] and set(det["macs_per_layer"].values()) == {None}
    det = figures(_path("detector"), {"images": [1, 3, 32, 32]})
    assert det["macs_complete"] and det["macs"] > 0


def test_compact_loaded_keeps_external_tensors_external(tmp_path):
    import os
    from onnxprune.compact import compact_loaded
    from onnxprune.io import load_model, save_model
    pruned, _ = onnxprune.prune(sample("cnn")[0], 0.99, method="global")
    src = str(tmp_path / "in.onnx")
    onnx.save_model(pruned, src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.data",
                    size_threshold=0)
    loaded = load_model(src)
    n_external = len(loaded.external)
    res = compact_loaded(loaded)
    assert res.channels_removed > 0 and 0 < len(loaded.external) <= n_external
    out = str(tmp_path / "out.onnx")
    written = save_model(loaded, out)
    data = [p for p in written if p.endswith(".data")]
    assert len(data) == 1 and os.path.getsize(data[0]) < os.path.getsize(str(tmp_path / "in.data"))
    _same(src, out, {"x": RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)})


def test_constant_into_a_matmul_without_bias_gets_an_add():
    w1 = RNG.standard_normal((6, 8))
    w1[:, [1, 4]] = 0
    b1 = RNG.standard_normal(8)
    w2 = RNG.standard_normal((8, 3))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2")]
    m = make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 3])],
                   [init("w1", w1.astype(np.float32)), init("b1", b1.astype(np.float32)),
                    init("w2", w2.astype(np.float32))])
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "w1").shape == (6, 6) and _w(res.model, "w2").shape == (6, 3)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == ["MatMul", "Add", "Tanh", "MatMul", "Add"] and res.model.graph.node[-1].output[0] == "y"
    assert res.folded_into == ["mm2"]
    _same(m, res.model, {"x": RNG.standard_normal((4, 6)).astype(np.float32)})


def test_constant_into_a_matmul_that_also_loses_outputs_gets_an_add_of_the_kept_width():
    """The MatMul takes a removed channel's constant (a new Add) and loses one of its own output units: the new
    bias has the kept width (it had the original one, and the model failed shape inference)."""
    w1 = RNG.standard_normal((6, 8))
    w1[:, [1, 4]] = 0
    b1 = RNG.standard_normal(8)  # units 1 and 4 carry tanh(b1) constants into mm2
    w2 = RNG.standard_normal((8, 5))
    w2[:, 3] = 0  # mm2's output unit 3 is always 0 ...
    w3 = RNG.standard_normal((5, 2))  # ... and read by mm3 only: it goes
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("MatMul", ["t", "w2"], ["z"], name="mm2"),
             helper.make_node("Relu", ["z"], ["r"]), helper.make_node("MatMul", ["r", "w3"], ["y"], name="mm3")]
    m = make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 2])],
                   [init("w1", w1.astype(np.float32)), init("b1", b1.astype(np.float32)),
                    init("w2", w2.astype(np.float32)), init("w3", w3.astype(np.float32))])
    res = compact(m)
    _check(res.model)
    assert _w(res.model, "w2").shape == (6, 4) and _w(res.model, "w3").shape == (4, 2)
    added = next(n for n in res.model.graph.node if n.op_type == "Add" and n.output[0] == "z")
    assert _w(res.model, added.input[1]).shape == (4,)
    _same(m, res.model, {"x": RNG.standard_normal((4, 6)).astype(np.float32)})


def test_rewritten_tensors_keep_their_name_doc_string_and_metadata():
    w1 = RNG.standard_normal((6, 8))
    w1[:, [1, 4]] = 0
    w2 = RNG.standard_normal((8, 3))
    t1, t2 = init("w1", w1.astype(np.float32)), init("w2", w2.astype(np.float32))
    for t in (t1, t2):
        t.doc_string = f"doc of {t.name}"
        e = t.metadata_props.add()
        e.key, e.value = "origin", t.name
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 3])], [t1, t2])
    res = compact(m)
    assert _w(res.model, "w1").shape == (6, 6) and _w(res.model, "w2").shape == (6, 3)
    for t in res.model.graph.initializer:
        assert t.doc_string == f"doc of {t.name}" and [(e.key, e.value) for e in t.metadata_props] == [("origin", t.name)]
    _same(m, res.model, {"x": RNG.standard_normal((4, 6)).astype(np.float32)})
