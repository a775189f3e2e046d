"""The CLI side of making pruning pay off: --granularity channel, --compact, --align and the figures."""
import json

import numpy as np
import onnx
import pytest

from conftest import invoke, run, sample


def test_channel_pruning_compacts_and_reports_the_payoff(cnn, tmp_path):
    out = tmp_path / "small.onnx"
    r = invoke(cnn, "-s", "0.5", "--granularity", "channel", "--align", "8", "-o", out, "--json", "-q",
               "--data", sample("cnn")[1])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0, doc["error"]
    c, f = doc["compaction"], doc["figures"]
    assert c["applied"] and c["channels_removed"] > 0 and c["align"] == 8
    assert f["ratio"]["file_bytes"] < 1 and f["ratio"]["params_total"] < 1 and f["ratio"]["macs"] < 1
    assert f["after"]["file_bytes"] == out.stat().st_size and f["before"]["latency_ms"] > 0
    from onnxprune.figures import figures
    for side, path in (("before", cnn), ("after", str(out))):  # the counts taken from the report hold on disk
        counted = figures(path, {"x": [1, 1, 8, 8]})
        assert f[side]["nonzero_prunable"] == counted["nonzero_prunable"]
        assert f[side]["macs"] == counted["macs"] and f[side]["params_total"] == counted["params_total"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.load(sample("cnn")[1])["x"][:4]
    assert run(str(out), {"x": x})[0].shape == (4, 10)  # graph inputs and outputs keep their shapes
    for layer in c["layers"]:
        assert layer["channels_after"] % 8 == 0 or layer["channels_after"] == layer["channels_before"]


def test_compact_after_unstructured_pruning_keeps_the_outputs(tmp_path):
    path = sample("mlp_gemm")[0]
    plain, small = tmp_path / "plain.onnx", tmp_path / "small.onnx"
    assert invoke(path, "-s", "0.99", "--no-validate", "-o", plain).exit_code == 0
    r = invoke(path, "-s", "0.99", "--no-validate", "--compact", "-o", small, "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["compaction"]["applied"] and doc["compaction"]["channels_removed"] > 0
    assert small.stat().st_size < plain.stat().st_size
    x = np.load(sample("mlp_gemm")[1])["x"][:16]
    np.testing.assert_allclose(run(str(small), {"x": x})[0], run(str(plain), {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_without_compact_the_report_says_what_it_would_remove(tmp_path):
    r = invoke(sample("mlp_gemm")[0], "-s", "0.99", "--no-validate", "-o", tmp_path / "o.onnx", "--json", "-q")
    c = json.loads(r.stdout)["compaction"]
    assert r.exit_code == 0 and not c["applied"] and c["channels_removed"] > 0
    r = invoke(sample("mlp_gemm")[0], "-s", "0.99", "--no-validate", "-o", tmp_path / "o.onnx")
    assert "--compact would remove" in r.stdout


@pytest.mark.parametrize("args", [["--align", "0"], ["--granularity", "channel", "--target", "effective"],
                                  ["--granularity", "channel", "--method", "igq"]])
def test_channel_options_that_cannot_combine_are_usage_errors(cnn, tmp_path, args):
    r = invoke(cnn, "-s", "0.5", "-o", tmp_path / "o.onnx", *args)
    assert r.exit_code == 2 and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("relative", [True, False])
def test_file_and_gzip_sizes_count_the_output_once_however_it_is_named(cnn, tmp_path, monkeypatch, relative):
    """-o given relative (the report also lists it absolute): the gzip size was counted twice."""
    monkeypatch.chdir(tmp_path)
    out = "rel.onnx" if relative else str(tmp_path / "abs.onnx")
    r = invoke(cnn, "-s", "0.5", "-o", out, "--no-validate", "--json", "-q")
    assert r.exit_code == 0
    after = json.loads(r.stdout)["figures"]["after"]
    data = (tmp_path / out).read_bytes()
    assert after["file_bytes"] == len(data)
    from onnxprune.figures import gzip_size
    assert after["gzip_bytes"] == gzip_size(data)



def _mlp_file(tmp_path, layers, outputs=()):
    """A model of Gemm layers (name, input, weight [out, in], output) and other nodes, in order, saved to m.onnx."""
    from onnx import helper
    from conftest import init, make_model, vi
    nodes = [helper.make_node("Gemm", [l[1], l[0]], [l[3]], name=l[0], transB=1) if isinstance(l, tuple) else l
             for l in layers]
    inits = [init(l[0], l[2].astype(np.float32)) for l in layers if isinstance(l, tuple)]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("x", ["N", 8])], [vi(n, ["N", d]) for n, d in outputs], inits), str(path))
    return path


def test_channel_pruning_that_can_remove_nothing_is_refused(tmp_path):
    """Every output channel reaches a graph output: exit 4 with the reason, nothing written (it used to write the
    model unchanged with exit 0, reporting 0 % next to the 50 % asked for)."""
    rng = np.random.default_rng(0)
    path = _mlp_file(tmp_path, [("fc", "x", rng.standard_normal((6, 8)), "y")], outputs=[("y", 6)])
    out = tmp_path / "o.onnx"
    r = invoke(path, "-s", "0.5", "--granularity", "channel", "--no-validate", "-o", out)
    assert r.exit_code == 4 and not out.exists()
    assert "cannot remove any channel" in r.stderr and "graph output" in r.stderr and len(r.stderr.splitlines()) == 1


def test_channel_pruning_short_of_or_above_the_target_says_so(tmp_path, cnn):
    """Only a small branch has removable channels: the run finishes and the report says how far it got and why;
    whole channels in aligned blocks overshoot on a small model: said too."""
    from onnx import helper
    rng = np.random.default_rng(0)
    path = _mlp_file(tmp_path, [("fc1", "x", rng.standard_normal((4, 8)), "h"), helper.make_node("Relu", ["h"], ["r"]),
                                ("fc2", "r", rng.standard_normal((3, 4)), "y"),
                                ("big", "x", rng.standard_normal((64, 8)), "z")], outputs=[("y", 3), ("z", 64)])
    r = invoke(path, "-s", "0.5", "--granularity", "channel", "--no-validate", "--json", "-q",
               "-o", tmp_path / "o.onnx")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0
    plan = doc["options"]["channel_plan"]
    assert plan["achieved_sparsity"] < 0.5 - 0.02 and plan["candidate_groups"] == 4
    assert any("short of the 50.00%" in w and "graph output" in w for w in doc["warnings"])
    r = invoke(cnn, "-s", "0.5", "--granularity", "channel", "--align", "8", "--no-validate", "--json", "-q",
               "-o", tmp_path / "c.onnx")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["options"]["channel_plan"]["achieved_sparsity"] > 0.52
    assert any("above the 50.00%" in w and "aligned blocks of 8" in w for w in doc["warnings"])


def test_channel_target_macs_and_floor(tmp_path, cnn):
    """--target macs sizes channel pruning by compute (the figures agree); --channel-floor is in the report."""
    r = invoke(cnn, "-s", "0.4", "--granularity", "channel", "--target", "macs", "--channel-floor", "0.5",
               "--data", sample("cnn")[1], "--json", "-q", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    plan = doc["options"]["channel_plan"]
    assert plan["target"] == "macs" and plan["floor"] == 0.5 and plan["macs_removed"] >= plan["target_macs"]
    assert doc["figures"]["ratio"]["macs"] == pytest.approx(1 - plan["macs_removed_fraction"])
    for ch in plan["channels"].values():
        assert ch["before"] - ch["removed"] >= ch["before"] / 2
    r = invoke(cnn, "-s", "0.4", "--target", "macs", "-o", tmp_path / "w.onnx")
    assert r.exit_code == 2 and "--granularity channel" in r.stderr
