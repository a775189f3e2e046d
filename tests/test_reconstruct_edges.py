"""Calibrated reconstruction on graph edges a fuzz campaign found: 1-D MatMul weights, fed values whose dims differ,
and telling a calibration batch the model cannot run from a prefix we cut wrong."""
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import init, invoke, make_model, run, vi, weights
from onnxprune import prune
from onnxprune.graph import find_layers
from onnxprune.reconstruct import activations
from onnxprune.reconstruct.problems import Graph, other_readers


@pytest.mark.parametrize("left", [False, True])
def test_one_dimensional_matmul_weight_reconstructs(left, tmp_path):
    """x @ v with v[K] (a scoring vector) and v @ h: one output row of K inputs, solved like any other (was exit 70:
    the progress estimate read the weight's output axis, which a 1-D weight has none of)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    if left:  # v[32] @ t[N, 32, 8]
        v = (rng.standard_normal(32) / 6).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["v", "t"], ["y"])]
        shape, out = ["N", 8, 16], ["N", 8]
    else:  # h[N, 32] @ v[32]
        v = (rng.standard_normal(32) / 6).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("MatMul", ["r", "v"], ["y"])]
        shape, out = ["N", 16], ["N"]
    m = make_model(nodes, [vi("x", shape)], [vi("y", out)], [init("w1", w1), init("v", v)])
    x = rng.standard_normal([64] + shape[1:]).astype(np.float32)
    pruned, rep = prune(m, 0.5, effective=False, reconstruct=True, calibration=[{"x": x[:32]}, {"x": x[32:]}])
    layers = {l["name"]: l for l in rep.reconstruction["layers"]}
    assert layers["v"]["method"] != "plain", layers["v"]
    assert layers["v"]["rel_error_after"] <= layers["v"]["rel_error_before"] + 1e-12
    got = weights(pruned)
    assert int(np.count_nonzero(got["w1"] == 0) + np.count_nonzero(got["v"] == 0)) == round(0.5 * (512 + v.size))
    run(pruned, {"x": x})
    path, data = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(m, path)
    np.savez(data, x=x)
    res = invoke(path, "-s", "0.5", "--calibration", data, "-o", tmp_path / "out.onnx", "-q")
    assert res.exit_code == 0, res.output


def test_fed_values_of_different_sizes_are_declared_apart():
    """An activation h [N, 10, 8] and a Constant-node weight [8, 8] fed to one prefix: no dim of one is declared
    equal to a dim of the other (shared names d0, d1 made ONNX Runtime reuse a buffer of the wrong size: exit 3 on
    a valid model)."""
    rng = np.random.default_rng(1)
    D, T = 8, 10

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["wk"], value=numpy_helper.from_array(w(D, D), "wk")),
             helper.make_node("MatMul", ["x", "wk"], ["h0"]), helper.make_node("Add", ["x", "h0"], ["h"]),
             helper.make_node("MatMul", ["h", "wk"], ["q"]), helper.make_node("MatMul", ["h", "wk2"], ["k"]),
             helper.make_node("MatMul", ["h", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"]), helper.make_node("MatMul", ["a", "wo"], ["o"]),
             helper.make_node("Add", ["h", "o"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", T, D])], [vi("y", ["N", T, D])],
                   [init("wk2", w(D, D)), init("wv", w(D, D)), init("wo", w(D, D))])
    x = rng.standard_normal((8, T, D)).astype(np.float32)
    payload, _, _, _, _ = activations.prefix_model(m, ["o"], {"h": x, "wk": w(D, D)})
    fed = [i for i in onnx.load_from_string(payload).graph.input if i.name in ("h", "wk")]
    assert fed and all(not d.dim_param and not d.HasField("dim_value")
                       for i in fed for d in i.type.tensor_type.shape.dim)
    pruned, rep = prune(m, 0.7, effective=False, reconstruct=True, calibration=[{"x": x}, {"x": x[::-1].copy()}])
    assert all(l["method"] != "plain" for l in rep.reconstruction["layers"] if l["name"] != "wk"), \
        rep.reconstruction["layers"]
    run(pruned, {"x": x})


def _chain(rng):
    """x @ w1 -> Relu -> @ w2 -> Relu -> + b (a second input) -> @ w3: w3's prefix starts from captured values."""
    w1 = rng.standard_normal((6, 12)).astype(np.float32)
    w2 = rng.standard_normal((12, 12)).astype(np.float32)
    w3 = rng.standard_normal((12, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Add", ["r2", "b"], ["s"]), helper.make_node("MatMul", ["s", "w3"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 6]), vi("b", ["N", "K"])], [vi("y", ["N", 4])],
                      [init("w1", w1), init("w2", w2), init("w3", w3)])


def _chain_files(tmp_path, rng, k):
    """``_chain`` saved as m.onnx with 16 calibration samples (b [16, k]) in cal.npz: (model path, data path)."""
    path, data = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(_chain(rng), path)
    np.savez(data, x=rng.standard_normal((16, 6)).astype(np.float32),
             b=rng.standard_normal((16, k)).astype(np.float32))
    return path, data


def test_a_prefix_failing_on_a_batch_the_model_runs_falls_back_for_that_layer(monkeypatch, tmp_path):
    """A prefix that fails at run time on captured values while the model runs the batch from its inputs is our
    cut's fault: that layer keeps plain selection (reason in the report) and the run exits 0, never exit 3."""
    rng = np.random.default_rng(2)
    path, data = _chain_files(tmp_path, rng, 12)
    real = activations.prefix_model

    def wrong_dims(model, names, cut=None, *a, **kw):
        payload, inputs, nodes, extra, handed = real(model, names, cut, *a, **kw)
        if cut:  # a fed value declared with dims it does not have: ONNX Runtime refuses the batch, not the model
            p = onnx.load_from_string(payload)
            for i in p.graph.input:
                if i.name in cut:
                    i.type.tensor_type.shape.dim[0].dim_value = 1  # (a batch holds 8 or more rows)
            payload = p.SerializeToString()
        return payload, inputs, nodes, extra, handed
    monkeypatch.setattr(activations, "prefix_model", wrong_dims)
    report = tmp_path / "r.json"
    res = invoke(path, "-s", "0.6", "--calibration", data, "--no-validate", "--report", report, "-q")
    assert res.exit_code == 0, res.output
    layers = {l["name"]: l for l in json.loads(report.read_text())["reconstruction"]["layers"]}
    assert layers["w1"]["method"] != "plain" and layers["w2"]["method"] != "plain"
    assert layers["w3"]["method"] == "plain" and "from its inputs" in layers["w3"]["fallback"]


def test_a_batch_the_model_itself_cannot_run_is_the_data_s_fault(tmp_path):
    """Calibration arrays whose free dims disagree (r [N, 12] + b [N, 5]: the model declares b [N, K]) fail in the
    model itself, not only in the prefix: exit 3 with a one-line error naming the batch, and no output."""
    rng = np.random.default_rng(3)
    path, data = _chain_files(tmp_path, rng, 5)
    out = tmp_path / "out.onnx"
    res = invoke(path, "-s", "0.6", "--calibration", data, "--no-validate", "-o", out, "-q")
    assert res.exit_code == 3, res.output
    assert "w3: " in res.output and "calibration batch 1" in res.output and "\n" not in res.output.strip()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "m.onnx"]


def test_a_long_native_error_is_cut_at_a_word_and_marked():
    from onnxprune.errors import first_line
    text = "Non-zero status code returned while running FusedMatMul node " * 10
    cut = first_line(RuntimeError(text + "\nsecond line"))
    assert len(cut) <= 300 and cut.endswith(" ...") and text.startswith(cut[:-4])
    assert cut[:-4].endswith(("code", "status", "returned", "while", "running", "FusedMatMul", "node", "Non-zero"))
    assert first_line(RuntimeError("short\nmore")) == "short"
    assert first_line(RuntimeError("x" * 400)) == "x" * 296 + " ..."  # one word longer than the limit


def test_a_short_last_batch_does_not_halve_a_wide_layer_s_rows():
    """Batches of 32, 32 and 25 samples: the row stride comes from the batches' sizes, not three times the
    first's. 89 x 49 rows are under the layer's cap of 4 x 1171, so all are used; a stride of 2 (from 96
    estimated samples) left 2,181 rows for 1,171 unknowns per output and a refit worse than plain selection on
    the very samples it was given."""
    rng = np.random.default_rng(14)
    w = (rng.standard_normal((130, 4, 3, 3)) * np.sqrt(2 / 36)).astype(np.float32)
    m = make_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
                   [vi("x", ["N", 130, 3, 3])], [vi("y", ["N", 4, 7, 7])], [init("w", w)])
    x = (rng.standard_normal((89, 130, 3, 3)) + 0.3).astype(np.float32)
    cal = [{"x": x[:32]}, {"x": x[32:64]}, {"x": x[64:]}]
    out, rep = prune(m, 0.5, method="uniform", effective=False, reconstruct=True, calibration=cal)
    (layer,) = rep.reconstruction["layers"]
    assert layer["inputs"] == 1170 and layer["rows"] == 89 * 49
    plain, _ = prune(m, 0.5, method="uniform", effective=False)
    (dense,), (rec,), (pl,) = run(m, {"x": x}), run(out, {"x": x}), run(plain, {"x": x})
    err = lambda y: float(np.sum((y.astype(np.float64) - dense) ** 2) / np.sum(dense.astype(np.float64) ** 2))
    assert err(rec) < err(pl)


def test_a_refit_beyond_float16_keeps_plain_selection():
    """An fp16 layer whose refit bias (~1e5, finite in float64) overflows float16: the layer keeps plain selection
    with the reason, and the model holds no inf (it was written as inf and failed the output check)."""
    rng = np.random.default_rng(3)
    w1 = np.tile(np.array([290.0, -300.0], np.float32), 4)[:, None] * (1 + 0.02 * rng.standard_normal((8, 4)))
    w2 = (rng.standard_normal((4, 3)) * 0.01).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
             helper.make_node("Relu", ["ab"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    f16 = onnx.TensorProto.FLOAT16
    m = make_model(nodes, [vi("x", ["N", 8], f16)], [vi("y", ["N", 3], f16)],
                   [init("w1", w1.astype(np.float16)), init("b1", np.zeros(4, np.float16)),
                    init("w2", w2.astype(np.float16))])
    x = (100 + rng.standard_normal((64, 8))).astype(np.float16)
    out, rep = prune(m, 0.5, effective=False, reconstruct=True, calibration=[{"x": x}])
    layers = {l["name"]: l for l in rep.reconstruction["layers"]}
    assert layers["w1"]["method"] == "plain" and "beyond the range of float16" in layers["w1"]["fallback"]
    assert all(np.isfinite(v.astype(np.float64)).all() for v in weights(out).values())
    assert np.isfinite(run(out, {"x": x})[0]).all()


def _tied_embedding_model(rng, V=40, D=16, variant="initializer"):
    """ids -> Gather(E) -> MatMul W1 -> Relu -> Gemm(h, E, transB=1): logits over the vocabulary (E tied).
    ``variant``: E an initializer; a Constant node whose value tensor has another name (as exporters write it);
    or the Gemm inside both branches of an If (E read from the outer scope)."""
    E = (rng.standard_normal((V, D)) / 2).astype(np.float32)
    W1 = (rng.standard_normal((D, D)) / 4).astype(np.float32)
    gemm = helper.make_node("Gemm", ["h", "E"], ["y"], transB=1)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["h0"]),
             helper.make_node("Relu", ["h0"], ["h"]), helper.make_node("Shape", ["E"], ["es"])]
    inits = [init("W1", W1)]
    if variant == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["E"], value=numpy_helper.from_array(E, "E_value")))
    else:
        inits.append(init("E", E))
    if variant == "if_branch":
        def branch(name):
            return helper.make_graph([helper.make_node("Gemm", ["h", "E"], [f"y_{name}"], transB=1)], name, [],
                                     [vi(f"y_{name}", ["N", V])])
        nodes += [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "c")),
                  helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    else:
        nodes.append(gemm)
    return make_model(nodes, [vi("ids", ["N"], onnx.TensorProto.INT64)], [vi("y", ["N", V]), vi("es", [2],
                      onnx.TensorProto.INT64)], inits)


@pytest.mark.parametrize("variant", ["initializer", "constant", "if_branch"])
def test_a_weight_also_read_by_a_gather_keeps_plain_selection_seen_pruned_by_every_capture(variant):
    """A tied embedding (Gather and the output Gemm read E): a refit for the Gemm would change the embeddings
    unseen, so E keeps plain selection with the reason; W1 is fitted on the embeddings the pruned model's Gather
    gives (E pruned from the first capture on), so its reported error is what the written model has. The same
    for E in a Constant node whose tensor is named otherwise, and for the Gemm inside an If (where E keeps plain
    selection for that reason: before, W1 reported 0.003 where the written model had 0.096)."""
    rng = np.random.default_rng(5)
    m = _tied_embedding_model(rng, variant=variant)
    layers, _ = find_layers(m)
    graph = Graph(m)
    readers = {l.name: other_readers(graph, l) for l in layers}  # Shape: no values
    assert readers == {"E": [] if variant == "if_branch" else ["Gather"], "W1": []}
    ids = rng.integers(0, 40, 256).astype(np.int64)
    out, rep = prune(m, 0.5, effective=False, reconstruct=True, calibration=[{"ids": ids[:128]}, {"ids": ids[128:]}])
    rec = {l["name"]: l for l in rep.reconstruction["layers"]}
    reason = "read inside a subgraph" if variant == "if_branch" else "also read by Gather"
    assert rec["E"]["method"] == "plain" and reason in rec["E"]["fallback"]
    assert rec["W1"]["method"] != "plain"
    got = weights(out)
    # W1's own output on the written model's embeddings: the error the report gives
    e_pruned, e_dense = got["E"][ids].astype(np.float64), m_E(m)[ids].astype(np.float64)
    assert np.array_equal(got["E"], m_E(prune(m, 0.5, effective=False)[0]))  # E as the plain prune gives it
    y_dense, y_new = e_dense @ m_W1(m), e_pruned @ got["W1"].astype(np.float64)
    measured = float(np.sum((y_new - y_dense) ** 2) / np.sum(y_dense ** 2))
    assert measured == pytest.approx(rec["W1"]["rel_error_after"], rel=0.05)


def m_E(m):
    return weights(m)["E"]


def m_W1(m):
    return weights(m)["W1"].astype(np.float64)
