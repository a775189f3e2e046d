"""Input shapes and synthetic values on real-export traits, on small models built here (no third-party files):

A. integer inputs that index a lookup (a Gather on a constant table, a OneHot, jax's Equal-with-arange one-hot as
   magika writes it) get synthetic ids over the whole lookup, masks and token types keep theirs;
B. a dim_param naming several axes of one input (Paddle: '?', '-1', 'H?' for H and W) never refuses an explicit
   --input-shape, while a fixed dimension still does;
C. the --input-shape suggested for unresolved inputs runs when pasted (a VAD-like model whose state carries the
   batch on axis 1 under another name, or none);
D. --effective-mode exact reads the --input-shape sizes, and names the node that stops it (never exit 70).
"""
import json
import re

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import init, invoke, make_model, vi

from onnxprune.errors import ConfigError
from onnxprune.inputs import input_specs, resolve_shapes, shape_hint, synthetic_batches

DIST = ("normal", 0.0, 1.0)


def fills(model, batch=4, given=None, seed=0):
    specs = input_specs(model)
    resolve_shapes(model, specs, batch, given or {})
    feeds = synthetic_batches(model, specs, 2, seed, DIST)
    return {s.name: s for s in specs}, feeds


# ---- A. integer inputs feeding a lookup ------------------------------------------------------------------------

def onehot_model(depth=257):
    """ids [N, 32] int32 -> Cast -> OneHot(depth) -> MatMul: a byte classifier's first layer."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["bytes"], ["ids"], to=TensorProto.INT64),
             helper.make_node("OneHot", ["ids", "depth", "onoff"], ["oh"], axis=-1),
             helper.make_node("MatMul", ["oh", "w"], ["y"], name="embed")]
    return make_model(nodes, [vi("bytes", ["N", 32], TensorProto.INT32)], [vi("y", ["N", 32, 4])],
                      [init("depth", np.array(depth, np.int64)), init("onoff", np.array([0, 1], np.float32)),
                       init("w", rng.standard_normal((depth, 4)).astype(np.float32))])


def jax_onehot_model(depth=257):
    """magika's one-hot as jax2tf writes it: Reshape -> Expand -> Equal(arange(depth)) -> Cast -> MatMul."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Reshape", ["bytes", "shape3"], ["r"]),
             helper.make_node("Expand", ["r", "bshape"], ["e"]),
             helper.make_node("Equal", ["e", "iota"], ["eq"]),
             helper.make_node("Cast", ["eq"], ["oh"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["oh", "w"], ["h"], name="embed"),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)]
    return make_model(nodes, [vi("bytes", ["unk__214", 16], TensorProto.INT32)], [vi("y", ["unk__214", 4])],
                      [init("shape3", np.array([-1, 16, 1], np.int64)), init("bshape", np.array([1, 16, 1], np.int64)),
                       init("iota", np.arange(depth, dtype=np.int32).reshape(1, 1, depth)),
                       init("w", rng.standard_normal((depth, 4)).astype(np.float32))])


def test_onehot_ids_span_the_depth_and_are_seeded():
    m = onehot_model()
    specs, feeds = fills(m)
    s = specs["bytes"]
    assert s.id_range == 257 and s.fill == "uniform ids in [0, 257) (one-hot depth)"
    a = np.concatenate([f["bytes"] for f in feeds])
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 257 and len(np.unique(a)) > 100
    again = fills(m)[1]
    assert all(np.array_equal(x["bytes"], y["bytes"]) for x, y in zip(feeds, again))  # same seed, same values
    assert not np.array_equal(fills(m, seed=1)[1][0]["bytes"], feeds[0]["bytes"])


def test_jax_equal_arange_one_hot_spans_the_depth_through_the_cli(tmp_model):
    m = jax_onehot_model()
    specs, feeds = fills(m)
    assert specs["bytes"].id_range == 257
    assert max(int(f["bytes"].max()) for f in feeds) > 1
    r = invoke(tmp_model(m), "-s", "0.5", "--batches", "1", "--batch-size", "4", "--json", "-q", "--dry-run")
    assert r.exit_code == 0
    r = invoke(tmp_model(m), "-s", "0.5", "--batches", "1", "--batch-size", "4", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["validation"]["status"] == "ok"
    assert "bytes: uniform ids in [0, 257) (one-hot depth)" in doc["validation"]["data"]


def test_gather_through_reshaping_ops_and_a_cast_table():
    """ids -> Cast -> Transpose -> Unsqueeze -> Squeeze -> Gather on an fp16 table cast to float."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Cast", ["ids"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Transpose", ["i32"], ["t"], perm=[1, 0]),
             helper.make_node("Unsqueeze", ["t", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["s"]),
             helper.make_node("Cast", ["table16"], ["table"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["table", "s"], ["emb"]),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")]
    m = make_model(nodes, [vi("ids", ["N", 8], TensorProto.INT64)], [vi("y", [8, "N", 4])],
                   [init("ax", np.array([2], np.int64)),
                    init("table16", rng.standard_normal((37, 6)).astype(np.float16)),
                    init("w", rng.standard_normal((6, 4)).astype(np.float32))])
    specs, feeds = fills(m)
    assert specs["ids"].id_range == 37 and "[0, 37) (embedding rows)" in specs["ids"].fill
    a = np.concatenate([f["ids"] for f in feeds])
    assert a.min() >= 0 and a.max() < 37 and a.max() > 1


def test_masks_and_token_types_keep_their_values_next_to_lookup_ids():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("OneHot", ["input_ids", "depth", "onoff"], ["oh"], axis=-1),
             helper.make_node("Gather", ["types", "token_type_ids"], ["te"]),
             helper.make_node("Gather", ["mask_table", "attention_mask"], ["me"]),
             helper.make_node("Add", ["oh", "te"], ["s"]), helper.make_node("Add", ["s", "me"], ["y"])]
    m = make_model(nodes, [vi(n, ["batch", "seq"], TensorProto.INT64)
                           for n in ("input_ids", "token_type_ids", "attention_mask")],
                   [vi("y", ["batch", "seq", 50])],
                   [init("depth", np.array([50], np.int64)), init("onoff", np.array([0, 1], np.float32)),
                    init("types", rng.standard_normal((2, 50)).astype(np.float32)),
                    init("mask_table", rng.standard_normal((2, 50)).astype(np.float32))])
    specs, feeds = fills(m, given={"input_ids": [2, 7]})
    assert specs["input_ids"].fill == "uniform ids in [0, 50) (one-hot depth)"
    assert specs["token_type_ids"].fill == "zeros (token types)" and specs["attention_mask"].fill == "ones (mask)"
    assert all((f["token_type_ids"] == 0).all() and (f["attention_mask"] == 1).all() for f in feeds)
    assert max(int(f["input_ids"].max()) for f in feeds) > 1


# ---- B. one dim_param on several axes of one input -------------------------------------------------------------

def paddle_cls(dims):
    """A Paddle-style classifier: x dims as given (e.g. ['?', 3, '?', '?']) -> Conv -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", dims)], [vi("y", [dims[0], 2])],
                      [init("cw", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                       init("fw", rng.standard_normal((2, 4)).astype(np.float32))])


@pytest.mark.parametrize("dims", [["N", 3, "H?", "H?"], ["?", 3, "?", "?"], ["-1", 3, "-1", "-1"],
                                  ["p2o.D.0", 3, "p2o.D.1", "p2o.D.1"]])
def test_a_dim_param_repeated_in_one_input_takes_the_explicit_shape(tmp_model, dims):
    path = tmp_model(paddle_cls(dims))
    r = invoke(path, "-s", "0.5", "--input-shape", "x:8,3,48,192", "--batches", "1", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0, r.stderr
    assert doc["validation"]["status"] == "ok" and doc["figures"]["input_shapes"]["x"] == [8, 3, 48, 192]


def test_a_fixed_dimension_still_refuses_a_contradicting_shape(tmp_model):
    path = tmp_model(paddle_cls(["?", 3, "?", "?"]))
    r = invoke(path, "-s", "0.5", "--input-shape", "x:8,4,48,192", "--batches", "1")
    assert r.exit_code == 2 and "dimension 1 is fixed at 3" in r.stderr


def test_sharing_across_inputs_still_propagates_and_must_agree():
    m = make_model([helper.make_node("Identity", ["x"], ["y"])],
                   [vi("x", ["N", 3, "S", "S"]), vi("y_in", ["N", "S"]), vi("a", ["N", "T"]), vi("b", ["N", "T"])],
                   [vi("y", ["N", 3, "S", "S"])])
    specs = resolve_shapes(m, input_specs(m), 2, {"x": [2, 3, 16, 16], "a": [2, 5]})
    shapes = {s.name: s.shape for s in specs}
    assert shapes["y_in"] == [2, 16] and shapes["b"] == [2, 5]  # one size on every axis of x: it propagates
    specs = resolve_shapes(m, input_specs(m), 2, {"x": [2, 3, 16, 24], "a": [2, 5]})
    y_in = next(s for s in specs if s.name == "y_in")
    assert y_in.missing == [1]  # two sizes for 'S' in x: nothing to propagate, and no error
    with pytest.raises(ConfigError, match="must agree"):  # a name used once per input is still one size
        resolve_shapes(m, input_specs(m), 2, {"x": [2, 3, 16, 16], "a": [2, 5], "b": [2, 6]})


# ---- C. the suggested --input-shape runs -----------------------------------------------------------------------

def vad_model(input_dims, state_dims):
    """A Silero-VAD-like step: input [N, T] (mean over T), state [2, N, 16], sr int64 scalar -> output [N, 1] and
    the next state. A state whose batch disagrees with the input's fails in the Concat."""
    rng = np.random.default_rng(5)
    n = helper.make_node
    nodes = [n("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
             n("MatMul", ["m", "w_in"], ["h"], name="proj_in"),
             n("ReduceMean", ["state"], ["r"], axes=[0], keepdims=0),
             n("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT), n("Div", ["srf", "k16"], ["scale"]),
             n("Mul", ["h", "scale"], ["hs"]),
             n("Concat", ["hs", "r"], ["cat"], axis=1),
             n("MatMul", ["cat", "w_out"], ["logit"], name="proj_out"), n("Sigmoid", ["logit"], ["output"]),
             n("Add", ["hs", "r"], ["nh"]), n("Unsqueeze", ["nh", "ax0"], ["u"]),
             n("Concat", ["u", "u"], ["stateN"], axis=0)]
    b = input_dims[0]
    return make_model(nodes, [vi("input", input_dims), vi("state", state_dims), vi("sr", [], TensorProto.INT64)],
                      [vi("output", [b, 1]), vi("stateN", [2, b, 16])],
                      [init("w_in", rng.standard_normal((1, 16)).astype(np.float32)),
                       init("w_out", rng.standard_normal((32, 1)).astype(np.float32)),
                       init("k16", np.array(16000.0, np.float32)), init("ax0", np.array([0], np.int64))])


def hinted(reason):
    return [a for opt in re.findall(r"--input-shape ([^\s:,]+:(?:\d+(?:,\d+)*)?)", reason)
            for a in ("--input-shape", opt)]


@pytest.mark.parametrize("input_dims,state_dims", [
    ([None, None], [2, None, 16]),  # silero_vad.onnx: nothing named
    (["N", "T"], [2, "M", 16]),  # the state's batch named apart
    (["unk_0", "unk_1"], [2, "unk_0", 16]),  # one name, not a batch-like one
])
def test_the_suggested_shape_runs_when_pasted(tmp_model, input_dims, state_dims):
    path = tmp_model(vad_model(input_dims, state_dims))
    r = invoke(path, "-s", "0.5", "--batches", "1", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["validation"]["status"] == "skipped"
    opts = hinted(doc["validation"]["reason"])
    r = invoke(path, "-s", "0.5", "--batches", "1", "--json", "-q", *opts)  # pasted as it is
    assert r.exit_code == 0 and json.loads(r.stdout)["validation"]["status"] == "ok", r.stderr
    outputs = json.loads(r.stdout)["validation"]["outputs"]
    assert {o["name"]: o["shape"] for o in outputs} == {"output": [1, 1], "stateN": [2, 1, 16]}
    # the state follows the input's batch (nothing to suggest for it); a model with a sample rate gets a 512 frame
    assert opts == ["--input-shape", "input:1,512"]
    r = invoke(path, "-s", "0.5", "--batches", "1", "--json", "-q", "--input-shape", "input:3,40")
    assert r.exit_code == 0 and json.loads(r.stdout)["validation"]["status"] == "ok"


def test_a_vad_with_a_shared_batch_needs_no_shape(tmp_model):
    path = tmp_model(vad_model(["N", 64], [2, "N", 16]))
    r = invoke(path, "-s", "0.5", "--batches", "1", "--batch-size", "3", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["validation"]["status"] == "ok"
    assert {o["name"]: o["shape"] for o in doc["validation"]["outputs"]} == {"output": [3, 1], "stateN": [2, 3, 16]}


def test_the_hint_gives_one_size_per_dim_param_and_per_batch():
    m = make_model([helper.make_node("Identity", ["x"], ["y"])],
                   [vi("x", ["N", 3, "S", "S"]), vi("aux", ["N", "S"]), vi("state", [2, "B2", 8])],
                   [vi("y", ["N", 3, "S", "S"])])
    specs = resolve_shapes(m, input_specs(m), 32, {})
    assert next(s for s in specs if s.name == "state").shape == [2, 32, 8]  # a state's one dynamic dim: the batch
    assert shape_hint(specs) == "--input-shape x:1,3,640,640 --input-shape aux:1,640"
    # an --input-shape that set the batch keeps it in what is suggested for the others
    specs = resolve_shapes(m, input_specs(m), 32, {"state": [2, 4, 8]})
    assert shape_hint(specs) == "--input-shape x:4,3,640,640 --input-shape aux:4,640"


# ---- D. --effective-mode exact ---------------------------------------------------------------------------------

def corner_cnn(dims, tap=(0, 0)):
    """Conv 3x3 (pad 1) with one non-zero tap -> Flatten -> Gemm; on a 1x1 image a corner tap reads only padding."""
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[(0, 0) + tap] = 1.0
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", dims)], [vi("y", [dims[0], 1])],
                      [init("w", w), init("fc", np.ones((1, 1), np.float32))])


def exact_counts(model, input_shapes=None):
    from onnxprune.connectivity import infer_shapes
    from onnxprune.exact import effective_exact
    from onnxprune.graph import find_layers
    from onnx import numpy_helper
    layers, _ = find_layers(model, ())
    weights = {l.name: numpy_helper.to_array(l.tensor) for l in layers}
    return effective_exact(model, layers, weights, infer_shapes(model), input_shapes=input_shapes)


def test_exact_mode_reads_the_given_input_shapes():
    from onnxprune.exact import Unsupported
    dynamic = corner_cnn(["N", 1, "H", "W"])
    with pytest.raises(Unsupported, match=r"input 'x'.*--input-shape"):
        exact_counts(dynamic)
    # a corner tap on a 1x1 image reads only padding: nothing reaches the output (as with the static model)
    assert exact_counts(dynamic, {"x": [1, 1, 1, 1]}) == exact_counts(corner_cnn([1, 1, 1, 1])) == {"w": 0, "fc": 0}
    centre = corner_cnn(["batch", 1, "H", "W"], tap=(1, 1))
    assert exact_counts(centre, {"x": [3, 1, 1, 1]}) == {"w": 1, "fc": 1}


@pytest.mark.skipif("input_shapes" not in __import__("onnxprune.pipeline", fromlist=["PruneConfig"])
                    .PruneConfig.__dataclass_fields__, reason="PruneConfig.input_shapes not plumbed from the CLI yet")
def test_cli_exact_mode_with_input_shape(tmp_model):
    path = tmp_model(corner_cnn(["N", 1, "H", "W"]))
    r = invoke(path, "-s", "0", "--effective-mode", "exact", "--input-shape", "x:1,1,1,1", "--dry-run", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["connectivity"]["mode"] == "exact"
    assert doc["totals"]["effective_zeros"] == 10  # every weight: 8 zeros, a tap reading padding, fc reading it


def test_exact_mode_names_the_node_that_stops_it():
    from onnxprune.exact import Unsupported
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["c", "st", "en", "axs"], ["cut"], name="channel_slice"),
             helper.make_node("Flatten", ["cut"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3])],
                   [init("w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
                    init("st", np.array([0], np.int64)), init("en", np.array([2], np.int64)),
                    init("axs", np.array([1], np.int64)), init("fc", rng.standard_normal((3, 32)).astype(np.float32))])
    with pytest.raises(Unsupported, match="Slice node 'channel_slice'"):
        exact_counts(m)


def test_a_shape_driven_reshape_is_followed():
    """Conv -> Reshape(c, Concat(Shape(c)[0], -1)) -> Gemm, as exporters write a flatten: the shape computation
    carries no values, the Reshape's static size comes from the given input shape."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    w[:, :, 0, :] = 0.0  # the top row taps
    fc = rng.standard_normal((3, 2)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["c", "target"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    inits = [init("w", w), init("zero", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64)),
             init("fc", fc)]
    dynamic = make_model(nodes, [vi("x", ["N", 1, "H", "W"])], [vi("y", ["N", 3])], inits)
    flat = make_model([nodes[0], helper.make_node("Flatten", ["c"], ["f"]), nodes[-1]],
                      [vi("x", [1, 1, 1, 1])], [vi("y", [1, 3])], [inits[0], inits[-1]])
    got = exact_counts(dynamic, {"x": [1, 1, 1, 1]})
    assert got == exact_counts(flat) == {"w": 2, "fc": 6}  # on a 1x1 image only the centre tap reads a pixel


def test_exact_mode_on_a_graph_it_cannot_follow_is_a_warning_never_exit_70(tmp_model):
    """A Conv reading a constant map (a learned positional bias) used to crash exact mode (exit 70)."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["pos", "wp"], ["p"], name="pos_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "p"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 3])],
                   [init("w", rng.standard_normal((2, 2, 3, 3)).astype(np.float32)),
                    init("pos", rng.standard_normal((1, 2, 4, 4)).astype(np.float32)),
                    init("wp", rng.standard_normal((2, 2, 3, 3)).astype(np.float32)),
                    init("fc", rng.standard_normal((3, 32)).astype(np.float32))])
    r = invoke(tmp_model(m), "-s", "0.5", "--effective-mode", "exact", "--dry-run", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["connectivity"]["mode"] == "channel"
    assert any("Conv node 'pos_conv'" in w for w in doc["warnings"])


def test_a_fixed_batch_of_one_with_a_dynamic_sequence_takes_samples_on_axis_0(tmp_model, tmp_path):
    """ids and mask [1, 'seq'] (a token model exported at batch 1): --data holds N samples stacked on axis 0 and
    they run one at a time, as for a static [1, 3, H, W] model (before: the data was refused, since 'seq' was
    taken for no batch axis and [N, T] then contradicted the fixed 1)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("Cast", ["mask"], ["mf"], to=1),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("MatMul", ["em", "W"], ["y"])]
    m = make_model(nodes, [vi("ids", [1, "seq"], TensorProto.INT64), vi("mask", [1, "seq"], TensorProto.INT64)],
                   [vi("y", [1, "seq", 8])], [init("E", rng.standard_normal((20, 8)).astype(np.float32)),
                                              init("W", rng.standard_normal((8, 8)).astype(np.float32)),
                                              init("ax", np.array([-1], np.int64))])
    specs = input_specs(m)
    assert [s.batch_axis for s in specs] == [0, 0]
    data = tmp_path / "d.npz"
    np.savez(data, ids=rng.integers(0, 20, (6, 5)), mask=np.ones((6, 5), np.int64))
    r = invoke(tmp_model(m), "-s", "0.5", "--data", data, "--json", "-q")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["validation"]
    assert v["status"] == "ok" and v["samples"] == 6 and v["batches"] == 6


@pytest.mark.parametrize("lead", [1, "batch"])
def test_inputs_naming_a_dimension_alike_must_agree_in_the_data(tmp_model, tmp_path, lead):
    """ids [N, 5] with a mask [N, 1]: the mask would broadcast in the model's Mul and pass validation on data the
    model's shapes rule out; it is refused with one line naming both inputs, and nothing is written."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("Cast", ["mask"], ["mf"], to=1),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("MatMul", ["em", "W"], ["y"])]
    m = make_model(nodes, [vi("ids", [lead, "seq"], TensorProto.INT64), vi("mask", [lead, "seq"], TensorProto.INT64)],
                   [vi("y", [lead, "seq", 8])], [init("E", rng.standard_normal((20, 8)).astype(np.float32)),
                                                 init("W", rng.standard_normal((8, 8)).astype(np.float32)),
                                                 init("ax", np.array([-1], np.int64))])
    path = tmp_model(m)
    for mask_len, code in ((5, 0), (1, 3), (4, 3)):
        data, out = tmp_path / f"d{mask_len}.npz", tmp_path / f"o{mask_len}.onnx"
        np.savez(data, ids=rng.integers(0, 20, (6, 5)), mask=np.ones((6, mask_len), np.int64))
        r = invoke(path, "-s", "0.5", "--data", data, "-o", out, "-q")
        assert r.exit_code == code, r.output
        assert out.exists() == (code == 0)
        if code:
            line = r.output.strip()
            assert "\n" not in line and "'mask' has" in line and "'ids' has 5" in line
