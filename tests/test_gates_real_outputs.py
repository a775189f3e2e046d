"""Gates that tell the truth on real outputs (issue 16): detector heads mixing scales, one value per sample, CTC
sequences in both layouts, outputs constant on synthetic input, hand-written softmax, a bound implying its
metric, collapse failing the run, the latency budget, and what the terminal shows (stderr warnings, one-line
usage errors, 80 columns)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import ROOT, init, invoke, make_model, sample, vi

from onnxprune.compare import channel_parts, class_stats, ctc_greedy, float_stats
from onnxprune.metrics import Bounds, OutputStats, classify_outputs, plan_gate


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


# --- 1. a detector head mixing scales --------------------------------------------------------------------------

def detector(seed=0):
    """x [N, 3, 8, 8] -> box conv (2 channels, pixels: x300) and class conv (4 channels, sigmoid) -> Concat ->
    Reshape [N, 6, 64]: the YOLOv8 layout [N, 4 + C, anchors] in small."""
    r = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "wb"], ["b0"], name="box"),
             helper.make_node("Mul", ["b0", "scale"], ["b"]),
             helper.make_node("Conv", ["x", "wc"], ["c0"], name="cls"),
             helper.make_node("Sigmoid", ["c0"], ["c"]),
             helper.make_node("Concat", ["b", "c"], ["bc"], axis=1),
             helper.make_node("Reshape", ["bc", "shape"], ["out0"])]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("out0", ["N", 6, 64])],
                      [init("wb", r.standard_normal((2, 3, 1, 1)).astype(np.float32)),
                       init("scale", np.array(300, dtype=np.float32)),
                       init("wc", r.standard_normal((4, 3, 1, 1)).astype(np.float32)),
                       init("shape", np.array([0, 6, 64], dtype=np.int64))])


def test_channel_parts_split_boxes_from_class_scores():
    r = np.random.default_rng(0)
    d = np.concatenate([300 * r.random((4, 2, 64)), r.random((4, 4, 64))], axis=1)
    assert channel_parts([d], [4]) == (1, [(0, 2), (2, 6)])
    p = d.copy()
    p[:, 2:] = 0  # the class scores are gone, the boxes intact
    st = OutputStats("out0")
    float_stats(st, [d], [p], [4])
    assert st.whole["rel_error"] < 0.01  # what a whole-output comparison sees
    assert st.rel_error == pytest.approx(1.0) and st.part == "channels 2-5 of axis 1"
    assert [q["channels"] for q in st.parts] == [[0, 1], [2, 5]]
    assert st.parts[0]["rel_error"] == 0.0
    # one scale throughout: no parts
    st2 = OutputStats("e")
    float_stats(st2, [r.random((4, 6, 64))], [r.random((4, 6, 64))], [4])
    assert st2.parts is None


def test_a_flattened_output_with_a_short_last_batch_has_no_channel_axis(tmp_path):
    """[batch x seq, C] logits (Reshape to [-1, D] before the head) with a short last --data batch: the first axis
    is 8 long in the first batches and 4 in the last, so it is no channel axis (it was: exit 70 on reshaping)."""
    r = np.random.default_rng(0)
    batches = [r.standard_normal((8, 47)) * np.r_[np.full(2, 300.0), np.ones(45)], r.standard_normal((8, 47)),
               r.standard_normal((4, 47))]
    assert channel_parts(batches, [2, 2, 1]) is None
    nodes = [helper.make_node("Reshape", ["x", "shp"], ["x2"]), helper.make_node("Gemm", ["x2", "w"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 4, 8])], [vi("y", ["R", 47])],
                       [init("shp", np.array([-1, 8], dtype=np.int64)),
                        init("w", r.standard_normal((8, 47)).astype(np.float32))])
    path = _save(tmp_path, model)
    np.savez(tmp_path / "d.npz", x=r.standard_normal((5, 4, 8)).astype(np.float32))
    res = invoke(path, "-s", "0.5", "--data", tmp_path / "d.npz", "--batch-size", "2", "-o", tmp_path / "o.onnx",
                 "-q")
    assert res.exit_code == 0, res.output


def test_detector_gate_fails_on_the_class_part_and_names_it(tmp_path):
    path = _save(tmp_path, detector())
    r = invoke(path, "-s", "0.9", "--exclude", "wb", "--max-rel-error", "0.15", "--synthetic", "uniform:0,1",
               "--json", "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    out = doc["validation"]["outputs"][0]
    assert r.exit_code == 1, r.output
    assert out["whole"]["rel_error"] < 0.15 < out["rel_error"]  # the whole output would have passed
    assert out["part"] == "channels 2-5 of axis 1" and "channels 2-5" in doc["error"]
    assert not (tmp_path / "o.onnx").exists()


# --- 2. one value per sample -----------------------------------------------------------------------------------

def vad():
    r = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Sigmoid", ["h"], ["output"])]
    return make_model(nodes, [vi("x", ["N", 16])], [vi("output", ["N", 1])],
                      [init("w", r.standard_normal((16, 1)).astype(np.float32))])


def test_cosine_does_not_gate_one_value_per_sample(tmp_path):
    path = _save(tmp_path, vad())
    r = invoke(path, "-s", "0.5", "--min-cosine", "0.99")
    assert r.exit_code == 2 and "--min-cosine applies to float outputs with more than one value" in r.stderr
    r = invoke(path, "-s", "0.5", "--gate-output", "output", "--metric", "cosine", "--min-cosine", "0.99")
    assert r.exit_code == 2 and "ignores scale" in r.stderr
    r = invoke(path, "-s", "0.5", "--min-snr", "-100", "--json", "-o", tmp_path / "o.onnx")
    out = json.loads(r.stdout)["validation"]["outputs"][0]
    assert r.exit_code == 0 and out["cosine_over"] == "batch" and out["metric"] == "snr_db"


def test_cosine_over_the_batch_is_reported():
    st = OutputStats("y")
    float_stats(st, [np.array([[0.1], [0.2], [0.3]])], [np.array([[20.], [40.], [60.]])], [3])
    assert st.cosine_over == "batch" and st.cosine == pytest.approx(1.0) and st.rel_error > 100


# --- 3. CTC sequences ------------------------------------------------------------------------------------------

def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    assert ctc_greedy(np.array([0, 3, 3, 0, 3, 5, 5, 0]), 0) == (3, 3, 5)
    assert ctc_greedy(np.array([0, 0, 0]), 0) == ()


def _ctc(n=8, t=20, c=6, blank=0, seed=0):
    r = np.random.default_rng(seed)
    scores = r.random((n, t, c))
    scores[..., blank] += 1.5  # mostly blank
    for i in range(n):
        scores[i, r.choice(t, 2, replace=False), 1 + i % (c - 1)] += 5  # two characters per line
    return scores


def test_blank_dominated_sequence_reads_nothing():
    d = _ctc()
    p = d.copy()
    p[..., 0] += 10  # the pruned model reads blanks only
    st = OutputStats("ctc", kind="sequence")
    class_stats(st, [d], [p], None)
    assert st.blank == 0 and st.top1_agreement >= 0.85  # what per-position agreement shows
    assert st.nonblank_agreement == 0.0 and st.sequence_match == 0.0 and st.nonblank_positions == 16


def ctc_model(time_first=False):
    """x [N, 20, 6] -> Add(bias: blank favoured) -> MatMul [6, 6] -> Softmax; time-first: Transpose to [T, N, C]."""
    r = np.random.default_rng(2)
    w = (np.eye(6) * 4 + 0.3 * r.standard_normal((6, 6))).astype(np.float32)
    bias = np.array([1.0, 0, 0, 0, 0, 0], dtype=np.float32)
    nodes = [helper.make_node("Add", ["x", "bias"], ["xb"]),
             helper.make_node("MatMul", ["xb", "w"], ["h"], name="proj"),
             helper.make_node("Softmax", ["h"], ["sm" if time_first else "probs"], axis=-1)]
    out = vi("probs", ["N", 20, 6])
    if time_first:
        nodes.append(helper.make_node("Transpose", ["sm"], ["probs"], perm=[1, 0, 2]))
        out = vi("probs", [20, "N", 6])
    return make_model(nodes, [vi("x", ["N", 20, 6])], [out], [init("w", w), init("bias", bias)])


@pytest.mark.parametrize("time_first", [False, True])
def test_sequence_outputs_in_both_layouts_gate_on_nonblank_agreement(tmp_path, time_first):
    path = _save(tmp_path, ctc_model(time_first))
    x = _ctc(n=32, seed=3).astype(np.float32) - 0.5
    np.savez(tmp_path / "d.npz", x=x)
    r = invoke(path, "-s", "0.9", "-m", "global", "--data", tmp_path / "d.npz", "--max-drop", "0.02", "--json",
               "--batch-size", "8", "-o", tmp_path / "o.onnx", "--keep-failed")
    doc = json.loads(r.stdout)
    out = doc["validation"]["outputs"][0]
    assert out["kind"] == "sequence" and out["layout"] == ("TNC" if time_first else "NTC")
    assert out["metric"] == "nonblank_agreement" and out["blank"] == 0
    assert out["value"] == out["nonblank_agreement"] < out["top1_agreement"]
    assert out["sequence_match"] is not None and out["sequences"] == 32
    assert (r.exit_code == 0) == out["passed"]


def test_blank_option_is_checked_against_the_classes(tmp_path):
    path = _save(tmp_path, ctc_model())
    r = invoke(path, "-s", "0.5", "--blank", "9", "--max-drop", "0.1")
    assert r.exit_code == 2 and "--blank 9" in r.stderr


# --- 4. an output constant on the inputs used ------------------------------------------------------------------

def dark_map():
    """A text-detector-like map that is ~0 on random inputs: Sigmoid(Conv(x) - 30)."""
    r = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
             helper.make_node("Sub", ["h", "thirty"], ["hs"]),
             helper.make_node("Sigmoid", ["hs"], ["map"])]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("map", ["N", 1, 8, 8])],
                      [init("w", 0.1 * r.standard_normal((1, 3, 1, 1)).astype(np.float32)),
                       init("thirty", np.array(30, dtype=np.float32))])


def test_constant_dense_output_is_unreliable_and_a_gate_on_it_is_exit_2(tmp_path):
    path = _save(tmp_path, dark_map())
    r = invoke(path, "-s", "0.5", "--json", "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    out = doc["validation"]["outputs"][0]
    assert "constant on these inputs" in out["unreliable"] and "--data" in out["unreliable"]
    assert any("constant on these inputs" in n for n in doc["validation"]["notes"])
    r = invoke(path, "-s", "0.5")
    assert "unreliable" in r.stdout  # the table says it
    r = invoke(path, "-s", "0.5", "--max-rel-error", "0.1", "-o", tmp_path / "g.onnx")
    assert r.exit_code == 2 and "--data" in r.stderr and not (tmp_path / "g.onnx").exists()


def test_a_map_of_zeros_but_for_a_few_specks_is_unreliable():
    d = np.zeros((4, 1, 64, 64))
    d[0, 0, 3, 5], d[2, 0, 9, 9] = 0.0345, 0.01  # what PP-OCR's det map gives on noise
    st = OutputStats("map")
    float_stats(st, [d], [d * 0.5], [4])
    assert st.unreliable and "constant on these inputs" in st.unreliable
    d[:, :, :8, :8] = 0.9  # 1.6 % text: a real map
    st = OutputStats("map")
    float_stats(st, [d], [d * 0.5], [4])
    assert st.unreliable is None


def test_time_first_raw_logits_of_a_linear_head_are_a_sequence():
    """ddddocr's CTC head: Gemm -> Reshape to [T, N, C] logits, named by a number."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["387"])]
    m = make_model(nodes, [vi("x", [80, 16])], [vi("387", [20, 4, 12])],
                   [init("w", np.ones((16, 12), np.float32)), init("s", np.array([20, 4, 12], np.int64))])
    a = np.random.default_rng(0).standard_normal((20, 4, 12))
    assert classify_outputs(m, None, {"387": a}, 4, {"387": 1})["387"][0] == "sequence"
    assert classify_outputs(m, None, {"387": a.transpose(1, 0, 2)}, 4, {"387": 0})["387"][0] == "dense"


# --- 5. a hand-written softmax ---------------------------------------------------------------------------------

def handwritten_softmax():
    r = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Exp", ["h"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
             helper.make_node("Div", ["e", "s"], ["target_label"])]
    return make_model(nodes, [vi("x", ["N", 16])], [vi("target_label", ["N", 7])],
                      [init("w", r.standard_normal((16, 7)).astype(np.float32)),
                       init("axes", np.array([1], dtype=np.int64))])


def test_probability_rows_make_a_classifier(tmp_path):
    path = _save(tmp_path, handwritten_softmax())
    r = invoke(path, "-s", "0.5", "--max-drop", "0.5", "--json", "-o", tmp_path / "o.onnx")
    out = json.loads(r.stdout)["validation"]["outputs"][0]
    assert r.exit_code in (0, 1), r.output
    assert out["kind"] == "classification" and "rows are probabilities" in out["why"]
    assert out["metric"] == "top1_agreement"


def test_log_probabilities_are_recognised_and_plain_scores_are_not():
    m = handwritten_softmax()
    logp = np.log(np.full((4, 7), 1 / 7))
    kinds = classify_outputs(m, None, {"target_label": logp}, 4)
    assert kinds["target_label"][0] == "classification"
    kinds = classify_outputs(m, None, {"target_label": np.full((4, 7), 0.5)}, 4)
    assert kinds["target_label"][0] == "dense"


# --- 6. a bound implies its metric -----------------------------------------------------------------------------

def test_a_bound_alone_gates_the_outputs_its_metric_fits():
    kinds = {"logits": ("classification", ""), "emb": ("dense", ""), "p": ("dense", "")}
    plan = plan_gate(kinds, {}, Bounds(min_cosine=0.99), scalars={"p"})
    assert plan == {"logits": ["cosine"], "emb": ["cosine"]}
    plan = plan_gate(kinds, {}, Bounds(max_drop=0.01))
    assert plan == {"logits": ["top1_agreement"]}
    plan = plan_gate(kinds, {"logits": 10}, Bounds(max_drop=0.01, max_rel_error=0.2))
    assert plan == {"logits": ["top1_accuracy", "rel_error"], "emb": ["rel_error"], "p": ["rel_error"]}


def test_min_cosine_alone_runs_on_an_encoder(tmp_path):
    r = invoke(sample("cnn")[0], "-s", "0.5", "--min-cosine", "0.5", "--json", "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0, r.output
    assert doc["validation"]["outputs"][0]["metric"] == "cosine"


def test_an_output_with_two_bounds_must_pass_both(tmp_path):
    r = invoke(sample("cnn")[0], "-s", "0.9", "--data", sample("cnn")[1], "--max-drop", "0.5",
               "--max-rel-error", "0.01", "--json", "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    out = doc["validation"]["outputs"][0]
    assert r.exit_code == 1
    gates = {g["metric"]: g["passed"] for g in out["gates"]}
    assert gates == {"top1_accuracy": True, "rel_error": False}
    assert out["metric"] == "rel_error" and out["passed"] is False


# --- 11. the latency timing has a budget -----------------------------------------------------------------------

def test_latency_timing_stops_at_its_budget():
    from onnxprune import validate

    class Slow:
        runs = 0

        def run(self, *a):
            Slow.runs += 1

    a, b = Slow(), Slow()
    seen = []
    dense, pruned, runs = validate._side_by_side(a, b, [{}] * 16, rounds=2, budget_s=0.0,
                                                 progress=lambda *x: seen.append(x))
    assert runs == validate.LATENCY_MIN_RUNS and seen[-1] == ("latency", 3, 32)


# --- 10/12/13/14/15. what the terminal shows ---------------------------------------------------------------------

def test_warnings_go_to_stderr(tmp_path):
    r = invoke(sample("cnn")[0], "-s", "0.9", "--data", sample("cnn")[1], "--reconstruct", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0
    assert "warning:" in r.stderr and "warning:" not in r.stdout


@pytest.mark.parametrize("args,words", [
    (["-s", "95"], "did you mean 0.95?"),
    (["-s", "0.5", "out.onnx"], "use -o out.onnx"),
    (["-s", "0.5", "--metric", "nope", "--max-drop", "0.1"], "Invalid value for '--metric'"),
])
def test_usage_errors_are_one_line_with_a_hint(args, words):
    p = subprocess.run([sys.executable, "-m", "onnxprune.cli", sample("cnn")[0], *args], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("onnxprune: error: ") and words in p.stderr


def test_usage_error_under_json_is_the_full_document():
    r = invoke(sample("cnn")[0], "-s", "2", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 2 and doc["exit_code"] == 2 and doc["status"] == "error"
    full = json.loads(invoke(sample("cnn")[0], "-s", "0.5", "--dry-run", "--json").stdout)
    assert set(doc) == set(full)
    assert doc["totals"]["sparsity_after"] is None  # nothing was analysed: not a sparsity of 0


def test_names_that_differ_deep_inside_stay_distinct():
    from onnxprune.table import short_names
    names = [f"If_0_{b}_branch__Inline_0__/_model/encoder/encoder.{i}/reparam_conv/Conv"
             for b in ("then", "else") for i in range(4)]
    names += ["If_0_then_branch__Inline_0__/_model/decoder/rnn/LSTMCell",
              "If_0_else_branch__Inline_0__/_model/decoder/decoder.2/Conv"]
    shown = short_names(names)
    assert len(set(shown.values())) == len(names)
    assert all(len(v) <= 26 for v in shown.values())


def test_help_fits_80_columns():
    p = subprocess.run([sys.executable, "-m", "onnxprune.cli", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="200"), timeout=60)
    assert p.returncode == 0
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


def test_the_readme_sample_run_fits_a_50_row_terminal(tmp_path):
    model, data = sample("cnn")
    p = subprocess.run([sys.executable, "-m", "onnxprune.cli", model, "--sparsity", "0.95", "--method", "lamp",
                        "--data", data, "--reconstruct", "-o", str(tmp_path / "o.onnx")], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS="80"), timeout=300)
    assert p.returncode == 0, p.stderr
    assert len((p.stdout + p.stderr).splitlines()) <= 50
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


def test_python_requirement_matches_onnxruntime_wheels_and_readme_stands_alone():
    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        assert re.search(r'requires-python = ">=3\.(1[1-9])"', fh.read())
    with open(os.path.join(ROOT, "README.md")) as fh:
        assert "ALGORITHMS.md" not in fh.read()
