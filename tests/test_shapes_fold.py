"""Shape arithmetic folded for shape inference (onnxprune/shapes.py): a Paddle-style attention Reshape whose
target is built from Shape -> Cast -> Slice (Constant bounds) -> Concat with float Constants cast to int64."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import init, invoke, make_model, vi
from onnxprune.shapes import fold, infer_shapes
from onnxprune.exact import shapes_with_inputs


def _const(name, values, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype=dtype)))


def paddle_attention(rng):
    """x [N, T, 12] -> MatMul [12, 16] -> Relu -> MatMul [16, 12] -> h; Reshape(h, [0, T, 3, 4]) with T read from
    Shape(h) -> MatMul [4, 5]."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["h"]),
             helper.make_node("Shape", ["h"], ["shape"]),
             helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32),
             _const("s0", [1]), _const("s1", [2]), _const("ax", [0]), _const("st", [1]),
             helper.make_node("Slice", ["shape32", "s0", "s1", "ax", "st"], ["t"]),
             helper.make_node("Cast", ["t"], ["t64"], to=TensorProto.INT64),
             _const("zero_f", [0.0], np.float32), _const("heads_f", [3.0], np.float32),
             _const("dim_f", [4.0], np.float32)]
    for n in ("zero", "heads", "dim"):
        nodes.append(helper.make_node("Cast", [f"{n}_f"], [f"{n}64"], to=TensorProto.INT64))
    nodes += [helper.make_node("Concat", ["zero64", "t64", "heads64", "dim64"], ["target"], axis=0),
              helper.make_node("Reshape", ["h", "target"], ["heads"]),
              helper.make_node("MatMul", ["heads", "w2"], ["y"])]
    return make_model(nodes, [vi("x", ["N", "T", 12])], [vi("y", ["N", "T", 3, 5])],
                      [init("w0", rng.standard_normal((12, 16)).astype(np.float32)),
                       init("w1", rng.standard_normal((16, 12)).astype(np.float32)),
                       init("w2", rng.standard_normal((4, 5)).astype(np.float32))])


def test_fold_computes_the_reshape_target():
    m = paddle_attention(np.random.default_rng(0))
    shapes = shapes_with_inputs(m, {"x": [2, 7, 12]})
    assert shapes.dims["heads"] == [2, 7, 3, 4] and shapes.dims["y"] == [2, 7, 3, 5]
    folded = fold(m.graph.node, {"h": [2, 7, 12]}, {})
    assert folded["target"].tolist() == [0, 7, 3, 4] and folded["t"].dtype == np.int32
    # dims that are not numbers fold nothing
    assert "target" not in fold(m.graph.node, {"h": ["N", "T", 12]}, {})
    dynamic = infer_shapes(m).dims.get("heads")  # at the declared [N, T, 12]: nothing made up
    assert dynamic is None or not all(isinstance(d, int) for d in dynamic)


def test_fold_leaves_ambiguous_arithmetic_alone():
    nodes = [_const("a", [-7]), _const("b", [2]), helper.make_node("Div", ["a", "b"], ["q"]),
             _const("c", [8]), helper.make_node("Div", ["c", "b"], ["r"]),
             helper.make_node("Mul", ["r", "b"], ["s"])]
    folded = fold(nodes, {}, {})
    assert "q" not in folded  # ONNX truncates -7 / 2 toward zero: not folded rather than guessed
    assert folded["r"].tolist() == [4] and folded["s"].tolist() == [8]


def test_macs_target_sees_through_the_reshape(tmp_path):
    path = tmp_path / "m.onnx"
    import onnx
    onnx.save(paddle_attention(np.random.default_rng(1)), path)
    r = invoke(path, "-s", "0.3", "--granularity", "channel", "--target", "macs", "--input-shape", "x:2,7,12",
               "--no-validate", "-o", tmp_path / "o.onnx", "-q")
    assert r.exit_code == 0, r.output
