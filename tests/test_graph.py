import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune.graph import find_layers, find_quantized_ops
from onnxprune.layout import layout_for
from onnxprune.select import layout_perm

from conftest import init, make_model, vi

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def names(model, exclude=()):
    layers, _ = find_layers(model, exclude)
    return {l.name: l for l in layers}


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_any_rank_and_group(rank):
    k = [3] * rank
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2)],
                   [vi("x", [1, 4] + [8] * rank)], [vi("y", None)], [init("w", f32(6, 2, *k))])
    l = names(m)["w"]
    assert l.op == "Conv" and l.layout.out_axis == 0 and l.layout.group == 2 and l.size == 12 * 3 ** rank


def test_conv_transpose_out_units_on_axis_1():
    m = make_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct")],
                   [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", f32(4, 6, 3, 3))])
    lay = names(m)["w"].layout
    assert (lay.out_axis, lay.in_axis) == (1, 0)


@pytest.mark.parametrize("trans_b,out_axis", [(0, 1), (1, 0)])
def test_gemm_trans_b(trans_b, out_axis):
    shape = (3, 5) if trans_b else (5, 3)
    m = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)],
                   [vi("x", [2, 5])], [vi("y", None)], [init("w", f32(*shape))])
    assert names(m)["w"].layout.out_axis == out_axis


def test_gemm_constant_on_left():
    m = make_model([helper.make_node("Gemm", ["w", "x"], ["y"], transA=0)],
                   [vi("x", [5, 2])], [vi("y", None)], [init("w", f32(3, 5))])
    l = names(m)["w"]
    assert l.consumers[0].slot == 0 and l.layout.out_axis == 0


def test_matmul_weight_on_either_side_and_activation_matmul_ignored():
    nodes = [helper.make_node("MatMul", ["x", "wr"], ["a"], name="right"),
             helper.make_node("MatMul", ["wl", "a"], ["b"], name="left"),
             helper.make_node("MatMul", ["a", "b"], ["y"], name="act")]  # two activations: never pruned
    m = make_model(nodes, [vi("x", [4, 4])], [vi("y", None)], [init("wr", f32(4, 4)), init("wl", f32(4, 4))])
    got = names(m)
    assert set(got) == {"wr", "wl"}
    assert got["wr"].layout.out_axis == -1 and got["wl"].layout.out_axis == -2


def test_constant_node_identity_and_cast_chains():
    w = helper.make_node("Constant", [], ["wc"], value=init("wv", f32(4, 3)))
    nodes = [w, helper.make_node("Identity", ["wc"], ["wi"]), helper.make_node("Cast", ["wi"], ["wcast"], to=1),
             helper.make_node("MatMul", ["x", "wcast"], ["y"], name="mm"),
             helper.make_node("Identity", ["w2"], ["w2i"]),
             helper.make_node("Gemm", ["y", "w2i"], ["z"], name="gemm")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("z", None)], [init("w2", f32(3, 2))])
    got = names(m)
    assert got["wc"].kind == "constant" and got["w2"].kind == "initializer"


def test_tied_weight_is_one_layer_with_two_consumers():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
             helper.make_node("Identity", ["w"], ["w_alias"]),
             helper.make_node("MatMul", ["a", "w_alias"], ["y"], name="m2")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", None)], [init("w", f32(4, 4))])
    layers, _ = find_layers(m)
    assert len(layers) == 1 and [c.node for c in layers[0].consumers] == ["m1", "m2"]


def test_initializer_that_is_a_graph_input_warns():
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 4]), vi("w", [4, 4])],
                   [vi("y", None)], [init("w", f32(4, 4))])
    layers, warnings = find_layers(m)
    assert layers[0].graph_input and any("graph input" in w for w in warnings)


def test_weights_inside_if_branches_and_outer_scope():
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_outer"], ["t"], name="then_mm")], "then", [],
                               [vi("t", None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_inner"], ["e"], name="else_mm")], "else", [],
                               [vi("e", None)], [init("w_inner", f32(4, 4))])
    m = make_model([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", None)], [init("w_outer", f32(4, 4))])
    got = names(m)
    assert set(got) == {"w_outer", "w_inner"}
    assert got["w_inner"].graph.endswith("branch.else_branch") and got["w_outer"].graph == ""


def test_exclude_by_weight_or_node_name():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="enc/fc"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="head/fc")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", None)], [init("w1", f32(4, 4)), init("w2", f32(4, 4))])
    got = names(m, exclude=("head/*",))
    assert got["w2"].excluded and not got["w1"].excluded
    assert names(m, exclude=("w1",))["w1"].excluded


def test_quantized_ops_found_and_int_weights_skipped():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", None)],
                   [init("q", np.ones((4, 4), np.int8)), init("s", np.float32(0.1))])
    assert find_quantized_ops(m) == ["DequantizeLinear"]
    mi = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 4], TensorProto.INT32)],
                    [vi("y", None)], [init("w", np.ones((4, 4), np.int32))])
    layers, warnings = find_layers(mi)
    assert layers == [] and "not a float tensor" in warnings[0]


def test_layout_perm_canonical_order():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    lay = layout_for(node, 1, 2)
    assert layout_perm((5, 3), lay.out_axis, lay.in_axis) == (1, 0)
    conv = helper.make_node("ConvTranspose", ["x", "w"], ["y"])
    lay = layout_for(conv, 1, 4)
    assert layout_perm((4, 6, 3, 3), lay.out_axis, lay.in_axis) == (1, 0, 2, 3)


def test_weight_behind_transpose_like_torch_dynamo_exports():
    """MatMul(x, Transpose(W)) with W stored [out, in]: found, with out-units on W's axis 0."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="linear")]
    m = make_model(nodes, [vi("x", [2, 5])], [vi("y", None)], [init("w", f32(3, 5))])
    lay = names(m)["w"].layout
    assert (lay.out_axis, lay.in_axis) == (0, 1)
