import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper


from conftest import fail_rename_to, invoke, make_model, sample, two_layer_mlp, vi, weights




def test_main_job_writes_beside_input_with_table(cnn, tmp_path):
    before = open(cnn, "rb").read()
    r = invoke(cnn, "--sparsity", "0.95", "--method", "lamp", "--no-effective")
    assert r.exit_code == 0, r.output
    out = str(tmp_path / "cnn_pruned.onnx")
    assert os.path.exists(out) and open(cnn, "rb").read() == before
    assert "conv1.weight" in r.stdout and "total" in r.stdout and "95.00%" in r.stdout
    w = weights(onnx.load(out))
    names = ["conv1.weight", "dw.weight", "pw.weight", "branch.weight", "fc1.weight", "fc2.weight"]
    assert sum(int((w[n] == 0).sum()) for n in names) == round(0.95 * 14304)


def test_json_is_one_document_and_report_file(cnn, tmp_path):
    rep = str(tmp_path / "r.json")
    r = invoke(cnn, "-s", "0.5", "-m", "erk", "-o", tmp_path / "o.onnx", "--report", rep, "--json", "--no-effective")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["status"] == "ok" and doc["exit_code"] == 0 and doc["schema_version"] == 1
    assert doc["method"] == "erk" and doc["totals"]["zeros_after"] == 7152 and doc["onnxprune_version"]
    assert "save" in doc["timings_s"] and doc["seed"] == 0
    assert json.load(open(rep))["totals"] == doc["totals"]


def test_dry_run_writes_nothing(cnn, tmp_path):
    files = set(os.listdir(tmp_path))
    r = invoke(cnn, "-s", "0.9", "--dry-run", "--report", tmp_path / "r.json")
    assert r.exit_code == 0 and "dry run" in r.stdout
    assert set(os.listdir(tmp_path)) == files | {"r.json"}  # the report is what a dry run is for
    doc = json.load(open(tmp_path / "r.json"))
    assert doc["dry_run"] and doc["output"] is None and doc["target_pruned"] == round(0.9 * 14304)


@pytest.mark.parametrize("value", ["nan", "1", "1.0", "-0.1", "inf", "abc"])
def test_bad_sparsity_is_usage_error(cnn, value):
    r = invoke(cnn, "--sparsity", value)
    assert r.exit_code == 2 and "sparsity" in r.output.lower()


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff\xfe" * 10, b"this is text, not onnx\n"])
def test_corrupt_input_exit_3_one_line_no_output(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    r = invoke(bad, "-s", "0.5")
    assert r.exit_code == 3
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "bad_pruned.onnx")


def test_truncated_and_missing_input(tmp_path, cnn):
    half = tmp_path / "half.onnx"
    half.write_bytes(open(cnn, "rb").read()[:20000])
    assert invoke(half, "-s", "0.5").exit_code == 3
    assert invoke(tmp_path / "nope.onnx", "-s", "0.5").exit_code == 3


def test_nothing_prunable_exit_4_and_json_on_failure(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    path = str(tmp_path / "relu.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--json")
    assert r.exit_code == 4
    doc = json.loads(r.stdout)
    assert doc["status"] == "error" and doc["exit_code"] == 4 and "nothing to prune" in doc["error"]
    assert not os.path.exists(tmp_path / "relu_pruned.onnx")


def test_output_equal_to_input_refused_exit_5(cnn, tmp_path):
    before = open(cnn, "rb").read()
    assert invoke(cnn, "-s", "0.5", "-o", cnn).exit_code == 5
    link = tmp_path / "link.onnx"
    os.symlink(cnn, link)
    r = invoke(cnn, "-s", "0.5", "-o", link)
    assert r.exit_code == 5 and "input" in r.stderr
    assert open(cnn, "rb").read() == before


def test_output_dir_missing_exit_5(cnn, tmp_path):
    assert invoke(cnn, "-s", "0.5", "-o", tmp_path / "no" / "x.onnx").exit_code == 5


def test_nan_weights_exit_3_names_tensor(tmp_path):
    m = two_layer_mlp()
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[1, 1] = np.inf
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w1"))
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5")
    assert r.exit_code == 3 and "'w1'" in r.stderr


def test_verbose_shows_traceback_only_with_v(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    assert "Traceback" not in invoke(bad, "-s", "0.5").output
    assert "Traceback" in invoke(bad, "-s", "0.5", "-v").output


def test_allocation_only_with_random_and_min_keep_validated(cnn, tmp_path):
    assert invoke(cnn, "-s", "0.5", "--allocation", "erk").exit_code == 2
    assert invoke(cnn, "-s", "0.5", "-m", "global-mt", "--min-keep", "lots").exit_code == 2
    r = invoke(cnn, "-s", "0.5", "-m", "random", "--allocation", "erk", "--seed", "4", "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["allocation"] == "erk"


def test_exclude_option(cnn):
    r = invoke(cnn, "-s", "0.5", "--exclude", "fc1*", "--exclude", "conv1", "--json", "-q")
    doc = json.loads(r.stdout)
    ex = {l["name"] for l in doc["layers"] if l["excluded"]}
    assert ex == {"fc1.weight", "conv1.weight"}


def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "--sparsity" in r.output and "Exit codes" in r.output
    assert invoke("--version").exit_code == 0


def test_disk_full_keeps_previous_output_and_leaves_no_litter(cnn, tmp_path, monkeypatch):
    import errno
    from onnxprune.io import save
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")

    def full(path, parts, digest=False):
        with open(path, "wb") as fh:
            fh.write(parts[0][: len(parts[0]) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(save, "_write_synced", full)
    r = invoke(cnn, "-s", "0.5", "-o", out, "--no-validate")
    assert r.exit_code == 5 and "No space left" in r.stderr
    assert out.read_bytes() == b"previous output"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]


def test_failed_rename_keeps_previous_output(cnn, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    fail_rename_to(monkeypatch, out)
    r = invoke(cnn, "-s", "0.5", "-o", out, "--no-validate")
    assert r.exit_code == 5 and out.read_bytes() == b"previous output"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]


def test_json_document_also_on_usage_errors(cnn):
    r = invoke(cnn, "--sparsity", "nan", "--json")
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["status"] == "error" and doc["exit_code"] == 2 and "sparsity" in doc["error"]


def _external_model(tmp_path):
    from conftest import init, make_model, vi
    from onnx import helper
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])],
                   [init("W", np.arange(16, dtype=np.float32).reshape(4, 4))])
    d = tmp_path / "mdl"
    d.mkdir()
    path = d / "m.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return d, path


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "missing", "short"])
def test_unsafe_or_broken_external_data_is_rejected(tmp_path, attack):
    d, path = _external_model(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes((d / "w.bin").read_bytes())
    m = onnx.load(str(path), load_external_data=False)
    entry = next(e for e in m.graph.initializer[0].external_data if e.key == "location")
    if attack == "dotdot":
        entry.value = "../outside/secret.bin"
    elif attack == "absolute":
        entry.value = str(outside / "secret.bin")
    elif attack == "symlink":
        os.remove(d / "w.bin")
        os.symlink(outside / "secret.bin", d / "w.bin")
    elif attack == "missing":
        os.remove(d / "w.bin")
    else:
        (d / "w.bin").write_bytes(b"\0" * 8)
    onnx.save(m, str(path))
    r = invoke(path, "-s", "0.5")
    assert r.exit_code == 3, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (d / "m_pruned.onnx").exists()


def test_deeply_nested_if_is_rejected_cleanly(tmp_path):
    """Protobuf refuses to parse ~40 nested If levels (upb depth limit): exit 3, one line, no traceback."""
    m = onnx.ModelProto(ir_version=10)
    m.opset_import.add(domain="", version=17)
    g = m.graph
    for _ in range(40):  # built in place: helper.make_graph would re-parse the deep graph and fail itself
        node = g.node.add(op_type="If", input=["c"], output=["o"])
        attr = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH)
        g = attr.g
    g.node.add(op_type="Identity", input=["x"], output=["o"])
    path = tmp_path / "deep.onnx"
    path.write_bytes(m.SerializeToString())
    r = invoke(path, "-s", "0.5")
    assert r.exit_code == 3 and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1


def test_cli_import_is_light():
    """Starting the CLI never imports onnx, ONNX Runtime or rich (they load when a run needs them)."""
    import subprocess
    import sys
    code = "import sys, onnxprune.cli; print(sorted(m for m in ('onnx', 'onnxruntime', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_quiet_run_without_validation_never_imports_rich_or_onnxruntime(tmp_path):
    """-q --no-validate shows nothing and runs nothing: neither rich nor ONNX Runtime is imported."""
    import subprocess
    import sys
    model, _ = sample("cnn")
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print(sorted(m for m in ('onnxruntime', 'rich') if m in sys.modules)))\n"
            "from onnxprune.cli import main\n"
            f"main([{model!r}, '-s', '0.5', '-q', '--no-validate', '-o', {str(tmp_path / 'o.onnx')!r}])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
