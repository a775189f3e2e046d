"""Channel-level pruning: whole channels, coupled groups, never a whole layer, the counts it reports."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.channels import channel_plan
from onnxprune.compact import compact
from onnxprune.graph import find_layers
from onnxprune.io import write_tensor
from tests.conftest import run, sample
from tests.test_compact import transformer_block

RNG = np.random.default_rng(0)


def _plan(model, sparsity, allocation="lamp", align=1, exclude=(), **kw):
    layers, _ = find_layers(model, exclude)
    values = [numpy_helper.to_array(l.tensor) for l in layers]
    return layers, values, channel_plan(model, layers, values, sparsity, allocation, align, **kw)


def _apply(layers, values, plan):
    for l, v in zip(layers, values):
        if l.name in plan.masks:
            write_tensor(l.tensor, np.where(plan.masks[l.name], 0, v))


def _out_axis(layer):
    return layer.consumers[0].layout.out_axis % len(layer.shape)


@pytest.mark.parametrize("name", ["cnn", "cnn_torch", "mlp_gemm", "mlp_matmul"])
@pytest.mark.parametrize("allocation", ["lamp", "global", "uniform", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_whole_channels_counts_and_compaction(name, allocation, sparsity):
    model = onnx.load(sample(name)[0])
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    # floor 0: at 90 % the MLPs need layers below the default floor (a quarter of their channels) to reach the target
    layers, values, plan = _plan(model, sparsity, allocation, floor=0.0)
    total = sum(v.size for v in values)
    assert plan.total == total and plan.target_zeros == round(sparsity * total)
    # the figure reported is the count the masks make, and at least the target
    zeros = sum(int(np.count_nonzero(plan.masks.get(l.name, np.zeros(v.shape, bool)) | (v == 0)))
                for l, v in zip(layers, values))
    assert plan.zeros == zeros >= plan.target_zeros
    assert plan.sparsity == pytest.approx(zeros / total)
    assert plan.sparsity - sparsity < 0.03  # one group at most over the target on these small models
    for l, v in zip(layers, values):
        m = plan.masks.get(l.name)
        if m is None or l.name not in plan.channels:
            continue
        ax = _out_axis(l)
        rows = np.moveaxis(m, ax, 0).reshape(m.shape[ax], -1)
        whole = rows.all(axis=1)
        before, removed = plan.channels[l.name]
        assert int(whole.sum()) == removed < before  # never every channel
    _apply(layers, values, plan)
    # the normal pipeline's removal, then compaction, shrinks the shapes by what the masks removed
    pruned, _ = onnxprune.prune(model, 0.0)
    res = compact(pruned)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.params_before - res.params_after >= zeros - sum(int(np.count_nonzero(v == 0)) for v in values)
    assert res.channels_removed >= sum(r for _, r in plan.channels.values())
    x = RNG.standard_normal((4, 1, 8, 8) if "cnn" in name else (4, 64)).astype(np.float32)
    for a, b in zip(run(model, {"x": x}), run(res.model, {"x": x})):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert not np.allclose(run(dense, {"x": x})[0], run(res.model, {"x": x})[0])  # it did prune


def test_residual_coupling_removes_channels_together():
    model = onnx.load(sample("cnn")[0])
    layers, values, plan = _plan(model, 0.6)
    rows = {}
    for l in layers:
        if l.name in ("conv1.weight", "pw.weight"):
            m = plan.masks[l.name]
            rows[l.name] = m.reshape(m.shape[0], -1).all(axis=1)
    assert rows["conv1.weight"].any()
    np.testing.assert_array_equal(rows["conv1.weight"], rows["pw.weight"])
    dw = plan.masks["dw.weight"].reshape(16, -1).all(axis=1)  # the depthwise conv follows its input channels
    np.testing.assert_array_equal(dw, rows["conv1.weight"])
    fc1 = plan.masks["fc1.weight"]  # Flatten -> Gemm: the channel's 16 features are read with zero weights
    removed = np.flatnonzero(rows["conv1.weight"])
    cols = fc1.all(axis=0).reshape(24, 16)
    assert cols[removed].all()


def test_align_and_floor():
    model = onnx.load(sample("mlp_gemm")[0])
    layers, values, plan = _plan(model, 0.95, align=8)
    for name, (before, removed) in plan.channels.items():
        assert (before - removed) % 8 == 0 and before - removed >= 8
    layers, values, plan = _plan(model, 0.99)
    for name, (before, removed) in plan.channels.items():
        assert before - removed >= 1
    assert "fc3.weight" not in plan.channels  # its outputs are the graph output


def test_deterministic_and_exclude():
    model = onnx.load(sample("cnn")[0])
    _, _, a = _plan(model, 0.7)
    _, _, b = _plan(model, 0.7)
    assert a.to_dict() == b.to_dict() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    _, _, c = _plan(model, 0.7, exclude=("fc1*",))
    assert "fc1.weight" not in c.masks and "fc1.weight" not in c.channels
    with pytest.raises(ValueError):
        _plan(model, 0.5, allocation="igq")


def test_transformer_block_channels():
    model = transformer_block()
    layers, values, plan = _plan(model, 0.5)
    assert "ff1.w" in plan.channels and "q.w" not in plan.channels
    _apply(layers, values, plan)
    res = compact(onnxprune.prune(model, 0.0)[0])
    onnx.checker.check_model(res.model, full_check=True)
    x = RNG.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert res.params_after < res.params_before
