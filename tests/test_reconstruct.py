"""Calibrated reconstruction (issue 9): mechanics, not accuracy thresholds."""
import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import init, make_model, run, sample, vi, weights
from onnxprune import prune
from onnxprune.errors import ConfigError
from onnxprune.reconstruct.im2col import conv_pads, im2col


def _data(name, n=128, batch=32):
    d = np.load(sample(name)[1])
    x = d["x"]
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)], x[:n]


def _zeros(model):
    return {k: int(v.size - np.count_nonzero(v)) for k, v in weights(model).items()}


@pytest.fixture(scope="module")
def cnn_cal():
    return _data("cnn")


@pytest.fixture(scope="module")
def mlp_cal():
    return _data("mlp_gemm")


def test_needs_calibration():
    m = onnx.load(sample("mlp_gemm")[0])
    with pytest.raises(ConfigError):
        prune(m, 0.5, reconstruct=True)
    with pytest.raises(ConfigError):
        prune(m, 0.5, reconstruct=True, calibration=[])
    with pytest.raises(ConfigError):
        prune(m, 0.5, reconstruct=True, calibration=[{"x": np.zeros((2, 64), np.float32)}], damping=0.0)


@pytest.mark.parametrize("method", ["lamp", "global", "global-mt", "uniform", "erk", "igq", "random", "lap"])
def test_exact_counts_every_allocation(method, cnn_cal):
    m = onnx.load(sample("cnn")[0])
    plain, rp = prune(m, 0.9, method, effective=False)
    rec, rr = prune(m, 0.9, method, effective=False, reconstruct=True, calibration=cnn_cal[0])
    zp, zr = _zeros(plain), _zeros(rec)
    assert rr.target_pruned == rp.target_pruned
    for a, b in zip(rp.layers, rr.layers):
        assert a.zeros_after == b.zeros_after  # the allocation's count, per layer
        assert zr[b.name] == b.zeros_after == zp[a.name]
    assert sum(l.zeros_after for l in rr.layers) == int(round(0.9 * sum(l.params for l in rr.layers)))
    assert rr.reconstruction["layers"] and all("rel_error_after" in l for l in rr.reconstruction["layers"])


def test_existing_zeros_stay_zero_and_excluded_untouched(mlp_cal):
    m = onnx.load(sample("mlp_gemm")[0])
    w1 = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w1[:, ::3] = 0  # a third of fc1 already zero
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, m.graph.initializer[0].name))
    dense = weights(m)
    out, rep = prune(m, 0.6, reconstruct=True, calibration=mlp_cal[0], exclude=("fc3.weight",))
    got = weights(out)
    assert np.all(got["fc1.weight"][w1 == 0] == 0)
    assert np.array_equal(got["fc3.weight"], dense["fc3.weight"])
    assert np.array_equal(got["fc3.bias"], dense["fc3.bias"])
    assert [l["name"] for l in rep.reconstruction["layers"]] == ["fc1.weight", "fc2.weight"]


def test_layer_error_not_worse_than_magnitude(mlp_cal):
    m = onnx.load(sample("mlp_gemm")[0])
    feeds, x = mlp_cal
    for sp in (0.5, 0.9, 0.98):
        plain, _ = prune(m, sp, effective=False)
        rec, rep = prune(m, sp, effective=False, reconstruct=True, calibration=feeds)
        d, p, r = weights(m), weights(plain), weights(rec)
        z = x @ d["fc1.weight"].T + d["fc1.bias"]  # first layer: same inputs for every variant
        err_p = np.sum((z - (x @ p["fc1.weight"].T + p["fc1.bias"])) ** 2, dtype=np.float64)
        err_r = np.sum((z - (x @ r["fc1.weight"].T + r["fc1.bias"])) ** 2, dtype=np.float64)
        assert err_r <= err_p * (1 + 1e-5)
        for layer in rep.reconstruction["layers"]:
            assert layer["rel_error_after"] <= layer["rel_error_before"] * (1 + 1e-9) + 1e-12


def test_sparsity_zero_is_identity(cnn_cal):
    m = onnx.load(sample("cnn")[0])
    out, rep = prune(m, 0.0, reconstruct=True, calibration=cnn_cal[0])
    assert out.SerializeToString(deterministic=True) == m.SerializeToString(deterministic=True)
    assert rep.reconstruction["layers"] == []


def test_deterministic(cnn_cal):
    m = onnx.load(sample("cnn")[0])
    a, ra = prune(m, 0.95, reconstruct=True, calibration=cnn_cal[0])
    b, rb = prune(m, 0.95, reconstruct=True, calibration=cnn_cal[0])
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert [l["method"] for l in ra.reconstruction["layers"]] == [l["method"] for l in rb.reconstruction["layers"]]


def test_residual_bn_cnn(cnn_cal):
    """Residual Add, Concat, depthwise conv, BN after bias-less convs (absorbs the bias in its running mean)."""
    m = onnx.load(sample("cnn")[0])
    feeds, x = cnn_cal
    plain, _ = prune(m, 0.95)
    rec, rep = prune(m, 0.95, reconstruct=True, calibration=feeds)
    layers = {l["name"]: l for l in rep.reconstruction["layers"]}
    assert layers["dw.weight"]["groups"] == 16 and layers["dw.weight"]["inputs"] == 9
    assert layers["conv1.weight"]["bias"] == "bn" and layers["branch.weight"]["bias"] == "tensor"
    assert {"bn1.running_mean", "branch.bias", "fc1.bias"} <= set(rep.reconstruction["biases_changed"])
    d = weights(m)
    r = weights(rec)
    assert np.array_equal(d["bn1.weight"], r["bn1.weight"])
    assert np.array_equal(d["bn1.running_var"], r["bn1.running_var"])
    ref = run(m, {"x": x})[0]
    err_plain = np.mean((run(plain, {"x": x})[0] - ref) ** 2)
    err_rec = np.mean((run(rec, {"x": x})[0] - ref) ** 2)
    assert err_rec < err_plain
    onnx.checker.check_model(rec)


def test_torch_export_with_conv_bias(cnn_cal):
    m = onnx.load(sample("cnn_torch")[0])
    rec, rep = prune(m, 0.9, reconstruct=True, calibration=cnn_cal[0])
    assert all(l["method"] != "plain" for l in rep.reconstruction["layers"])
    assert "dw.bias" in rep.reconstruction["biases_changed"]


def test_gemm_and_matmul_layouts_agree(mlp_cal):
    g = onnx.load(sample("mlp_gemm")[0])
    mm = onnx.load(sample("mlp_matmul")[0])
    a, ra = prune(g, 0.9, reconstruct=True, calibration=mlp_cal[0])
    b, rb = prune(mm, 0.9, reconstruct=True, calibration=mlp_cal[0])
    wa, wb = weights(a), weights(b)
    for (gw, gb), (mw, mb) in zip([("fc1.weight", "fc1.bias"), ("fc2.weight", "fc2.bias"), ("fc3.weight", "fc3.bias")],
                                  [("dense1/kernel", "dense1/bias"), ("dense2/kernel", "dense2/bias"),
                                   ("dense3/kernel", "dense3/bias")]):
        assert np.array_equal(wa[gw] != 0, wb[mw].T != 0)
        np.testing.assert_allclose(wa[gw], wb[mw].T, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(wa[gb], wb[mb], rtol=1e-3, atol=1e-5)
    assert [l["bias"] for l in rb.reconstruction["layers"]] == ["tensor"] * 3  # the following Add's constant


def _conv_case(rng, C, O, g, k, s, dil, p, ap):
    x = rng.standard_normal((2, C) + (7,) * len(k)).astype(np.float32)
    W = rng.standard_normal((O, C // g) + k).astype(np.float32)
    attrs = dict(group=g, strides=list(s), dilations=list(dil), auto_pad=ap)
    if p:
        attrs["pads"] = p
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [vi("x", list(x.shape))],
                   [vi("y", None)], [init("w", W)])
    return m, x, W, attrs


@pytest.mark.parametrize("case", [
    (4, 6, 2, (3, 3), (2, 1), (1, 2), [1, 0, 2, 1], "NOTSET"),
    (3, 3, 3, (3,), (1,), (1,), [1, 1], "NOTSET"),
    (2, 4, 1, (2, 3), (2, 2), (1, 1), None, "SAME_UPPER"),
    (2, 4, 1, (3, 2), (2, 1), (1, 1), None, "SAME_LOWER"),
    (2, 4, 2, (2, 2, 2), (1, 2, 1), (1, 1, 2), [0, 1, 0, 1, 0, 1], "NOTSET"),
    (4, 4, 1, (3, 3), (3, 3), (2, 1), None, "VALID"),
])
def test_im2col_matches_ort_conv(case):
    C, O, g, k, s, dil, p, ap = case
    m, x, W, _ = _conv_case(np.random.default_rng(1), *case)
    y = run(m, {"x": x})[0]
    P = im2col(x, k, s, dil, conv_pads(x.shape[2:], k, s, dil, p, ap), g)
    og = O // g
    yy = np.concatenate([P[i] @ W[i * og:(i + 1) * og].reshape(og, -1).T.astype(np.float64) for i in range(g)], 1)
    yy = np.moveaxis(yy.reshape((2,) + y.shape[2:] + (O,)), -1, 1)
    np.testing.assert_allclose(yy, y, rtol=1e-4, atol=1e-4)


def _mlp_graph(rng, first_node, w1_init, extra_nodes=(), dtype=np.float32):
    """x[N,8] -> first layer (16 outputs) -> Relu -> MatMul w2 -> y, returning the model and feeds."""
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w2 = rng.standard_normal((16, 4)).astype(dtype)
    nodes = list(extra_nodes) + [first_node, helper.make_node("Relu", ["h"], ["r"]),
                                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    m = make_model(nodes, [vi("x", ["N", 8], tp)], [vi("y", ["N", 4], tp)], list(w1_init) + [init("w2", w2)])
    x = rng.standard_normal((64, 8)).astype(dtype)
    return m, [{"x": x[:32]}, {"x": x[32:]}], x


def _first_layer_error(m, out, x, name="h"):
    """Squared error of the first layer's output (same inputs) vs the dense model."""
    def h(model):
        mm = onnx.ModelProto()
        mm.CopyFrom(model)
        mm.graph.output.append(onnx.ValueInfoProto(name=name))
        return run(mm, {"x": x})[-1].astype(np.float64)
    return float(np.sum((h(m) - h(out)) ** 2))


def test_constant_node_weight():
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1"))
    m, feeds, x = _mlp_graph(rng, helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), [], [const])
    plain, _ = prune(m, 0.75, effective=False)
    rec, rep = prune(m, 0.75, effective=False, reconstruct=True, calibration=feeds)
    r = weights(rec)["w1"]
    p = weights(plain)["w1"]
    assert int(np.count_nonzero(r == 0)) == rep.layers[0].zeros_after == p.size - np.count_nonzero(p)
    assert not np.array_equal(r[r != 0], w1[r != 0])  # refit, not just masked
    assert _first_layer_error(m, rec, x) <= _first_layer_error(m, plain, x) * (1 + 1e-5)


def test_fp16_weights_written_back_in_fp16():
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 16)).astype(np.float16)
    b1 = rng.standard_normal(16).astype(np.float16)
    node = helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1")
    m, feeds, x = _mlp_graph(rng, node, [init("w1", w1), init("b1", b1)], dtype=np.float16)
    plain, rp = prune(m, 0.75, effective=False)
    rec, rep = prune(m, 0.75, effective=False, reconstruct=True, calibration=feeds)
    wr = weights(rec)
    assert wr["w1"].dtype == np.float16 and wr["b1"].dtype == np.float16
    assert [l.zeros_after for l in rep.layers] == [l.zeros_after for l in rp.layers]
    assert int(np.count_nonzero(wr["w1"] == 0)) == rep.layers[0].zeros_after
    assert "b1" in rep.reconstruction["biases_changed"]
    assert _first_layer_error(m, rec, x) <= _first_layer_error(m, plain, x) * 1.01


def test_gemm_alpha_beta_transa_fold():
    """alpha / beta / transA are folded into the problem: same masks as the equivalent plain Gemm."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    a = helper.make_node("Gemm", ["xt", "w1", "b1"], ["h"], name="fc1", alpha=2.0, beta=0.5, transA=1, transB=1)
    t = helper.make_node("Transpose", ["x"], ["xt"])
    m1, feeds, x = _mlp_graph(rng, a, [init("w1", w1), init("b1", b1)], [t])
    rng = np.random.default_rng(4)
    rng.standard_normal((16, 8)), rng.standard_normal(16)
    b = helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)
    m2, _, _ = _mlp_graph(rng, b, [init("w1", 2 * w1), init("b1", 0.5 * b1)])
    r1, rep1 = prune(m1, 0.7, effective=False, reconstruct=True, calibration=feeds)
    r2, rep2 = prune(m2, 0.7, effective=False, reconstruct=True, calibration=feeds)
    a1, a2 = weights(r1), weights(r2)
    assert np.array_equal(a1["w1"] != 0, a2["w1"] != 0)
    np.testing.assert_allclose(2 * a1["w1"], a2["w1"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(0.5 * a1["b1"], a2["b1"], rtol=1e-3, atol=1e-5)


def _gemm_mlp(w1, w2):
    """x [64, 8] -> Gemm(w1 [16, 8], transB) -> Relu -> Gemm(w2 [4, 16], transB): the reference layout."""
    return make_model([helper.make_node("Gemm", ["x", "w1"], ["h"], name="mm1", transB=1),
                       helper.make_node("Relu", ["h"], ["r"]),
                       helper.make_node("Gemm", ["r", "w2"], ["y"], name="mm2", transB=1)],
                      [vi("x", [64, 8])], [vi("y", [64, 4])], [init("w1", w1), init("w2", w2)])


def test_weight_on_the_left_of_matmul():
    """W @ x^T is the transposed problem of x @ W^T: the same masks and values."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 16)).astype(np.float32)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    left = make_model([helper.make_node("Transpose", ["x"], ["xt"]),
                       helper.make_node("MatMul", ["w1", "xt"], ["h"], name="mm1"),
                       helper.make_node("Relu", ["h"], ["r"]),
                       helper.make_node("MatMul", ["w2", "r"], ["yt"], name="mm2"),
                       helper.make_node("Transpose", ["yt"], ["y"])],
                      [vi("x", [64, 8])], [vi("y", [64, 4])], [init("w1", w1), init("w2", w2)])
    right = _gemm_mlp(w1, w2)
    feeds = [{"x": x}]
    a, ra = prune(left, 0.7, effective=False, reconstruct=True, calibration=feeds)
    b, rb = prune(right, 0.7, effective=False, reconstruct=True, calibration=feeds)
    wa, wb = weights(a), weights(b)
    for name in ("w1", "w2"):
        assert np.array_equal(wa[name] != 0, wb[name] != 0)
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-3, atol=1e-5)
    assert [l["method"] for l in ra.reconstruction["layers"]] == [l["method"] for l in rb.reconstruction["layers"]]


def test_tied_weight_one_refit_for_every_consumer():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h1"], name="a"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w"], ["y"], name="b")]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])], [init("w", w)])
    x = rng.standard_normal((64, 8)).astype(np.float32)
    plain, rp = prune(m, 0.5, effective=False)
    rec, rep = prune(m, 0.5, effective=False, reconstruct=True, calibration=[{"x": x}])
    (layer,) = rep.reconstruction["layers"]
    assert layer["rows"] == 128 and layer["method"] != "plain"  # both consumers' inputs stacked
    assert int(np.count_nonzero(weights(rec)["w"] == 0)) == rp.layers[0].zeros_after == 32
    assert layer["rel_error_after"] <= layer["rel_error_before"]


def test_unsupported_layer_falls_back_with_warning(caplog):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="ct", auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="c")]
    m = make_model(nodes, [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 2, 3, 3])], [init("w", w), init("w2", w2)])
    x = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
    plain, _ = prune(m, 0.6, effective=False)
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        rec, rep = prune(m, 0.6, effective=False, reconstruct=True, calibration=[{"x": x}])
    assert np.array_equal(weights(rec)["w"], weights(plain)["w"])  # plain selection for the ConvTranspose
    ct, conv = rep.reconstruction["layers"]
    assert ct["method"] == "plain" and "ConvTranspose" in ct["fallback"]
    assert conv["method"] != "plain"
    assert any("not reconstructed" in w for w in rep.warnings) and "not reconstructed" in caplog.text


def test_dry_run_writes_nothing(cnn_cal):
    m = onnx.load(sample("cnn")[0])
    out, rep = prune(m, 0.9, reconstruct=True, calibration=cnn_cal[0], dry_run=True)
    assert out.SerializeToString(deterministic=True) == m.SerializeToString(deterministic=True)
    assert rep.reconstruction["layers"]


def test_calibration_problems_are_reported(mlp_cal):
    from onnxprune.errors import InputError
    m = onnx.load(sample("mlp_gemm")[0])
    with pytest.raises(InputError, match="no array for input"):
        prune(m, 0.5, reconstruct=True, calibration=[{"z": np.zeros((2, 64), np.float32)}])
    _, rep = prune(m, 0.5, reconstruct=True, calibration=mlp_cal[0], calibration_labels=np.zeros(128, int),
                   calibration_info={"path": "cal.npz", "samples": 128})
    assert any("one label" in w for w in rep.warnings)
    assert rep.reconstruction["calibration"] == {"path": "cal.npz", "samples": 128}
    assert rep.reconstruction["samples"] == 128 and rep.reconstruction["damping"] == 0.03
    labels = np.load(sample("mlp_gemm")[1])["y"][:128]
    _, rep = prune(m, 0.5, reconstruct=True, calibration=mlp_cal[0], calibration_labels=labels)
    assert not any("label" in w for w in rep.warnings)
    skewed = np.r_[np.zeros(100), np.arange(28)]
    _, rep = prune(m, 0.5, reconstruct=True, calibration=mlp_cal[0], calibration_labels=skewed)
    assert any("unbalanced" in w for w in rep.warnings)


def test_reported_error_is_the_real_output_error_on_the_pruned_prefix(mlp_cal):
    """fc2's objective: inputs from the reconstructed prefix, targets from the dense model; the report's relative
    errors are exactly that error measured on the calibration data."""
    m = onnx.load(sample("mlp_gemm")[0])
    feeds, x = mlp_cal
    plain, _ = prune(m, 0.9, effective=False)
    rec, rep = prune(m, 0.9, effective=False, reconstruct=True, calibration=feeds)
    d, p, r = weights(m), weights(plain), weights(rec)

    def h1(w):
        return np.maximum(x.astype(np.float64) @ w["fc1.weight"].T.astype(np.float64) + w["fc1.bias"], 0)

    def z2(w, h):
        return h @ w["fc2.weight"].T.astype(np.float64) + w["fc2.bias"]
    target = z2(d, h1(d))
    energy = np.sum(target ** 2)
    layer = {l["name"]: l for l in rep.reconstruction["layers"]}["fc2.weight"]
    after = np.sum((target - z2(r, h1(r))) ** 2) / energy
    before = np.sum((target - z2(p, h1(r))) ** 2) / energy  # plain selection of fc2 on the same pruned inputs
    assert layer["rel_error_after"] == pytest.approx(after, rel=1e-3)
    assert layer["rel_error_before"] == pytest.approx(before, rel=1e-3)
    assert after < before


def test_too_wide_layer_falls_back_to_plain_selection(mlp_cal, monkeypatch):
    import onnxprune.pipeline as pipeline
    original = pipeline.PruneConfig.reconstruct_options

    def narrow(self):
        opts = original(self)
        opts.max_inputs = 40  # fc1 has 64 inputs per row, fc2 64, fc3 32
        return opts
    monkeypatch.setattr(pipeline.PruneConfig, "reconstruct_options", narrow)
    m = onnx.load(sample("mlp_gemm")[0])
    plain, _ = prune(m, 0.8, effective=False)
    rec, rep = prune(m, 0.8, effective=False, reconstruct=True, calibration=mlp_cal[0])
    layers = {l["name"]: l for l in rep.reconstruction["layers"]}
    assert layers["fc1.weight"]["method"] == "plain" and "H would not fit" in layers["fc1.weight"]["fallback"]
    assert layers["fc3.weight"]["method"] != "plain"
    assert np.array_equal(weights(rec)["fc1.weight"], weights(plain)["fc1.weight"])
    assert sum("not reconstructed" in w for w in rep.warnings) == 2


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_solves_match_the_dense_ones(bias):
    """Fewer sample rows than inputs: the Woodbury paths (m x m systems) give the dense inverse's W*, inverse
    diagonal and per-row refits."""
    from onnxprune.reconstruct.solver import Group
    rng = np.random.default_rng(3)
    m, d, out = 12, 40, 7
    X = np.concatenate([rng.standard_normal((m, d)) + 0.3, np.ones((m, 1))], axis=1)
    Xd = X + 0.05 * rng.standard_normal(X.shape)
    Xd[:, d] = 1.0
    R = rng.standard_normal((out, d))
    b = rng.standard_normal(out) if bias else None
    Wt = np.concatenate([R, (b if bias else np.zeros(out))[:, None]], axis=1)
    Y = Xd @ Wt.T
    H, GW = X.T @ X / m, X.T @ Y / m
    ym, ysq = Y.mean(0), (Y ** 2).mean(0)

    def group(low):
        return Group(R, b, H.copy(), GW.copy(), ym, ysq, 0.03, X.copy() if low else None)
    lo, hi = group(True), group(False)
    assert lo._use_lowrank(d) and not hi._use_lowrank(d)
    (w1, h1), (w2, h2) = lo.unconstrained(), hi.unconstrained()
    np.testing.assert_allclose(w1, w2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(h1, h2, rtol=1e-8, atol=1e-12)
    keep = rng.random((out, d)) < np.linspace(0.1, 0.95, out)[:, None]  # some rows wider than 2 m, some not
    assert (keep.sum(1) >= 2 * m).any() and (keep.sum(1) < 2 * m).any()
    r1, r2 = lo.refit(keep), hi.refit(keep)
    np.testing.assert_allclose(r1.w, r2.w, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(r1.q, r2.q, rtol=1e-7, atol=1e-9)
    assert np.all(r1.w[:, :d][~keep] == 0)
    e = [np.sum((Y - X @ r.w.T) ** 2) / m for r in (r1, r2)]  # the reported error is the real one
    assert lo.error(r1) == pytest.approx(e[0], rel=1e-6) and hi.error(r2) == pytest.approx(e[1], rel=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_refit_through_the_pruned_columns_matches_the_direct_solve(bias):
    """Rows keeping most inputs are solved through the pruned ones with H_lambda^-1 (kept after the OBS
    saliency): the same optimum as the direct |S| x |S| solve, zeros exactly where pruned."""
    from onnxprune.reconstruct.solver import Group
    rng = np.random.default_rng(8)
    m, d, out = 200, 30, 9
    X = np.concatenate([rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2,
                        np.ones((m, 1))], axis=1)
    R = rng.standard_normal((out, d))
    b = rng.standard_normal(out) if bias else None
    Y = X @ np.concatenate([R, (b if bias else np.zeros(out))[:, None]], axis=1).T
    H, GW = X.T @ X / m, X.T @ Y / m

    def group():
        return Group(R, b, H.copy(), GW.copy(), Y.mean(0), (Y ** 2).mean(0), 0.03)
    keep = rng.random((out, d)) < np.linspace(0.2, 0.97, out)[:, None]
    keep[-1] = True  # nothing pruned
    direct, via = group(), group()
    via.saliency()  # computes (and keeps) the inverse
    assert "Hinv" in via.cache and "Hinv" not in direct.cache
    r1, r2 = direct.refit(keep), via.refit(keep)
    assert (keep.sum(1) + bias > 0.55 * (d + bias)).sum() >= 3  # some rows take the complement path
    np.testing.assert_allclose(r2.w, r1.w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(r2.q, r1.q, rtol=1e-8, atol=1e-10)
    assert np.all(r2.w[:, :d][~keep] == 0)


def test_complement_refit_reports_the_quadratic_of_its_own_weights():
    """Inputs with a large mean (the bias entry is undamped) and a tiny damping: H_lambda is ill-conditioned and the
    complement solve's residual is no longer negligible, so w^T H w comes from the weights (the reported error
    and the mean/variance correction match the direct solve's)."""
    from onnxprune.reconstruct.solver import Group
    rng = np.random.default_rng(9)
    m, d, out = 300, 24, 6
    X = np.concatenate([1000 + rng.standard_normal((m, d)), np.ones((m, 1))], axis=1)
    R, b = rng.standard_normal((out, d)), rng.standard_normal(out)
    Y = X @ np.concatenate([R, b[:, None]], axis=1).T
    H, GW = X.T @ X / m, X.T @ Y / m
    keep = rng.random((out, d)) < 0.8
    groups = [Group(R, b, H.copy(), GW.copy(), Y.mean(0), (Y ** 2).mean(0), 1e-8) for _ in range(2)]
    groups[1].saliency()
    r1, r2 = groups[0].refit(keep), groups[1].refit(keep)
    true = [float(np.sum((Y - X @ r.w.T) ** 2) / m) for r in (r1, r2)]
    assert groups[1].error(r2) == pytest.approx(true[1], rel=1e-6)
    assert groups[1].error(r2) == pytest.approx(groups[0].error(r1), rel=1e-6)
    np.testing.assert_allclose(groups[1].correct(r2).w, groups[0].correct(r1).w, rtol=1e-6, atol=1e-6)


def test_im2col_row_step_keeps_every_step_th_row():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 7, 6)).astype(np.float32)
    args = ((3, 2), (2, 1), (1, 2), [1, 0, 1, 2], 2)
    full = im2col(x, *args)
    for step in (2, 3, 5):
        np.testing.assert_array_equal(im2col(x, *args, step=step), full[:, ::step])


def test_blocked_spd_inverse_matches_lapack():
    from onnxprune.reconstruct.solver import spd_inverse
    rng = np.random.default_rng(5)
    X = rng.standard_normal((60, 45))
    H = np.concatenate([X, np.ones((60, 1))], axis=1)
    H = H.T @ H / 60
    H[np.arange(45), np.arange(45)] += 0.03  # damped weights, undamped bias entry: positive definite
    for block in (7, 16, 46, 64):
        np.testing.assert_allclose(spd_inverse(H, block), np.linalg.inv(H), rtol=1e-9, atol=1e-10)


def test_weight_behind_a_transpose_is_reconstructed_like_a_gemm():
    """MatMul(x, Transpose(W)) (PyTorch dynamo exports) is the Gemm(x, W, transB=1) problem: same masks, values."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 16)).astype(np.float32)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    dyn = make_model([helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
                      helper.make_node("MatMul", ["x", "w1t"], ["h"], name="mm1"),
                      helper.make_node("Relu", ["h"], ["r"]),
                      helper.make_node("Transpose", ["w2"], ["w2t"]),
                      helper.make_node("MatMul", ["r", "w2t"], ["y"], name="mm2")],
                     [vi("x", [64, 8])], [vi("y", [64, 4])], [init("w1", w1), init("w2", w2)])
    gemm = _gemm_mlp(w1, w2)
    feeds = [{"x": x}]
    a, ra = prune(dyn, 0.7, effective=False, reconstruct=True, calibration=feeds)
    b, rb = prune(gemm, 0.7, effective=False, reconstruct=True, calibration=feeds)
    assert all(l["method"] != "plain" for l in ra.reconstruction["layers"])
    wa, wb = weights(a), weights(b)
    for name in ("w1", "w2"):
        assert np.array_equal(wa[name] != 0, wb[name] != 0)
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-3, atol=1e-5)
