"""The CLI side of calibrated reconstruction: where calibration data comes from, the split, what is refused."""
import json
import os
import shutil

import numpy as np

from conftest import invoke, sample


def test_data_alone_is_split_first_n_calibrate_rest_evaluate(cnn, tmp_path):
    r = invoke(cnn, "-s", "0.9", "--data", sample("cnn")[1], "--reconstruct", "--json", "-q")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0, doc["error"]
    cal = doc["reconstruction"]["calibration"]
    assert cal["split_from_data"] and cal["samples"] == 128 and cal["evaluation_samples"] == 500 - 128
    assert doc["validation"]["samples"] == 500 - 128 and "[samples 128:]" in doc["validation"]["data"]
    assert sum(l["zeros_after_selection"] for l in doc["layers"]) == round(0.9 * 14304)


def test_calibration_file_implies_reconstruct_and_is_never_the_evaluation_set(cnn, tmp_path):
    z = np.load(sample("cnn")[1])
    np.savez(tmp_path / "cal.npz", x=z["x"][:64])
    r = invoke(cnn, "-s", "0.9", "--calibration", tmp_path / "cal.npz", "--data", sample("cnn")[1], "--json", "-q",
               "--calibration-samples", "32")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["reconstruction"]["calibration"]["samples"] == 32
    assert doc["validation"]["samples"] == 500 and not doc["reconstruction"]["calibration"]["split_from_data"]
    shutil.copy(sample("cnn")[1], tmp_path / "same.npz")
    r = invoke(cnn, "-s", "0.9", "--calibration", tmp_path / "same.npz", "--data", sample("cnn")[1])
    assert r.exit_code == 2 and "same data" in r.stderr


def test_reconstruct_without_data_or_with_too_little_is_a_usage_error(cnn, tmp_path):
    out = tmp_path / "o.onnx"
    assert invoke(cnn, "-s", "0.9", "--reconstruct", "-o", out).exit_code == 2
    assert invoke(cnn, "-s", "0.9", "--no-reconstruct", "--calibration", sample("cnn")[1], "-o", out).exit_code == 2
    z = np.load(sample("cnn")[1])
    np.savez(tmp_path / "small.npz", x=z["x"][:100], y=z["y"][:100])
    r = invoke(cnn, "-s", "0.9", "--reconstruct", "--data", tmp_path / "small.npz", "-o", out)
    assert r.exit_code == 2 and "nothing would be left" in r.stderr and not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]
