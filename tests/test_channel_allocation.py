"""Channel allocation that does not gut backbones: a per-layer floor, a MACs target, a hook for calibrated scores."""
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from conftest import init, invoke, make_model, run, sample, vi
from onnxprune.channels import DEFAULT_FLOOR, channel_plan
from onnxprune.compact import compact
from onnxprune.compact.labels import Graph
from onnxprune.figures import figures, layer_macs
from onnxprune.graph import find_layers
from onnxprune.io import write_tensor


def _conv(name, x, w, y, pad=1, group=1):
    return helper.make_node("Conv", [x, w, ], [y], name=name, pads=[pad] * 4, group=group)


def chain(spatial=(4, 4)):
    """x [N, 2, H, W] -> Conv a (4 out, 3x3) -> Relu -> depthwise Conv dw (4, 3x3) -> Relu -> Conv b (3 out, 1x1)
    -> y (a graph output: b keeps its channels). At 4x4 per sample: a 16*4*18 = 1152 MACs, dw 16*4*9 = 576,
    b 16*3*4 = 192 (1920 in all); one channel of a removes 288 + 144 + 48 = 480 MACs and 18 + 9 + 3 = 30 weights
    (of 72 + 36 + 12 = 120)."""
    r = np.random.default_rng(0)
    wa = r.standard_normal((4, 2, 3, 3)).astype(np.float32)
    wd = r.standard_normal((4, 1, 3, 3)).astype(np.float32)
    wb = r.standard_normal((3, 4, 1, 1)).astype(np.float32)
    nodes = [_conv("a", "x", "wa", "ha"), helper.make_node("Relu", ["ha"], ["ra"]),
             _conv("dw", "ra", "wd", "hd", group=4), helper.make_node("Relu", ["hd"], ["rd"]),
             _conv("b", "rd", "wb", "y", pad=0)]
    return make_model(nodes, [vi("x", ["N", 2, *spatial])], [vi("y", ["N", 3, *spatial])],
                      [init("wa", wa), init("wd", wd), init("wb", wb)])


def stem_model(scale=1.0):
    """x [N, 1, 32, 32] -> stem Conv (8 out, 3x3: 72 weights, 73728 MACs) -> Relu -> MaxPool 4 -> Conv c2 (16 out,
    8 in, 3x3: 1152 weights, 73728 MACs) -> Relu -> Flatten -> Gemm fc (1024 -> 10: 10240 weights and MACs). The
    stem has 6 % of the weights and 47 % of the compute, and its channels (9 weights each) have the smallest
    norms: a params target takes them first."""
    r = np.random.default_rng(1)
    w1 = (scale * r.standard_normal((8, 1, 3, 3))).astype(np.float32)
    w2 = r.standard_normal((16, 8, 3, 3)).astype(np.float32)
    wf = r.standard_normal((10, 1024)).astype(np.float32)
    nodes = [_conv("stem", "x", "w1", "h1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[4, 4], strides=[4, 4]),
             _conv("c2", "p1", "w2", "h2"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    return make_model(nodes, [vi("x", ["N", 1, 32, 32])], [vi("y", ["N", 10])],
                      [init("w1", w1), init("w2", w2), init("wf", wf), init("bf", np.zeros(10, np.float32))])


def _plan(model, sparsity, allocation="lamp", align=1, **kw):
    layers, _ = find_layers(model)
    values = [numpy_helper.to_array(l.tensor) for l in layers]
    return layers, values, channel_plan(model, layers, values, sparsity, allocation, align, **kw)


def _kept(plan, name, width):
    return width - plan.channels.get(name, [width, 0])[1]


def _removed_rows(plan, name):
    m = plan.masks[name]
    return np.flatnonzero(m.reshape(m.shape[0], -1).all(axis=1)).tolist()


# --- the floor ---------------------------------------------------------------------------------------------------

def test_floor_keeps_a_quarter_of_every_layer_and_names_the_layers_it_stopped():
    m = stem_model()
    _, _, bare = _plan(m, 0.3, "global", floor=0.0)
    assert _kept(bare, "w1", 8) == 1 and bare.floored == ["w1"]  # without a floor the stem is all but emptied
    _, _, plan = _plan(m, 0.3, "global")
    assert plan.floor == DEFAULT_FLOOR == 0.25 and plan.min_keep == {"w1": 2, "w2": 4, "wf": 3}
    assert _kept(plan, "w1", 8) == 2 and "w1" in plan.floored
    assert plan.to_dict()["floored"] == plan.floored and plan.to_dict()["floor"] == 0.25
    assert plan.sparsity >= 0.3  # the other layers made up for it
    assert "at their floor: w1" in _plan(m, 0.95, "global")[2].why_short()


@pytest.mark.parametrize("allocation", ["lamp", "global", "uniform", "erk"])
@pytest.mark.parametrize("floor", [0.25, 0.5, 0.3])
@pytest.mark.parametrize("target", ["params", "macs"])
def test_no_layer_goes_below_its_floor(allocation, floor, target):
    for name in ("cnn", "mlp_gemm"):
        model = onnx.load(sample(name)[0])
        layers, values, plan = _plan(model, 0.95, allocation, floor=floor, target=target)
        for n, (before, removed) in plan.channels.items():
            assert before - removed >= max(1, math.ceil(floor * before)) == plan.min_keep[n]
        assert plan.achieved < 0.95 and plan.floored  # 95 % is out of reach: the floor said where it stopped
        for n in plan.floored:
            assert n in plan.min_keep


def test_floor_with_align_keeps_aligned_counts_above_the_floor():
    m = onnx.load(sample("mlp_gemm")[0])
    for floor, align in ((0.25, 8), (0.3, 8), (0.5, 4), (0.0, 8)):
        _, _, plan = _plan(m, 0.95, align=align, floor=floor)
        assert plan.channels
        for n, (before, removed) in plan.channels.items():
            kept = before - removed
            assert kept % align == 0 and kept >= max(align, math.ceil(floor * before))


def test_floor_zero_is_the_old_rule_and_bad_values_are_refused():
    m = onnx.load(sample("mlp_gemm")[0])
    _, _, plan = _plan(m, 0.99, floor=0.0)
    assert all(b - r >= 1 for b, r in plan.channels.values()) and plan.min_keep == {"fc1.weight": 1,
                                                                                      "fc2.weight": 1,
                                                                                      "fc3.weight": 1}
    _, _, whole = _plan(m, 0.5, floor=1.0)
    assert not whole.channels and whole.floored
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="floor"):
            _plan(m, 0.5, floor=bad)


# --- the MACs target -------------------------------------------------------------------------------------------

def test_macs_figures_are_exact_on_a_hand_computed_chain():
    m = chain()
    layers, _ = find_layers(m)
    assert layer_macs(m, layers, batch_one=True) == {"wa": 1152, "wd": 576, "wb": 192}
    assert layer_macs(m, layers, {"x": [2, 2, 4, 4]}) == {"wa": 1152, "wd": 576, "wb": 192}  # per sample
    assert layer_macs(m, layers) == {"wa": None, "wd": None, "wb": None}  # figures' rule: no batch, no MACs
    for target in ("params", "macs"):
        _, _, plan = _plan(m, 0.5, target=target, floor=0.0)
        assert plan.macs_total == 1920 and plan.target_macs == 960 and plan.total == 120
        k = len(_removed_rows(plan, "wa"))
        assert _removed_rows(plan, "wd") == _removed_rows(plan, "wa")  # the depthwise conv follows its input
        assert plan.macs_removed == 480 * k and plan.zeros == 30 * k
        assert plan.macs_removed_fraction == 480 * k / 1920 and plan.params_removed_fraction == 30 * k / 120
        assert k == 2  # 2 x 480 = 960 MACs, 2 x 30 = 60 weights: both targets are met by exactly two channels
    _, _, plan = _plan(m, 0.3, target="macs")  # 576 MACs asked for: the second channel overshoots
    assert plan.macs_removed == 960 and plan.target_macs == 576
    d = plan.to_dict()
    assert (d["target"], d["macs_total"], d["macs_removed"], d["target_macs"]) == ("macs", 1920, 960, 576)
    assert d["macs_removed_fraction"] == 0.5 and d["params_removed_fraction"] == 0.5


def test_macs_need_known_shapes():
    m = chain(("H", "W"))
    _, _, plan = _plan(m, 0.5)  # the params target still plans; its MACs figures are unknown
    assert plan.groups_removed and plan.macs_total is None and plan.macs_removed_fraction is None
    assert plan.to_dict()["macs_total"] is None
    with pytest.raises(ValueError, match="--input-shape"):
        _plan(m, 0.5, target="macs")
    _, _, plan = _plan(m, 0.5, target="macs", input_shapes={"x": [1, 2, 8, 8]})
    assert plan.macs_total == 4 * 1920 and plan.macs_removed == 4 * 960  # 64 positions, not 16
    with pytest.raises(ValueError, match="target"):
        _plan(m, 0.5, target="flops")


def test_a_scalar_input_given_its_shape_keeps_the_layers_shapes_known():
    """x * scale[] with scale given as "scale:" (rank 0): the layers' MACs are known (a cleared shape with no dims
    read as an unknown rank, and every layer downstream lost its shape)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]),
             helper.make_node("Conv", ["xs", "w1"], ["a"], pads=[1] * 4), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)]
    m = make_model(nodes, [vi("x", ["N", 3, 8, 8]), vi("scale", [])], [vi("y", ["N", 4, 8, 8])],
                   [init("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                    init("w2", rng.standard_normal((4, 8, 3, 3)).astype(np.float32))])
    layers, _ = find_layers(m)
    want = {"w1": 64 * 8 * 27, "w2": 64 * 4 * 72}
    assert layer_macs(m, layers, {"x": [2, 3, 8, 8], "scale": []}) == want
    assert layer_macs(m, layers, {"x": [2, 3, 8, 8]}) == want
    _, _, plan = _plan(m, 0.5, target="macs", input_shapes={"x": [1, 3, 8, 8], "scale": []})
    assert plan.macs_total == sum(want.values())


def test_a_layer_inside_an_if_branch_is_left_out_of_the_macs_figures(tmp_path):
    """A weight read inside an If branch runs only when its branch does: no MACs per sample. The MACs target plans
    on the other layers and names it (it said every shape was unknown and asked for --input-shape, given)."""
    rng = np.random.default_rng(0)
    then = helper.make_graph([helper.make_node("MatMul", ["h", "wb"], ["to"])], "then", [], [vi("to", None)])
    other = helper.make_graph([helper.make_node("Relu", ["h"], ["eo"])], "else", [], [vi("eo", None)])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a0"]), helper.make_node("Relu", ["a0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "thr"], ["c"]),
             helper.make_node("If", ["c"], ["io"], then_branch=then, else_branch=other),
             helper.make_node("MatMul", ["io", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])],
                   [init("w0", rng.standard_normal((8, 32)).astype(np.float32)),
                    init("w1", rng.standard_normal((32, 16)).astype(np.float32)),
                    init("wb", rng.standard_normal((16, 16)).astype(np.float32)),
                    init("w2", rng.standard_normal((16, 4)).astype(np.float32)), init("thr", np.float32(-1e9))])
    _, _, plan = _plan(m, 0.3, target="macs", input_shapes={"x": [1, 8]})
    assert plan.macs_excluded == ["wb"] and "wb" not in plan.macs_per_layer
    assert plan.macs_total == 8 * 32 + 32 * 16 + 16 * 4 and plan.to_dict()["macs_excluded"] == ["wb"]
    assert plan.macs_removed_fraction >= 0.3
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    res = invoke(path, "-s", "0.3", "--granularity", "channel", "--target", "macs", "--input-shape", "x:1,8",
                 "--no-validate", "-o", tmp_path / "out.onnx", "-q")
    assert res.exit_code == 0, res.output


def test_a_macs_target_spares_a_stem_that_a_params_target_empties():
    m = stem_model()
    macs = {"w1": 73728, "w2": 73728, "wf": 10240}
    layers, _ = find_layers(m)
    assert layer_macs(m, layers, batch_one=True) == macs
    group_macs = {"w1": 73728 // 8 + 73728 // 8, "w2": 73728 // 16 + 10240 // 16}  # one channel, all it touches
    for floor in (0.0, DEFAULT_FLOOR):
        _, _, by_params = _plan(m, 0.3, "global", floor=floor)
        _, _, by_macs = _plan(m, 0.3, "global", floor=floor, target="macs")
        # the params target takes the stem's cheap-looking channels: far more than 30 % of the compute goes
        assert by_params.macs_removed_fraction > 0.6
        assert by_params.sparsity >= 0.3
        # the MACs target stops at 30 % of the compute, within one channel group
        assert by_macs.macs_total == sum(macs.values())
        assert by_macs.target_macs == round(0.3 * sum(macs.values()))
        assert by_macs.target_macs <= by_macs.macs_removed < by_macs.target_macs + max(group_macs.values())
        assert _kept(by_macs, "w1", 8) > _kept(by_params, "w1", 8)
        assert not by_macs.floored


def test_macs_removed_is_what_compaction_deletes_on_the_sample_cnn():
    model, data = sample("cnn")
    m = onnx.load(model)
    x = np.load(data)["x"][:4].astype(np.float32)
    shapes = {"x": list(x.shape)}
    dense_macs = figures(m, shapes)["macs"]
    layers, values, plan = _plan(m, 0.4, target="macs", input_shapes=shapes)
    assert plan.macs_total == dense_macs and plan.macs_removed >= plan.target_macs
    for l, v in zip(layers, values):
        if l.name in plan.masks:
            write_tensor(l.tensor, np.where(plan.masks[l.name], 0, v))
    res = compact(onnxprune.prune(m, 0.0)[0])
    assert figures(res.model, shapes)["macs"] == plan.macs_total - plan.macs_removed
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


# --- calibrated scores --------------------------------------------------------------------------------------------

def _producer_labels(g, name):
    p = next(p for p in g.producers if p.layer.name == name)
    return g.chans[p.out].lab


@pytest.mark.parametrize("order", [[2, 0, 3, 1], [1, 3, 0, 2], [3, 2, 1, 0]])
def test_label_scores_set_the_removal_order(order):
    m = chain()
    seen = []

    def scores(g):
        assert isinstance(g, Graph)
        seen.append(len(g.parent))
        s = np.full(len(g.parent), 100.0)
        s[_producer_labels(g, "wa")[order]] = np.arange(4)  # channel order[0] scores lowest
        return s

    _, _, plan = _plan(m, 0.5, target="macs", label_scores=scores, floor=0.0)
    assert seen and sorted(_removed_rows(plan, "wa")) == sorted(order[:2])
    assert plan.selection == "calibrated" and plan.to_dict()["selection"] == "calibrated"
    _, _, plan = _plan(m, 0.74, label_scores=scores, floor=0.0)  # params: 89 of 120 weights, three channels
    assert sorted(_removed_rows(plan, "wa")) == sorted(order[:3])


def test_label_scores_group_takes_its_members_maximum_and_bad_shapes_are_refused():
    m = onnx.load(sample("cnn")[0])  # conv1 and pw are one group through the residual Add
    layers, _ = find_layers(m)

    def scores(g):
        s = np.zeros(len(g.parent))
        s[_producer_labels(g, "conv1.weight")] = np.arange(16)  # ascending: channel 0 first ...
        s[_producer_labels(g, "pw.weight")] = np.arange(16)[::-1] * 2.0  # ... unless its pw member says otherwise
        s[_producer_labels(g, "branch.weight")] = 1e6
        s[_producer_labels(g, "fc1.weight")] = 1e6
        return s

    _, _, plan = _plan(m, 0.1, label_scores=scores, floor=0.0)
    # group k scores max(k, 2 * (15 - k)): 10 (at k = 10), 11 (k = 11), 12 (k = 9 and 12, graph order), ...;
    # conv1's own scores alone would take 0, 1, 2, ...
    expected = sorted(range(16), key=lambda k: (max(k, 2 * (15 - k)), k))
    got = _removed_rows(plan, "conv1.weight")
    assert got == sorted(expected[:len(got)]) and len(got) >= 2 and 10 in got and 0 not in got
    assert _removed_rows(plan, "pw.weight") == got
    with pytest.raises(ValueError, match="one score per label"):
        _plan(m, 0.1, label_scores=lambda g: np.zeros(3))
    with pytest.raises(ValueError, match="one score per label"):
        _plan(m, 0.1, label_scores=lambda g: np.full(len(g.parent), np.nan))


def test_defaults_are_unchanged_apart_from_the_floor():
    """floor=0 with the other new parameters at their defaults is the plan before they existed: deterministic,
    params target, the allocation's own scores."""
    m = onnx.load(sample("cnn")[0])
    _, _, a = _plan(m, 0.5, floor=0.0)
    _, _, b = _plan(m, 0.5, floor=0.0, target="params", label_scores=None, input_shapes=None)
    assert a.to_dict() == b.to_dict() and a.target == "params" and a.selection == "norm"
    assert a.macs_total == sum(layer_macs(m, find_layers(m)[0], batch_one=True).values())
