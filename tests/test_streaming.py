"""Models larger than memory (issue 18): weights left in their external data file (mapped, one tensor resident at a
time) and written block by block give the same bytes as the in-memory path, leave the inputs untouched and nothing
behind. ``--stream-above 0`` forces the streamed path on small models; the blocks are made small so that every
block loop runs more than once."""
import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, invoke, make_model, vi

import onnxprune.io.mapped as mapped
import onnxprune.select as select
import onnxprune.threshold as threshold
from onnxprune.io import load_model, stage_model
from onnxprune.io.mapped import Residency, Streamed, Values, mask_values
from onnxprune.pipeline import PruneConfig, prune_loaded


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few hundred values: every block loop of the streamed path runs several times here."""
    monkeypatch.setattr(mapped, "BLOCK_ELEMENTS", 264)
    monkeypatch.setattr(select, "BLOCK", 200)
    monkeypatch.setattr(threshold, "BLOCK", 200)


def external_copy(src, tmp_path, name="model.onnx", threshold_bytes=0):
    """``src`` saved with every tensor of at least ``threshold_bytes`` in one external data file."""
    model = onnx.load(src) if isinstance(src, str) else src
    path = str(tmp_path / name)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=threshold_bytes)
    return path


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree(d):
    """{file name: sha256} of a directory."""
    return {n: digest(os.path.join(d, n)) for n in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, n))}


def run_both(model_path, tmp_path, *args):
    """The CLI with --stream-above 0 and never into two directories: (streamed dir, in-memory dir, reports)."""
    out = {}
    for mode in ("0", "never"):
        d = tmp_path / f"out_{mode}"
        d.mkdir()
        r = invoke(model_path, "-o", d / "m.onnx", "--stream-above", mode, "-q", "--report",
                   tmp_path / f"r_{mode}.json", *args)
        assert r.exit_code == 0, (mode, r.output)
        out[mode] = (str(d), json.load(open(tmp_path / f"r_{mode}.json")))
    return out["0"], out["never"]


CASES = {
    "mlp_matmul lamp": ("mlp_matmul.onnx", ["-s", "0.9"]),
    "mlp_gemm global": ("mlp_gemm.onnx", ["-s", "0.8", "--method", "global"]),
    "cnn lamp": ("cnn.onnx", ["-s", "0.9"]),
    "cnn_torch erk": ("cnn_torch.onnx", ["-s", "0.7", "--method", "erk"]),
    "cnn random": ("cnn.onnx", ["-s", "0.6", "--method", "random", "--seed", "3"]),
    "cnn lap": ("cnn.onnx", ["-s", "0.8", "--method", "lap"]),
    "cnn global-mt effective": ("cnn.onnx", ["-s", "0.9", "--method", "global-mt", "--target", "effective"]),
    "cnn channel": ("cnn.onnx", ["-s", "0.5", "--granularity", "channel"]),
    "cnn compact": ("cnn.onnx", ["-s", "0.95", "--compact"]),
    "crnn lamp": ("crnn.onnx", ["-s", "0.8"]),
    "encoder uniform+": ("encoder.onnx", ["-s", "0.7", "--method", "uniform+"]),
    "detector exclude": ("detector.onnx", ["-s", "0.8", "--exclude", "*head*"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_output_is_byte_identical(case, tmp_path):
    name, args = CASES[case]
    src = external_copy(os.path.join(SAMPLES, name), tmp_path)
    before = tree(tmp_path)
    (s_dir, s_rep), (m_dir, m_rep) = run_both(src, tmp_path, "--no-validate", *args)
    assert tree(s_dir) == tree(m_dir)  # the model and its data file, byte for byte (same content-addressed name)
    assert s_rep["options"]["streamed"]["tensors"] > 0
    assert "streamed" not in m_rep["options"]
    assert s_rep["totals"] == m_rep["totals"]
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before  # inputs unchanged


def test_streamed_fp16_and_validation(tmp_path):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((32, 64)).astype(np.float16)
    w2 = rng.standard_normal((10, 64)).astype(np.float16)  # Gemm transB
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", ["N", 32], TensorProto.FLOAT16)], [vi("y", ["N", 10], TensorProto.FLOAT16)],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = external_copy(model, tmp_path)
    (s_dir, s_rep), (m_dir, m_rep) = run_both(src, tmp_path, "-s", "0.75", "--no-effective")
    assert tree(s_dir) == tree(m_dir)
    assert s_rep["validation"]["outputs"]  # ONNX Runtime ran the streamed output from its file
    assert s_rep["validation"]["outputs"] == m_rep["validation"]["outputs"]
    pruned = onnx.load(os.path.join(s_dir, "m.onnx"))
    total = sum(numpy_helper.to_array(t).size for t in pruned.graph.initializer)
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in pruned.graph.initializer)
    assert zeros == round(0.75 * total)


@pytest.mark.parametrize("name, calib, extra", [
    ("mlp_matmul.onnx", "digits_mlp_test.npz", []),
    ("cnn.onnx", "digits_cnn_test.npz", []),
    ("cnn_torch.onnx", "digits_cnn_test.npz", ["--granularity", "channel", "-s", "0.5"]),
])
def test_streamed_reconstruction_matches(name, calib, extra, tmp_path):
    """Mapped weights and spilled refit weights are handed to the prefix sessions as external initializers: the same
    refit, the same bytes."""
    src = external_copy(os.path.join(SAMPLES, name), tmp_path)
    (s_dir, s_rep), (m_dir, _) = run_both(src, tmp_path, "-s", "0.9", "--calibration", os.path.join(SAMPLES, calib),
                                          "--calibration-samples", "64", "--no-validate", *extra)
    assert tree(s_dir) == tree(m_dir)
    layers = s_rep["reconstruction"]["layers"]
    assert layers and not [r for r in layers if "fallback" in r]


def test_large_initializers_are_handed_not_serialised(tmp_path, monkeypatch):
    """Every initializer handed to the prefix sessions (as one over HANDED is, so that a prefix never meets
    protobuf's 2 GiB): ONNX Runtime computes exactly what it computes from the serialised weights."""
    import onnxprune.reconstruct.activations as activations
    src = os.path.join(SAMPLES, "cnn.onnx")
    args = ["-s", "0.9", "--calibration", os.path.join(SAMPLES, "digits_cnn_test.npz"), "--calibration-samples",
            "32", "--no-validate", "-q"]
    sizes = []
    real = activations.prefix_model

    def spy(*a, **kw):
        r = real(*a, **kw)
        pm = onnx.load_from_string(r[0])
        floats = [t for t in pm.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        held = [t for t in floats if t.data_location != onnx.TensorProto.EXTERNAL and t.raw_data]
        sizes.append((len(r[0]), len(r[4]), len(floats), len(held)))
        return r
    monkeypatch.setattr(activations, "prefix_model", spy)
    outs, default = {}, activations.HANDED
    for handed in (default, 1):
        monkeypatch.setattr(activations, "HANDED", handed)
        d = tmp_path / f"h{handed}"
        d.mkdir()
        assert invoke(src, "-o", d / "m.onnx", *args).exit_code == 0
        outs[handed] = tree(d)
    assert outs[1] == outs[default]
    half = len(sizes) // 2
    assert not any(n for _, n, _, _ in sizes[:half])
    # every float weight a prefix uses is handed (a dense prefix that starts after the last layer's Conv may use
    # none), none is held in the protobuf
    assert all(n == f and h == 0 for _, n, f, h in sizes[half:]) and any(n for _, n, _, _ in sizes[half:])
    assert sum(s[0] for s in sizes[half:]) < sum(s[0] for s in sizes[:half]) / 10  # the weights left the protobuf


def test_only_prunable_weights_are_mapped(tmp_path):
    src = external_copy(os.path.join(SAMPLES, "cnn.onnx"), tmp_path)
    loaded = load_model(src, stream_above=0)
    from onnxprune.checks import big_float
    from onnxprune.graph import find_layers
    layers, _ = find_layers(loaded.model)
    streamed = {n for n, v in loaded.pending.items() if isinstance(v, Streamed)}
    assert streamed == {l.tensor.name for l in layers if big_float(l.tensor)}  # weights of 1 KiB and more
    for t in loaded.model.graph.initializer:  # biases and other tensors are read into memory as before
        if t.name not in streamed:
            assert t.data_location != TensorProto.EXTERNAL and len(t.raw_data) or t.float_data or not t.dims
    assert load_model(src, stream_above=None).pending == {}
    big = load_model(src, stream_above=1 << 40)
    assert big.pending == {} and big.mapper is None


@pytest.mark.parametrize("how, message", [
    ("short", "need"),
    ("offset", "beyond"),
    ("outside", "rejected"),
])
def test_bad_external_data_of_a_mapped_weight(how, message, tmp_path):
    src = external_copy(os.path.join(SAMPLES, "mlp_matmul.onnx"), tmp_path)
    model = onnx.load(src, load_external_data=False)
    t = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    entries = {e.key: e for e in t.external_data}
    if how == "short":
        entries["length"].value = str(int(entries["length"].value) - 4)
    elif how == "offset":
        entries["offset"].value = str(os.path.getsize(src + ".data") + 64)
    else:
        entries["location"].value = "../elsewhere.data"
    onnx.save(model, src)
    before = tree(tmp_path)
    r = invoke(src, "-s", "0.5", "--stream-above", "0", "--no-validate")
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert tree(tmp_path) == before  # nothing written


def test_interrupt_while_writing_blocks_leaves_nothing(tmp_path, monkeypatch):
    src = external_copy(os.path.join(SAMPLES, "cnn.onnx"), tmp_path)
    before = tree(tmp_path)
    real = Streamed.blocks

    def interrupted(self, *a, **k):
        for n, block in enumerate(real(self, *a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield block
    monkeypatch.setattr(Streamed, "blocks", interrupted)
    r = invoke(src, "-s", "0.9", "--stream-above", "0", "--no-validate", "-o", tmp_path / "out.onnx")
    assert r.exit_code == 130, r.output
    assert tree(tmp_path) == before  # no output, no data file, no staging directory


def test_progress_per_streamed_tensor(tmp_path):
    src = external_copy(os.path.join(SAMPLES, "cnn.onnx"), tmp_path)
    loaded = load_model(src, stream_above=0)
    prune_loaded(loaded, PruneConfig(sparsity=0.9), defer_writes=True)
    calls = []
    with stage_model(loaded, str(tmp_path / "out.onnx"), progress=lambda k, n, name: calls.append((k, n, name))):
        pass
    n = sum(isinstance(v, Streamed) for v in loaded.pending.values())
    assert [c[:2] for c in calls] == [(k + 1, n) for k in range(n)]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # left unpublished: nothing there


def test_block_passes_equal_whole_array_passes():
    """The block-by-block threshold bracket and magnitude mask give exactly the whole-array results."""
    rng = np.random.default_rng(7)
    layers = [np.round(rng.standard_normal(s), 1).astype(np.float32) for s in (1000, 777, 64)]  # many ties
    layers[0][:50] = 0
    total = sum(w.size for w in layers)
    for kind in ("lamp", "magnitude"):
        for frac in (0.1, 0.5, 0.93):
            target = int(frac * total)
            threshold.BLOCK = 1 << 30
            whole = threshold.global_prune_counts(layers, kind, target)
            threshold.BLOCK = 100
            assert np.array_equal(threshold.global_prune_counts(layers, kind, target)[0], whole[0])
            for w, n, hint in zip(layers, whole[0], whole[1]):
                if hint is None or n in (0, w.size):
                    continue
                ref = select.prune_mask(np.abs(w), int(n), w.shape, None, hint=hint)
                select.BLOCK = 64
                got = select.magnitude_mask(w, int(n), w.shape, None, hint, out=np.empty(w.size, bool))
                assert got is not None and np.array_equal(got, ref)


def test_residency_drops_the_other_tensors(tmp_path):
    data = tmp_path / "d.bin"
    np.arange(4096, dtype=np.float32).tofile(data)
    dropped = []

    class Spy(mapped.Source):
        def drop(self):
            dropped.append(self.shape)
            super().drop()
    res = Residency()
    fd = os.open(data, os.O_RDONLY)
    try:
        a = Spy(fd, 0, np.float32, (1024,), res)
        b = Spy(fd, 8192, np.float32, (512,), res)
    finally:
        os.close(fd)
    values = Values([a, np.ones(3), b])
    assert values[0][5] == 5 and values[2][0] == 2048 and dropped == [(1024,)]
    assert [len(v) for v in values] == [1024, 3, 512] and dropped == [(1024,), (512,), (1024,)]
    assert values.source(1) is None and values.source(2) is b
    assert list(values.subset([2])[0][:2]) == [2048, 2049]


def test_streamed_masked_blocks_and_array_agree(tmp_path):
    data = tmp_path / "d.bin"
    w = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    w[::7] = -0.0
    w.tofile(data)
    keep = np.random.default_rng(4).random(1000) < 0.3
    fd = os.open(data, os.O_RDONLY)
    try:
        s = Streamed(mapped.Source(fd, 0, np.float32, (10, 100), Residency()), np.packbits(keep))
    finally:
        os.close(fd)
    whole = mask_values(w.reshape(10, 100), keep.reshape(10, 100), np.empty((10, 100), np.float32))
    assert np.asarray(s).tobytes() == whole.tobytes()
    assert b"".join(b.tobytes() for b in s.blocks(96)) == whole.tobytes()
    assert np.array_equal(s.nonzero(), whole != 0)


def test_stream_above_option_parsing(tmp_path):
    src = external_copy(os.path.join(SAMPLES, "mlp_matmul.onnx"), tmp_path)
    for bad in ("-1", "lots", "1Q", "nan"):
        r = invoke(src, "-s", "0.5", "--stream-above", bad, "--dry-run")
        assert r.exit_code == 2, (bad, r.output)
    for good in ("0", "1k", "512M", "2GiB", "never", "1.5G"):
        r = invoke(src, "-s", "0.5", "--stream-above", good, "--dry-run", "--json")
        assert r.exit_code == 0, (good, r.output)
        streamed = json.loads(r.output)["options"].get("streamed")
        assert (streamed is not None) == (good == "0" or good == "1k"), good


def test_a_model_without_external_data_never_streams(tmp_path):
    src = str(tmp_path / "m.onnx")
    shutil.copy(os.path.join(SAMPLES, "cnn.onnx"), src)
    loaded = load_model(src, stream_above=0)
    assert loaded.mapper is None and loaded.pending == {}


def test_large_models_are_timed_one_session_at_a_time(tmp_path, monkeypatch):
    """Above TOGETHER_BYTES of weights the latency timing never holds the dense and the pruned model at once."""
    import onnxprune.validate as validate
    monkeypatch.setattr(validate, "TOGETHER_BYTES", 0)
    live, most = [0], [0]
    real = validate.make_session

    class Held:
        def __init__(self, sess):
            self.sess = sess
            live[0] += 1
            most[0] = max(most[0], live[0])

        def __getattr__(self, name):
            return getattr(self.sess, name)

        def __del__(self):
            live[0] -= 1
    monkeypatch.setattr(validate, "make_session", lambda *a, **kw: Held(real(*a, **kw)))
    monkeypatch.setattr(validate, "_side_by_side", None)  # never called
    src = external_copy(os.path.join(SAMPLES, "mlp_matmul.onnx"), tmp_path)
    r = invoke(src, "-o", tmp_path / "o.onnx", "-s", "0.5", "--stream-above", "0", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)["validation"]
    assert v["latency_ms_dense"] > 0 and v["latency_ms_pruned"] > 0
    assert most[0] == 1
