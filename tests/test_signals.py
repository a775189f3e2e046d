"""Signals while the output is being written (issue 8, item 2): nothing may be left behind.

A ~100 MB model is built once; the CLI runs as a subprocess with --no-validate, the test polls the output
directory for the staging entry and sends the signal while it exists. The contract: SIGINT exits 130, SIGTERM
143, SIGHUP 129; --json still prints one JSON document; no staging file or directory, no output and no data file
is left. A SIGKILLed run's staging is removed by the next run into that directory.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, sample

N = 5000  # 25 M fp32 weights: 100 MB


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, N), dtype=np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    inline = str(d / "big.onnx")
    onnx.save(m, inline)
    ext_dir = d / "ext"
    ext_dir.mkdir()
    external = str(ext_dir / "big.onnx")
    onnx.save(m, external, save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    return {"inline": inline, "external": external}


def _staging(directory):
    return [f for f in os.listdir(directory) if f.startswith(".onnxprune")]


def _start(model, out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "onnxprune.cli", model, "-s", "0.5", "-m", "global",
                             "--no-validate", "--no-effective", "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _signal_while_staging(model, out_dir, sig, *extra, attempts=3):
    """Run until the staging entry appears, send ``sig``; returns (returncode, stdout, stderr). Retries when the
    run finished before the signal could land (the test needs the signal mid-write)."""
    out = out_dir / "o.onnx"
    for _ in range(attempts):
        p = _start(model, out, *extra)
        deadline = time.monotonic() + 120
        sent = False
        while time.monotonic() < deadline and p.poll() is None:
            if _staging(out_dir):
                p.send_signal(sig)
                sent = True
                break
            time.sleep(0.0005)
        stdout, stderr = p.communicate(timeout=120)
        if sent and p.returncode != 0:
            return p.returncode, stdout.decode(), stderr.decode()
        for f in os.listdir(out_dir):  # it finished first: clean up and try again
            os.unlink(out_dir / f)
    pytest.fail("the run always finished before the signal landed")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
@pytest.mark.parametrize("kind", ["inline", "external"])
def test_signal_during_write_leaves_nothing(big_models, tmp_path, sig, code, kind):
    model = big_models[kind]
    with open(model, "rb") as fh:
        head = fh.read(1 << 16)
    rc, stdout, stderr = _signal_while_staging(model, tmp_path, sig)
    assert rc == code, (rc, stderr[-2000:])
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    with open(model, "rb") as fh:
        assert fh.read(1 << 16) == head


def test_sigterm_with_json_prints_one_document(big_models, tmp_path):
    rc, stdout, stderr = _signal_while_staging(big_models["inline"], tmp_path, signal.SIGTERM, "--json")
    assert rc == 143
    doc = json.loads(stdout)
    assert doc["exit_code"] == 143
    assert os.listdir(tmp_path) == []


def test_sigkilled_run_staging_is_removed_by_the_next_run(big_models, tmp_path):
    out = tmp_path / "o.onnx"
    for _ in range(3):
        p = _start(big_models["external"], out)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not _staging(tmp_path):
            time.sleep(0.0005)
        p.kill()
        p.communicate()
        if _staging(tmp_path):
            break
        for f in os.listdir(tmp_path):
            os.unlink(tmp_path / f)
    left = _staging(tmp_path)
    assert left, "SIGKILL never landed during the write"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", sample("mlp_gemm")[0], "-s", "0.5", "--no-validate",
                        "-o", str(tmp_path / "small.onnx")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _staging(tmp_path) == []


def test_signals_at_any_point_of_a_reconstructing_run(tmp_path):
    """SIGTERM/SIGINT/SIGHUP at points spread over a whole run with --reconstruct (calibration from a directory)
    and --report: the exit is 0 or the signal's code, never a traceback, 4 or 70; nothing staged is left; the
    data stays; and a model on disk always has its report beside it (they are published together)."""
    model, data = sample("cnn")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.load(data)["x"][:128])
    before = (calib / "x.npy").read_bytes()
    env = dict(os.environ, PYTHONPATH=ROOT)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "onnxprune.cli", model, "-s", "0.9", "--calibration", str(calib), "--data", data,
           "-o", str(out), "--report", str(rep)]
    runs = []
    for _ in range(2):  # the quicker of two (the first pays for cold caches)
        t = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
        runs.append(time.monotonic() - t)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        os.unlink(out)
        os.unlink(rep)
    duration = min(runs)
    sigs = [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]
    codes = set()
    for k in range(9):
        sig, code = sigs[k % 3]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        time.sleep(duration * (0.15 + 0.8 * k / 8))
        p.send_signal(sig)
        _, stderr = p.communicate(timeout=300)
        stderr = stderr.decode()
        codes.add(p.returncode)
        # -n: the signal landed before the handlers were installed (the default action: nothing was staged yet)
        assert p.returncode in (0, code, -sig), (k, p.returncode, stderr[-2000:])
        assert "Traceback" not in stderr, stderr[-2000:]
        assert not _staging(tmp_path), _staging(tmp_path)
        assert os.path.exists(out) == os.path.exists(rep), (k, p.returncode, os.listdir(tmp_path))
        if os.path.exists(out):
            assert p.returncode == 0 and json.loads(rep.read_text())["status"] == "ok"
            os.unlink(out)
            os.unlink(rep)
        assert (calib / "x.npy").read_bytes() == before
    assert codes - {0}, "no signal landed during the run"
