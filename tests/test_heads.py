"""Attention heads as coupled channel groups: a multi-head block's Q/K/V output channels and the output
projection's input rows of one head are removed together (Reshape to heads, Q @ K^T, P @ V, back), exactly."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.channels import channel_plan
from onnxprune.compact import compact
from onnxprune.compact.labels import build
from onnxprune.graph import find_layers
from tests.conftest import init, make_model, run, vi

H, DH = 4, 4
D = H * DH


def mha_block(target="concat", seed=0, shape_reader=None, mask=True):
    """One post-LN encoder block as torch/HF export it: Q/K/V MatMul + Add bias, Reshape [B, S, H, DH] with a
    target ``target``: "concat" (Concat of Shape -> Gather pieces and constants H, DH, as torch writes it),
    "const" ([0, 0, H, DH]) or "infer" ([0, -1, H, DH]); K transposed to [B, H, DH, S], scores scaled, a
    [B, 1, 1, S] mask bias from an int64 mask, Softmax, P @ V, back to [B, S, D], output projection, residual,
    LayerNorm, FFN. ``shape_reader``: an extra output reading Shape(q)[k] (k = 2 reads the channel count)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def lin(name, x, k, n, y):
        inits.extend([init(name + ".w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)),
                      init(name + ".b", (rng.standard_normal(n) * 0.1).astype(np.float32))])
        nodes.extend([helper.make_node("MatMul", [x, name + ".w"], [name + ".mm"]),
                      helper.make_node("Add", [name + ".b", name + ".mm"], [y])])

    def const(name, vals):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(vals, dtype=np.int64), name + "_t")))

    def heads(x, y, tag):
        if target == "concat":
            const(tag + ".i0", 0)
            const(tag + ".i1", 1)
            const(tag + ".ax", [0])
            const(tag + ".h", [H])
            const(tag + ".dh", [DH])
            nodes.extend([helper.make_node("Shape", [x], [tag + ".shp"]),
                          helper.make_node("Gather", [tag + ".shp", tag + ".i0"], [tag + ".b"], axis=0),
                          helper.make_node("Gather", [tag + ".shp", tag + ".i1"], [tag + ".s"], axis=0),
                          helper.make_node("Unsqueeze", [tag + ".b", tag + ".ax"], [tag + ".b1"]),
                          helper.make_node("Unsqueeze", [tag + ".s", tag + ".ax"], [tag + ".s1"]),
                          helper.make_node("Concat", [tag + ".b1", tag + ".s1", tag + ".h", tag + ".dh"],
                                           [tag + ".tgt"], axis=0)])
        else:
            const(tag + ".tgt", [0, 0 if target == "const" else -1, H, DH])
        nodes.append(helper.make_node("Reshape", [x, tag + ".tgt"], [y]))

    inits += [init("ln.s", rng.uniform(0.5, 1.5, D).astype(np.float32)), init("ln.b", np.zeros(D, np.float32)),
              init("scale", np.array(np.sqrt(DH), np.float32)), init("one", np.array(1.0, np.float32)),
              init("big", np.array(-1e4, np.float32))]
    lin("q", "x", D, D, "q")
    lin("k", "x", D, D, "k")
    lin("v", "x", D, D, "v")
    heads("q", "q4", "rq")
    heads("k", "k4", "rk")
    heads("v", "v4", "rv")
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qh", "kh"], ["s0"]),
              helper.make_node("Div", ["s0", "scale"], ["s1"])]
    inputs = [vi("x", ["B", "S", D])]
    if mask:
        inputs.append(vi("mask", ["B", "S"], TensorProto.INT64))
        const("m.ax", [1, 2])
        nodes += [helper.make_node("Unsqueeze", ["mask", "m.ax"], ["m4"]),
                  helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "mf"], ["mi"]),
                  helper.make_node("Mul", ["mi", "big"], ["mb"]),
                  helper.make_node("Add", ["s1", "mb"], ["s"])]
    else:
        nodes.append(helper.make_node("Identity", ["s1"], ["s"]))
    nodes += [helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3])]
    if target == "concat":
        const("ro.i0", 0)
        const("ro.i1", 1)
        const("ro.ax", [0])
        const("ro.d", [D])
        nodes.extend([helper.make_node("Shape", ["ctx_t"], ["ro.shp"]),
                      helper.make_node("Gather", ["ro.shp", "ro.i0"], ["ro.b"], axis=0),
                      helper.make_node("Gather", ["ro.shp", "ro.i1"], ["ro.s"], axis=0),
                      helper.make_node("Unsqueeze", ["ro.b", "ro.ax"], ["ro.b1"]),
                      helper.make_node("Unsqueeze", ["ro.s", "ro.ax"], ["ro.s1"]),
                      helper.make_node("Concat", ["ro.b1", "ro.s1", "ro.d"], ["ro.tgt"], axis=0)])
    else:
        const("ro.tgt", [0, 0, D])
    nodes.append(helper.make_node("Reshape", ["ctx_t", "ro.tgt"], ["att"]))
    lin("o", "att", D, D, "o")
    nodes += [helper.make_node("Add", ["x", "o"], ["r1"]),
              helper.make_node("LayerNormalization", ["r1", "ln.s", "ln.b"], ["n1"], axis=-1)]
    lin("ff1", "n1", D, 2 * D, "h")
    nodes.append(helper.make_node("Relu", ["h"], ["g"]))
    lin("ff2", "g", 2 * D, D, "f")
    nodes.append(helper.make_node("Add", ["n1", "f"], ["y"]))
    outputs = [vi("y", ["B", "S", D])]
    if shape_reader is not None:
        const("sr.k", shape_reader)
        nodes += [helper.make_node("Shape", ["q"], ["sr.shp"]),
                  helper.make_node("Gather", ["sr.shp", "sr.k"], ["dim"], axis=0)]
        outputs.append(vi("dim", [], TensorProto.INT64))
    return make_model(nodes, inputs, outputs, inits)


def _feeds(mask=True, b=2, s=5, seed=1):
    rng = np.random.default_rng(seed)
    f = {"x": rng.standard_normal((b, s, D)).astype(np.float32)}
    if mask:
        m = np.ones((b, s), np.int64)
        m[-1, min(3, s - 1):] = 0
        f["mask"] = m
    return f


def _w(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set(model, name, arr):
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))


def _groups(model):
    layers, _ = find_layers(model)
    g = build(model, layers)
    roots, fixed = g.roots(), g.fixed_roots()
    out = {}
    for p in g.producers:
        c = g.chans.get(p.out)
        out[p.layer.name] = None if c is None else (roots[c.lab], fixed[roots[c.lab]])
    return out


@pytest.mark.parametrize("target", ["concat", "const", "infer"])
def test_heads_are_one_group_each_tied_across_q_k_v(target):
    grp = _groups(mha_block(target))
    for name in ("q.w", "k.w", "v.w"):
        roots, fixed = grp[name]
        assert not fixed.any()
        assert len(set(roots.tolist())) == H
        assert all(len(set(roots[h * DH:(h + 1) * DH].tolist())) == 1 for h in range(H))
        np.testing.assert_array_equal(roots, grp["q.w"][0])  # head h of Q, K and V: one group
    assert len(set(grp["ff1.w"][0].tolist())) == 2 * D  # FFN neurons stay single units


def test_a_shape_that_reads_the_channel_count_keeps_the_heads():
    assert _groups(mha_block(shape_reader=2))["q.w"][1].all()
    assert not _groups(mha_block(shape_reader=1))["q.w"][1].any()  # reading the sequence length is fine


@pytest.mark.parametrize("target", ["concat", "const", "infer"])
def test_a_head_whose_output_rows_are_zero_is_removed_exactly(target):
    m = mha_block(target)
    w = _w(m, "o.w").copy()
    w[DH:2 * DH] = 0  # head 1 contributes nothing
    _set(m, "o.w", w)
    res = compact(m)
    out = res.model
    for name in ("q.w", "k.w", "v.w"):
        assert _w(out, name).shape == (D, D - DH)
        assert _w(out, name[0] + ".b").shape == (D - DH,)
    assert _w(out, "o.w").shape == (D - DH, D)
    for b in (1, 3):
        for s in (1, 5, 9):
            feeds = _feeds(b=b, s=s)
            np.testing.assert_allclose(run(out, feeds)[0], run(m, feeds)[0], rtol=1e-5, atol=1e-5)
    assert res.channels_removed == 3 * DH  # Q, K and V lose one head each


def test_unrelated_channels_inside_a_head_are_not_removed_alone():
    m = mha_block()
    w = _w(m, "o.w").copy()
    w[DH + 1] = 0  # one row of head 1: the head still reads its other rows
    _set(m, "o.w", w)
    res = compact(m)
    assert _w(res.model, "o.w").shape == (D, D) and _w(res.model, "v.w").shape == (D, D)


@pytest.mark.parametrize("target", ["concat", "infer"])
def test_channel_plan_removes_whole_heads_and_compacts_to_the_masked_model(target):
    m = mha_block(target)
    layers, _ = find_layers(m)
    vals = {l.name: _w(m, l.name) for l in layers}
    plan = channel_plan(m, layers, vals, 0.6, floor=0.25)
    masked = m.__class__()
    masked.CopyFrom(m)
    for name, mask in plan.masks.items():
        _set(masked, name, np.where(mask, 0, vals[name]))
    res = compact(masked)
    kept_heads = _w(res.model, "q.w").shape[1]
    assert kept_heads % DH == 0 and kept_heads < D  # heads went, whole
    assert _w(res.model, "k.w").shape[1] == _w(res.model, "v.w").shape[1] == kept_heads
    assert _w(res.model, "o.w").shape[0] == kept_heads
    feeds = _feeds()
    np.testing.assert_allclose(run(res.model, feeds)[0], run(masked, feeds)[0], rtol=1e-5, atol=1e-5)


def test_matmul_with_an_unlabelled_operand_that_does_not_broadcast_keeps_the_heads():
    m = mha_block(mask=False)
    # scores times a per-head table computed at run time ([1, H, 1, 1] from an input): kept
    m.graph.input.append(vi("t", [1, H, 1, 1]))
    for n in m.graph.node:
        if n.op_type == "Softmax":
            n.input[0] = "st"
    idx = next(i for i, n in enumerate(m.graph.node) if n.op_type == "Softmax")
    m.graph.node.insert(idx, helper.make_node("MatMul", ["t", "s"], ["st_"]))
    m.graph.node.insert(idx + 1, helper.make_node("Add", ["st_", "s"], ["st"]))
    assert _groups(m)["q.w"][1].all()


def test_cli_channel_pruning_with_calibration_removes_heads(tmp_path):
    from click.testing import CliRunner
    from onnxprune.cli import main
    import onnx
    m = mha_block()
    src = tmp_path / "mha.onnx"
    onnx.save(m, str(src))
    rng = np.random.default_rng(3)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((16, 6, D)).astype(np.float32), mask=np.ones((16, 6), np.int64))
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(main, [str(src), "-s", "0.5", "--granularity", "channel", "--reconstruct",
                                  "--calibration", str(cal), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    pm = onnx.load(str(out))
    assert _w(pm, "q.w").shape[1] % DH == 0 and _w(pm, "q.w").shape[1] < D  # whole heads went
    assert _w(pm, "o.w").shape[0] == _w(pm, "v.w").shape[1]
    y = run(pm, _feeds())[0]
    assert np.isfinite(y).all() and y.shape == (2, 5, D)


def test_a_reshape_that_regroups_the_dims_around_the_channel_axis_keeps_the_channels():
    """[2, 6, 4, 4] -> [-1, 6, 4, 8]: axis 1 still has 6 entries but holds other data (found by a fuzzer)."""
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((3, 6, 1, 1)).astype(np.float32)
    w2[:, 1] = 0  # the second conv does not read channel 1 of the reshaped tensor
    m = make_model([helper.make_node("Conv", ["x", "c1.w"], ["a"]),
                    helper.make_node("Reshape", ["a", "tgt"], ["r"]),
                    helper.make_node("Conv", ["r", "c2.w"], ["y"])],
                   [vi("x", [2, 4, 4, 4])], [vi("y", None)],
                   [init("c1.w", rng.standard_normal((6, 4, 1, 1)).astype(np.float32)), init("c2.w", w2),
                    init("tgt", np.array([-1, 6, 4, 8], np.int64))])
    res = compact(m)
    assert _w(res.model, "c1.w").shape == (6, 4, 1, 1)
    f = {"x": rng.standard_normal((2, 4, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(res.model, f)[0], run(m, f)[0], rtol=1e-5, atol=1e-5)


def test_a_shape_with_start_below_minus_rank_that_reads_the_channel_count_keeps_it():
    """ONNX clamps Shape's start to 0: Gather index 2 of Shape(q, start=-10) is q's channel count."""
    m = mha_block(mask=False)
    m.graph.node.extend([helper.make_node("Shape", ["q"], ["sq"], start=-10),
                         helper.make_node("Gather", ["sq", "two"], ["dim"], axis=0)])
    m.graph.initializer.append(init("two", np.array(2, np.int64)))
    m.graph.output.append(vi("dim", [], TensorProto.INT64))
    assert _groups(m)["q.w"][1].all()
    w = _w(m, "o.w").copy()
    w[:DH] = 0
    _set(m, "o.w", w)
    out = compact(m).model
    assert run(out, _feeds(mask=False))[1] == D


def test_align_keeps_head_widths_aligned():
    m = mha_block()
    layers, _ = find_layers(m)
    vals = {l.name: _w(m, l.name) for l in layers}
    plan = channel_plan(m, layers, vals, 0.6, align=8, floor=0.0)
    masked = m.__class__()
    masked.CopyFrom(m)
    for name, mask in plan.masks.items():
        _set(masked, name, np.where(mask, 0, vals[name]))
    res = compact(masked, align=8)
    for name in ("q.w", "k.w", "v.w", "ff1.w"):
        width = _w(res.model, name).shape[1]
        assert width % 8 == 0 or width == _w(m, name).shape[1], (name, width)
    assert _w(res.model, "q.w").shape[1] < D  # two heads (8 channels) went
    np.testing.assert_allclose(run(res.model, _feeds())[0], run(masked, _feeds())[0], rtol=1e-5, atol=1e-5)


def test_compaction_realigns_by_whole_heads():
    """Three of four heads dead with --align 8: one head (4 channels) comes back, not every head."""
    m = mha_block()
    w = _w(m, "o.w").copy()
    w[:3 * DH] = 0
    _set(m, "o.w", w)
    res = compact(m, align=8)
    assert _w(res.model, "q.w").shape[1] == 8 and _w(res.model, "o.w").shape[0] == 8
    np.testing.assert_allclose(run(res.model, _feeds())[0], run(m, _feeds())[0], rtol=1e-5, atol=1e-5)
