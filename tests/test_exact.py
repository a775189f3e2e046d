import itertools

import numpy as np
import pytest
from onnx import helper

from onnxprune import prune

from conftest import init, make_model, sample, vi


def corner_model(tap):
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[(0, 0) + tap] = 1.0
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", [1, 1, 1, 1])], [vi("y", [1, 1])], [init("w", w), init("fc", np.ones((1, 1), np.float32))])


def test_corner_tap_reads_only_padding():
    """ALGORITHMS.md 5.2: unit-level says both weights effective; exact says none (corner), both (centre)."""
    _, ch = prune(corner_model((0, 0)), sparsity=0.0, dry_run=True)
    _, ex = prune(corner_model((0, 0)), sparsity=0.0, dry_run=True, effective_mode="exact")
    assert ch.totals()["effective_zeros"] == 8 and ch.connectivity["mode"] == "channel"
    assert ex.totals()["effective_zeros"] == 10 and ex.connectivity["mode"] == "exact"
    _, centre = prune(corner_model((1, 1)), sparsity=0.0, dry_run=True, effective_mode="exact")
    assert centre.totals()["effective_zeros"] == 8


@pytest.mark.parametrize("stride,pad,dil,size", [(1, 1, 1, 5), (2, 1, 1, 6), (2, 0, 1, 7), (1, 2, 2, 4), (3, 2, 1, 5)])
def test_single_conv_taps_match_brute_force(stride, pad, dil, size):
    rng = np.random.default_rng(stride * 10 + pad)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[pad] * 4, strides=[stride] * 2,
                              dilations=[dil] * 2),
             helper.make_node("Flatten", ["c"], ["f"])]
    m = make_model(nodes, [vi("x", [1, 2, size, size])], [vi("f", None)], [init("w", w)])
    out = (size + 2 * pad - dil * 2 - 1) // stride + 1
    reads = [any(0 <= o * stride + t * dil - pad < size for o in range(out)) for t in range(3)]
    live_taps = sum(reads[a] and reads[b] for a, b in itertools.product(range(3), range(3)))
    _, rep = prune(m, sparsity=0.0, dry_run=True, effective_mode="exact")
    assert rep.connectivity["mode"] == "exact"
    assert rep.totals()["params"] - rep.totals()["effective_zeros"] == 6 * live_taps


def test_exact_is_at_least_channel_level_and_equal_on_mlp():
    for name in ("cnn", "mlp_gemm"):
        path = sample(name)[0]
        _, ch = prune(path, sparsity=0.97, method="random", dry_run=True)
        _, ex = prune(path, sparsity=0.97, method="random", dry_run=True, effective_mode="exact")
        assert ex.connectivity["mode"] == "exact"
        if name == "mlp_gemm":
            assert ex.totals()["effective_zeros"] == ch.totals()["effective_zeros"]
        else:
            assert ex.totals()["effective_zeros"] >= ch.totals()["effective_zeros"]


def test_unsupported_graph_falls_back_to_channel_with_a_warning():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("TopK", ["h", "k"], ["v", "i"])]
    m = make_model(nodes, [vi("x", [1, 4])], [vi("v", None)],
                   [init("w", np.ones((4, 4), np.float32)), init("k", np.array([2], np.int64))])
    _, rep = prune(m, sparsity=0.5, effective_mode="exact", effective=False)
    assert rep.connectivity["mode"] == "channel" and "exact" in rep.warnings[-1]


def test_cli_exact_mode_and_effective_target(tmp_path):
    import json
    from click.testing import CliRunner
    from onnxprune.cli import main
    r = CliRunner().invoke(main, [sample("cnn")[0], "-s", "0.99", "-m", "random", "--effective-mode", "exact",
                                  "--target", "effective", "--no-validate", "-o", str(tmp_path / "o.onnx"), "--json", "-q"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["connectivity"]["mode"] == "exact"
    assert doc["totals"]["effective_zeros"] <= round(0.99 * 14304) == doc["options"]["effective_target"]["wanted_zeros"]
