"""Hostile inputs, round 3 (issue 17): writes into data directories and '-', compaction into ConvTranspose,
calibration outliers, the same data directory twice, odd npz members, signals around ONNX Runtime's import and
around the commit, outputs published together, Ctrl-C during start-up."""
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import ROOT, init, invoke, make_model, run, sample, vi

from onnxprune import io as pio
from onnxprune.errors import Interrupted, OutputError


def _staging(directory):
    return [f for f in os.listdir(directory) if f.startswith(".onnxprune")]


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture
def data_dir(tmp_path):
    """A --data directory holding the CNN's test inputs (x.npy) and labels (y.npy)."""
    z = np.load(sample("cnn")[1])
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "x.npy", z["x"][:96])
    np.save(d / "y.npy", z["y"][:96])
    return d


# --- 1. writes into a --data / --calibration directory ---------------------------------------------------------

@pytest.mark.parametrize("how", ["-o", "--report", "dry-run-report", "new-npy", "symlinked-dir", "calibration"])
def test_write_into_a_data_directory_is_exit_5_and_the_data_stays(cnn, data_dir, tmp_path, how):
    x = data_dir / "x.npy"
    before = _read(x)
    opt = "--data"
    target = x
    extra = []
    if how == "-o":
        extra = ["-o", target]
    elif how == "--report":
        extra = ["--report", target]
    elif how == "dry-run-report":
        extra = ["--dry-run", "--report", target]
    elif how == "new-npy":  # not there yet, but it would join the data set
        target = data_dir / "new.npy"
        extra = ["--report", target]
    elif how == "symlinked-dir":
        link = tmp_path / "link"
        os.symlink(data_dir, link)
        extra = ["--report", link / "x.npy"]
    else:
        opt = "--calibration"
        extra = ["--report", target]
    r = invoke(cnn, "-s", "0.5", opt, data_dir, *extra)
    assert r.exit_code == 5, r.output
    assert _read(x) == before
    assert not os.path.exists(data_dir / "new.npy")
    assert sorted(os.listdir(data_dir)) == ["x.npy", "y.npy"]
    assert not os.path.exists(str(cnn).replace(".onnx", "_pruned.onnx"))


def test_plot_into_a_data_directory_is_refused(data_dir, tmp_path):
    with pytest.raises(OutputError, match="same file as the input"):
        pio.check_write_targets({"--plot": str(data_dir / "x.npy")}, [str(data_dir)])
    # another file type beside the data is fine: it is not read
    pio.check_write_targets({"--plot": str(data_dir / "curve.png")}, [str(data_dir)])


def test_report_beside_the_data_but_not_npy_is_written(cnn, data_dir):
    r = invoke(cnn, "-s", "0.5", "--data", data_dir, "--report", data_dir / "r.json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(_read(data_dir / "r.json"))["status"] == "ok"


# --- 2. '-' ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["model", "-o", "--report", "--data", "--calibration", "--plot"])
def test_dash_is_a_usage_error_everywhere(cnn, tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(cnn, tmp_path / "-")
    before = _read(tmp_path / "-")
    args = {"model": ["-", "-s", "0.5"], "-o": [cnn, "-s", "0.5", "-o", "-"],
            "--report": [cnn, "-s", "0.5", "--report", "-"], "--data": [cnn, "-s", "0.5", "--data", "-"],
            "--calibration": [cnn, "-s", "0.5", "--calibration", "-"],
            "--plot": [cnn, "-s", "auto", "--max-drop", "0.1", "--plot", "-"]}[where]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "./-" in r.output
    assert _read(tmp_path / "-") == before
    assert sorted(os.listdir(tmp_path)) == ["-", "cnn.onnx"]


def test_dot_slash_dash_is_a_file_with_the_same_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(sample("cnn")[0], tmp_path / "-")
    before = _read(tmp_path / "-")
    r = invoke("./-", "-s", "0.5", "-o", "./-")
    assert r.exit_code == 5, r.output
    assert _read(tmp_path / "-") == before
    r = invoke("./-", "-s", "0.5", "-o", "./out.onnx", "--no-validate", "-q")
    assert r.exit_code == 0, r.output


# --- 3. compaction folding into a ConvTranspose reader ---------------------------------------------------------

def _conv_then_transpose(seed, act="Sigmoid", group=1, **attrs):
    """Conv (some channels near zero, positive bias) -> act (a non-zero constant where a channel is dead) ->
    ConvTranspose -> Relu -> 1x1 Conv."""
    r = np.random.default_rng(seed)
    w1 = r.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[:3] *= 1e-4
    b1 = (r.standard_normal(8) + 1).astype(np.float32)
    wt = r.standard_normal((8, 6 // group, 2, 2)).astype(np.float32)
    w3 = r.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node(act, ["h"], ["a"]),
             helper.make_node("ConvTranspose", ["a", "wt"], ["t"], name="ct", group=group, **attrs),
             helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="c3")]
    return make_model(nodes, [vi("x", [2, 4, 6, 6])], [vi("y", None)],
                      [init("w1", w1), init("b1", b1), init("wt", wt), init("w3", w3)])


@pytest.mark.parametrize("args", [["--compact", "-s", "0.9"], ["--compact", "-s", "0.7"],
                                  ["--granularity", "channel", "-s", "0.3"],
                                  ["--granularity", "channel", "-s", "0.6"]])
@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2]}, {"strides": [2, 2], "output_padding": [1, 1]},
                                   {"dilations": [2, 2]}, {"pads": [1, 1, 1, 1]}])
def test_compaction_never_folds_into_a_conv_transpose_and_keeps_the_outputs(tmp_path, args, attrs):
    m = _conv_then_transpose(7, **attrs)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    r = invoke(path, *args, "-o", a, "--no-validate", "-q")
    assert r.exit_code in (0, 4), r.output  # 4: channel pruning may find nothing removable
    if r.exit_code == 4:
        return
    plain = [x for x in args if x != "--compact"] + ["--no-compact"]
    r = invoke(path, *plain, "-o", b, "--no-validate", "-q")
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    ya, yb = run(str(a), {"x": x})[0], run(str(b), {"x": x})[0]
    np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4)


def test_conv_transpose_reader_of_a_dead_constant_channel_compacts(tmp_path):
    """The case behind the exit 70: a channel dead in the producer (a constant, here sigmoid(bias)) whose
    ConvTranspose weights are zero too is dropped without a fold (a fold would have been a shape error)."""
    m = _conv_then_transpose(3)
    w = {t.name: onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    w["w1"][0] = 0
    w["wt"][0] = 0
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(w[t.name], t.name))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    r = invoke(path, "-s", "0.05", "--compact", "-o", tmp_path / "o.onnx", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["validation"]["status"] == "ok"


# --- 4. calibration values out of range ------------------------------------------------------------------------

def _calibration(tmp_path, value, dtype=np.float32):
    z = np.load(sample("cnn")[1])
    x = z["x"][:64].astype(dtype)
    x[3, 0, 2, 2] = value
    path = tmp_path / f"c_{value:g}.npz"
    np.savez(path, x=x)
    return path


def _json_run(*args):
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args), "--json"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    return r.returncode, json.loads(r.stdout), r.stderr  # stdout is one JSON document, whatever happened


def test_float64_calibration_value_beyond_float32_is_exit_3(cnn, tmp_path):
    cal = _calibration(tmp_path, 1e300, np.float64)
    code, doc, err = _json_run(cnn, "-s", "0.9", "--calibration", cal, "-o", tmp_path / "o.onnx")
    assert code == 3 and doc["exit_code"] == 3, err
    assert "beyond the range" in doc["error"] and "'x'" in doc["error"]
    assert "RuntimeWarning" not in err
    assert not os.path.exists(tmp_path / "o.onnx")


def test_calibration_that_overflows_the_dense_model_is_exit_3_naming_the_layer(cnn, tmp_path):
    cal = _calibration(tmp_path, 3e38)
    code, doc, err = _json_run(cnn, "-s", "0.9", "--calibration", cal, "-o", tmp_path / "o.onnx")
    assert code == 3, err
    assert "not finite" in doc["error"] and "calibration batch" in doc["error"]
    assert "DLASCL" not in err and "internal error" not in doc["error"]
    assert not os.path.exists(tmp_path / "o.onnx") and not _staging(tmp_path)


def test_huge_finite_calibration_values_keep_the_moments_finite(cnn, tmp_path):
    """1e20 squared overflows float32 (the sums of squares): that accumulation step runs in float64."""
    cal = _calibration(tmp_path, 1e20)
    code, doc, err = _json_run(cnn, "-s", "0.9", "--calibration", cal, "-o", tmp_path / "o.onnx", "--no-validate")
    assert code == 0, err
    assert doc["status"] == "ok" and os.path.exists(tmp_path / "o.onnx")


def test_accumulate_switches_to_float64_when_float32_would_overflow():
    from onnxprune.reconstruct.moments import _add_products
    x = np.full((1, 64, 3), 1e19, dtype=np.float32)
    x[:, :, 2] = 1
    wt = np.ones((1, 2, 3)).transpose(0, 2, 1).copy()
    H, GW, ys, yq = np.zeros((1, 3, 3)), np.zeros((1, 3, 2)), np.zeros((1, 2)), np.zeros((1, 2))
    with np.errstate(over="ignore"):
        _add_products(x, x, wt, H, GW, ys, yq)
    assert not np.isfinite(H).all()  # what float32 sums give: the reason for the switch
    H2 = np.zeros((1, 3, 3))
    _add_products(x.astype(np.float64), x.astype(np.float64), wt, H2, np.zeros((1, 3, 2)), np.zeros((1, 2)),
                  np.zeros((1, 2)))
    assert np.isfinite(H2).all() and np.isclose(H2[0, 0, 0], 64 * 1e38, rtol=1e-6)


def test_native_output_goes_to_stderr_not_stdout():
    """What a library prints on file descriptor 1 (LAPACK's xerbla, ONNX Runtime) lands on stderr while a run
    is in progress; stdout keeps only what the CLI prints after it."""
    code = ("import os, sys\n"
            "from onnxprune.cli import _stdout_to_stderr\n"
            "with _stdout_to_stderr():\n"
            "    os.write(1, b'native\\n'); print('python')\n"
            "print('after')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.stdout == "after\n", (p.stdout, p.stderr)
    assert "native" in p.stderr and "python" in p.stderr


# --- 5. the same data directory as --data and --calibration ----------------------------------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "copy"])
def test_same_data_directory_twice_is_exit_2(cnn, data_dir, tmp_path, how):
    other = data_dir
    if how == "symlink":
        other = tmp_path / "link"
        os.symlink(data_dir, other)
    elif how == "copy":
        other = tmp_path / "copy"
        shutil.copytree(data_dir, other)
    r = invoke(cnn, "-s", "0.5", "--data", data_dir, "--calibration", other)
    assert r.exit_code == 2, r.output
    assert "same data" in r.output


def test_different_data_directories_are_fine(cnn, data_dir, tmp_path):
    other = tmp_path / "calib"
    other.mkdir()
    z = np.load(sample("cnn")[1])
    np.save(other / "x.npy", z["x"][100:132])
    r = invoke(cnn, "-s", "0.5", "--data", data_dir, "--calibration", other, "-q")
    assert r.exit_code == 0, r.output


# --- 6. npz members that are not .npy --------------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["--data", "--calibration"])
def test_npz_member_without_npy_suffix_is_exit_3_naming_it(cnn, tmp_path, opt):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.load(sample("cnn")[1])["x"][:16])
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes", b"not an array")
    r = invoke(cnn, "-s", "0.5", opt, path)
    assert r.exit_code == 3, r.output
    assert "'notes'" in r.output and "Traceback" not in r.output


# --- 7. a signal during ONNX Runtime's import ------------------------------------------------------------------

def test_interrupt_inside_onnxruntime_import_stays_an_interrupt(monkeypatch):
    """A signal handled while the extension initialises surfaces as ImportError('initialization failed') with
    the interrupt as its context: that is an interrupt (exit 128+n), not a broken install (exit 4)."""
    import builtins
    from onnxprune import validate
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "onnxruntime":
            try:
                raise Interrupted(signal.SIGTERM)
            except Interrupted:
                raise ImportError("initialization failed")  # noqa: B904 - the context is what we look at
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(Interrupted):
        validate.import_ort()


def test_probe_does_not_swallow_an_interrupt(monkeypatch):
    """removal's constant probe skips itself on any error, but never on an interrupt."""
    from onnxprune import removal, validate

    def interrupted():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904
    monkeypatch.setattr(validate, "import_ort", interrupted)
    m = onnx.load(sample("cnn")[0])
    with pytest.raises(KeyboardInterrupt):
        removal._probe(m, [m.graph.node[0].output[0]], _Shapes(m), 0)


class _Shapes:
    def __init__(self, m):
        from onnx import TensorProto
        self.types = {n.output[0]: TensorProto.FLOAT for n in m.graph.node}


# --- 8/9. outputs published together; signals from the commit on -----------------------------------------------

def test_signal_during_commit_lets_the_run_finish_with_every_output(cnn, tmp_path, monkeypatch):
    from onnxprune.io import save
    real = save.Staged.commit

    def commit_and_signal(self, extra=()):
        os.kill(os.getpid(), signal.SIGTERM)  # lands while publishing: noted, not obeyed
        return real(self, extra)
    monkeypatch.setattr(save.Staged, "commit", commit_and_signal)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke(cnn, "-s", "0.5", "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output
    assert "SIGTERM arrived after the outputs were published" in r.output
    assert os.path.exists(out) and json.loads(_read(rep))["status"] == "ok"
    assert not _staging(tmp_path)


def test_signal_before_commit_writes_neither_model_nor_report(cnn, tmp_path, monkeypatch):
    from onnxprune import validate
    real = validate.Validator.compare

    def compare_and_signal(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)
    monkeypatch.setattr(validate.Validator, "compare", compare_and_signal)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke(cnn, "-s", "0.5", "-o", out, "--report", rep)
    assert r.exit_code == 143, r.output
    assert sorted(os.listdir(tmp_path)) == ["cnn.onnx"]


def test_report_that_cannot_be_staged_writes_no_model(cnn, tmp_path, monkeypatch):
    """A full disk where the report goes: exit 5 before anything is published."""
    from onnxprune.io import staging
    rep_dir = tmp_path / "reports"
    rep_dir.mkdir()
    real = staging._create_staging_file

    def full(directory):
        if os.path.samefile(directory, rep_dir):
            raise OSError(28, "No space left on device")
        return real(directory)
    monkeypatch.setattr(staging, "_create_staging_file", full)
    out = tmp_path / "o.onnx"
    r = invoke(cnn, "-s", "0.5", "-o", out, "--report", rep_dir / "r.json")
    assert r.exit_code == 5, r.output
    assert "No space left" in r.output
    assert sorted(os.listdir(tmp_path)) == ["cnn.onnx", "reports"] and os.listdir(rep_dir) == []


def test_report_whose_rename_fails_after_the_model_says_what_was_written(cnn, tmp_path, monkeypatch):
    from conftest import fail_rename_to
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    fail_rename_to(monkeypatch, rep)
    r = invoke(cnn, "-s", "0.5", "-o", out, "--report", rep)
    assert r.exit_code == 5, r.output
    assert f"written: {out}" in r.output and "not written: --report" in r.output
    assert os.path.exists(out) and not os.path.exists(rep) and not _staging(tmp_path)


def test_report_figures_come_from_the_staged_files(cnn, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke(cnn, "-s", "0.5", "-o", out, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(_read(rep))
    assert doc["figures"]["after"]["file_bytes"] == os.path.getsize(out)
    assert doc["written"] == {str(out): doc["written"][str(out)]}


def test_kept_failed_gate_report_is_published_with_the_model(cnn, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = invoke(cnn, "-s", "0.99", "--data", sample("cnn")[1], "--max-drop", "0.01", "--keep-failed", "-o", out,
               "--report", rep, "-q")
    assert r.exit_code == 1, r.output
    doc = json.loads(_read(rep))
    assert doc["status"] == "failed" and doc["exit_code"] == 1 and "written anyway" in doc["error"]
    assert os.path.exists(out)


# --- 10. Ctrl-C during start-up --------------------------------------------------------------------------------

def test_ctrl_c_while_the_cli_imports_exits_130_without_traceback(tmp_path):
    """The console script's entry point catches a KeyboardInterrupt raised while onnxprune.cli imports."""
    code = ("import sys, importlib.abc\n"
            "class Stop(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'onnxprune.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop())\n"
            "from onnxprune._entry import main\n"
            "sys.exit(main())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert p.stderr == "onnxprune: interrupted\n"


def test_console_script_uses_the_guarded_entry_point():
    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        assert 'onnxprune = "onnxprune._entry:main"' in fh.read()


# --- second campaign: paths the kernel resolves differently from abspath; Resize extrapolation; --no-validate ----

@pytest.mark.parametrize("target", ["r.json/", "missing/-/..", "."])
def test_report_path_that_names_a_directory_is_refused_before_any_work(cnn, tmp_path, target, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(cnn, "-s", "0.5", "-o", "o.onnx", "--report", target)
    assert r.exit_code == 5, r.output
    assert not (tmp_path / "o.onnx").exists()


def test_npy_through_a_symlinked_subdirectory_and_dotdot_is_refused(cnn, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (data_dir / "sub").mkdir()
    os.symlink(data_dir / "sub", tmp_path / "L")
    r = invoke(cnn, "-s", "0.5", "--data", data_dir, "-o", "L/../new.npy")
    assert r.exit_code == 5, r.output
    assert sorted(os.listdir(data_dir)) == ["sub", "x.npy", "y.npy"]


@pytest.mark.parametrize("flag", ["--no-validate", "--dry-run"])
def test_same_data_twice_is_refused_without_validation_too(cnn, data_dir, flag):
    r = invoke(cnn, "-s", "0.5", "--data", data_dir, "--calibration", data_dir, flag)
    assert r.exit_code == 2 and "same data" in r.output


def test_resize_extrapolation_makes_a_dead_channel_vary(tmp_path):
    """tf_crop_and_resize with an extrapolation value: a constant channel is not constant after it, so its
    constant must not be folded (the compacted model computed something else)."""
    r = np.random.default_rng(0)
    w1 = r.standard_normal((6, 3, 1, 1)).astype(np.float32)
    w1[:3] = 0
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Resize", ["a", "roi", "scales"], ["z"], mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-3.0),
             helper.make_node("Conv", ["z", "w2"], ["y"], name="c2")]
    m = make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", None)],
                   [init("w1", w1), init("b1", np.full(6, 2.0, np.float32)),
                    init("roi", np.array([0, 0, -0.2, -0.2, 1, 1, 1.2, 1.2], np.float32)),
                    init("scales", np.array([1, 1, 2, 2], np.float32)),
                    init("w2", r.standard_normal((4, 6, 1, 1)).astype(np.float32))])
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke(path, "-s", "0.3", "--compact", "-o", a, "--no-validate", "-q").exit_code == 0
    assert invoke(path, "-s", "0.3", "--no-compact", "-o", b, "--no-validate", "-q").exit_code == 0
    x = r.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(str(a), {"x": x})[0], run(str(b), {"x": x})[0], rtol=1e-4, atol=1e-4)
