"""Hostile and malformed inputs (issue 8): one reproducer per defect class, through the CLI and the Python API.

Every refusal must name the problem, exit with its documented code (3 input, 5 output), write nothing and
leave no staging behind; nothing may exit 70.
"""
import copy
import json
import os
import re
import stat
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import checks
from onnxprune import io as pio
from onnxprune.errors import InputError, Interrupted, OutputError

from conftest import fail_rename_to, init, invoke, make_model, sample, two_layer_mlp, vi


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def conv_model(group=1, wshape=(4, 2, 3, 3), cin=2, **attrs):
    w = np.random.default_rng(0).standard_normal(wshape).astype(np.float32)
    n = helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=group, **attrs)
    return make_model([n], [vi("x", [1, cin, 8, 8])], [vi("y", ["a", "b", "c", "d"])], [init("w", w)])


def _short(m):
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    return m


def _long(m):
    m.graph.initializer[0].raw_data += b"\0" * 4
    return m


def _odd(m):
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-1]
    return m


def _dims(d):
    def f(m):
        m.graph.initializer[0].dims[:] = d
        return m
    return f


def _dtype(m):
    m.graph.initializer[0].data_type = 99
    return m


def _two_fields(m):
    m.graph.initializer[0].float_data.extend([1.0])
    return m


def _typed_wrong_count(m):
    t = m.graph.initializer[0]
    arr = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(arr.ravel().tolist()[:-1])
    return m


def _dup_init(m):
    m.graph.initializer.append(copy.deepcopy(m.graph.initializer[0]))
    return m


def _dangling(m):
    m.graph.node[1].input[0] = "nope"
    return m


def _cycle(m):
    m.graph.node[0].input[0] = "y"
    return m


def _const_no_output(m):
    m.graph.node.insert(0, helper.make_node("Constant", [], [], value=numpy_helper.from_array(np.ones(2, np.float32))))
    return m


def _const_sparse(m):
    st = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "v"),
                                   numpy_helper.from_array(np.array([0, 1], np.int64), "i"), [4])
    m.graph.node.insert(0, helper.make_node("Constant", [], ["sc"], sparse_value=st))
    return m


def _segment(m):
    m.graph.initializer[0].segment.begin = 0
    m.graph.initializer[0].segment.end = 4
    return m


def concat_float_axis():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Concat", ["h", "h"], ["y"])]
    nodes[1].attribute.append(helper.make_attribute("axis", 1.0))
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 32])], [init("w1", np.ones((8, 16), np.float32))])


def sparse_in_subgraph():
    st = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "sv"),
                                   numpy_helper.from_array(np.array([0, 1], np.int64), "si"), [4, 4])
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "sv"], ["t"])], "then", [], [vi("t", [2, 4])])
    then_g.sparse_initializer.append(st)
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["e"])], "else", [], [vi("e", [2, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 4])],
                      [init("w", np.ones((4, 4), np.float32))])


def gemm_transb_mismatch():
    """Passes the plain checker, fails strict shape inference (RELIABILITY B5)."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 4])], [init("w", np.ones((8, 4), np.float32))])


MALFORMED = {
    "raw data short": (lambda: _short(two_layer_mlp()), "raw_data holds 508 bytes"),
    "raw data long": (lambda: _long(two_layer_mlp()), "raw_data holds 516 bytes"),
    "raw data odd length": (lambda: _odd(two_layer_mlp(dtype=np.float16)), "raw_data holds 255 bytes"),
    "typed field short": (lambda: _typed_wrong_count(two_layer_mlp()), "float_data holds 127"),
    "negative dims": (lambda: _dims([-8, 16])(two_layer_mlp()), "negative dimension"),
    "overflowing dims": (lambda: _dims([2 ** 40, 2 ** 40])(two_layer_mlp()), "overflow"),
    "unknown data_type": (lambda: _dtype(two_layer_mlp()), "unknown data_type 99"),
    "two data fields": (lambda: _two_fields(two_layer_mlp()), "two data fields"),
    "segment": (lambda: _segment(two_layer_mlp()), "segment"),
    "conv group 0": (lambda: conv_model(group=0), "group = 0"),
    "conv group not dividing": (lambda: conv_model(group=3), "does not divide"),
    "conv group vs input channels": (lambda: conv_model(group=2, cin=2), "input has 2 channels"),
    "rank-1 conv weight": (lambda: _dims([72])(conv_model()), "rank 1"),
    "conv negative pads": (lambda: conv_model(pads=[-1, 0, 0, 0]), "'pads'"),
    "conv zero stride": (lambda: conv_model(strides=[0, 1]), "'strides'"),
    "concat axis as float": (concat_float_axis, "Mismatched attribute type"),
    "constant without output": (lambda: _const_no_output(two_layer_mlp()), "exactly one output"),
    "duplicate initializer": (lambda: _dup_init(two_layer_mlp()), "duplicate initializer name 'w1'"),
    "dangling input": (lambda: _dangling(two_layer_mlp()), "dangling"),
    "cycle": (lambda: _cycle(two_layer_mlp()), "cycle"),
    "constant sparse_value": (lambda: _const_sparse(two_layer_mlp()), "sparse"),
    "sparse initializer in subgraph": (sparse_in_subgraph, "sparse initializer"),
    "gemm shape mismatch (full check)": (gemm_transb_mismatch, "ONNX checker"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_model_is_exit_3_naming_the_problem_and_writes_nothing(case, tmp_path):
    build, words = MALFORMED[case]
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path))
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    r = invoke(path, "-s", "0.5", "-o", out, "--no-validate")
    assert r.exit_code == 3, r.output
    assert words in r.stderr and "Traceback" not in r.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert path.read_bytes() == before


@pytest.mark.parametrize("case", ["raw data short", "unknown data_type", "conv group 0", "cycle",
                                  "constant sparse_value", "gemm shape mismatch (full check)"])
def test_python_api_refuses_malformed_modelproto(case):
    build, words = MALFORMED[case]
    with pytest.raises(InputError, match=re.escape(words)):
        onnxprune.prune(build(), sparsity=0.5)


def test_valid_models_pass_every_check():
    for name in ("mlp_gemm", "mlp_matmul", "cnn", "cnn_torch"):
        checks.check_model(onnx.load(sample(name)[0]), name)
    checks.check_model(conv_model(group=2, wshape=(4, 1, 3, 3), cin=2))  # grouped conv done right


def test_output_without_declared_shape_is_tolerated():
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 4])], [vi("y", None)],
                   [init("w", np.ones((4, 3), np.float32))])
    checks.check_model(m)


def _external(tmp_path, name="m.onnx", **kw):
    d = tmp_path / "mdl"
    d.mkdir(exist_ok=True)
    m = two_layer_mlp()
    path = str(d / name)
    onnx.save(m, path, save_as_external_data=True, location=name + ".data", size_threshold=0, **kw)
    return path


def test_external_length_mismatch_is_exit_3(tmp_path):
    path = _external(tmp_path)
    m = onnx.load(path, load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "length":
            e.value = str(int(e.value) - 4)  # in bounds of the file, short of the dims
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "w1" in r.stderr and "508 bytes" in r.stderr


def test_external_with_inline_data_too_is_exit_3(tmp_path):
    path = _external(tmp_path)
    m = onnx.load(path, load_external_data=False)
    m.graph.initializer[0].raw_data = b"\0" * 512
    with open(path, "wb") as fh:  # onnx.save would write the raw data out to the data file
        fh.write(m.SerializeToString())
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "two data fields" in r.stderr


def test_unknown_external_data_key_is_exit_3(tmp_path):
    path = _external(tmp_path)
    m = onnx.load(path, load_external_data=False)
    e = m.graph.initializer[0].external_data.add()
    e.key, e.value = "evil", "1"
    onnx.save(m, path)
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "unknown external data key" in r.stderr and "Warning" not in r.output


def _with_external_training_state(location: str):
    """The sample MLP with a 16-float training_info tensor stored externally at ``location``."""
    m = two_layer_mlp()
    t = numpy_helper.from_array(np.zeros(16, np.float32), "state")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        e = t.external_data.add()
        e.key, e.value = k, v
    m.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], [], [t]))
    return m


def test_training_info_external_data_gets_the_same_path_checks(tmp_path):
    d = tmp_path / "mdl"
    d.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\1" * 64)
    m = _with_external_training_state("../secret.bin")
    path = str(d / "m.onnx")
    onnx.save(m, path)
    out = tmp_path / "o.onnx"
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", out)
    assert r.exit_code == 3 and "state" in r.stderr and not out.exists()


def test_training_info_external_data_inside_the_directory_is_loaded(tmp_path):
    d = tmp_path / "mdl"
    d.mkdir()
    (d / "state.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    m = _with_external_training_state("state.bin")
    path = str(d / "m.onnx")
    onnx.save(m, path)
    loaded = pio.load_model(path)
    got = numpy_helper.to_array(loaded.model.training_info[0].initialization.initializer[0])
    assert (got == np.arange(16)).all()
    assert os.path.realpath(str(d / "state.bin")) in loaded.external_files


@pytest.mark.parametrize("compact", [False, True])
def test_training_info_external_data_stays_external_in_the_output(tmp_path, compact):
    """The training state is written to the output's data file, not inlined (it used to be: onnx's own tensor
    traversal, which recorded what was external, skips training_info)."""
    d = tmp_path / "mdl"
    d.mkdir()
    (d / "state.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    path = str(d / "m.onnx")
    onnx.save(_with_external_training_state("state.bin"), path)
    out = tmp_path / "o.onnx"
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", out, *(["--compact"] if compact else []))
    assert r.exit_code == 0, r.output
    raw = onnx.load(str(out), load_external_data=False)
    state = raw.training_info[0].initialization.initializer[0]
    assert state.data_location == TensorProto.EXTERNAL and not state.HasField("raw_data")
    # onnx.load skips training_info's external data: read it from the output's directory
    assert (numpy_helper.to_array(state, base_dir=str(tmp_path)) == np.arange(16)).all()
    assert (numpy_helper.to_array(pio.load_model(str(out)).model.training_info[0].initialization.initializer[0])
            == np.arange(16)).all()


# --- input paths that are not regular files ---------------------------------------------------------------------

def test_input_fifo_and_directory_are_exit_3_without_hanging(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    r = invoke(fifo, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "regular file" in r.stderr
    with pytest.raises(InputError, match="directory"):
        pio.load_model(str(tmp_path))


# --- outputs that are not regular files, collisions -------------------------------------------------------------

def test_output_fifo_directory_symlink_refused_exit_5(cnn, tmp_path):
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    (tmp_path / "dir.onnx").mkdir()
    os.symlink(fifo, tmp_path / "link.onnx")
    for target in (fifo, tmp_path / "dir.onnx", tmp_path / "link.onnx"):
        r = invoke(cnn, "-s", "0.5", "--no-validate", "-o", target)
        assert r.exit_code == 5, (target, r.output)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.path.isdir(tmp_path / "dir.onnx")
    assert os.path.islink(tmp_path / "link.onnx")
    r = invoke(cnn, "-s", "0.5", "--no-validate", "-o", tmp_path / "ok.onnx", "--report", fifo)
    assert r.exit_code == 5 and not (tmp_path / "ok.onnx").exists()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="mknod needs root")
def test_output_device_node_refused_exit_5(cnn, tmp_path):
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for args in (("-o", dev), ("-o", tmp_path / "x.onnx", "--report", dev)):
        r = invoke(cnn, "-s", "0.5", "--no-validate", *args)
        assert r.exit_code == 5 and "not a regular file" in r.stderr
        assert stat.S_ISCHR(os.stat(dev).st_mode)
    with pytest.raises(OutputError):
        pio.atomic_write_bytes(str(dev), b"x")
    loaded = pio.load_model(cnn)
    with pytest.raises(OutputError):
        pio.stage_model(loaded, str(dev))
    assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_report_colliding_with_input_or_output_refused_exit_5(tmp_path):
    path = _external(tmp_path)
    data = path + ".data"
    before = (_read(path), _read(data))
    out = tmp_path / "o.onnx"
    for report in (path, data, out):
        r = invoke(path, "-s", "0.5", "--no-validate", "-o", out, "--report", report)
        assert r.exit_code == 5, (report, r.output)
    os.link(path, tmp_path / "hard.json")
    os.symlink(data, tmp_path / "soft.json")
    for report in (tmp_path / "hard.json", tmp_path / "soft.json"):
        assert invoke(path, "-s", "0.5", "--no-validate", "-o", out, "--report", report).exit_code == 5
    assert (_read(path), _read(data)) == before and not out.exists()


def test_check_write_targets_covers_every_pair(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    out = str(tmp_path / "o.onnx")
    ok = {"-o": out, "--report": str(tmp_path / "r.json"), "--plot": str(tmp_path / "p.png")}
    pio.check_write_targets(ok, [str(model), str(data)])
    for label, bad in (("--plot", str(model)), ("--report", str(data)), ("--plot", out),
                       ("--report", str(tmp_path / "o.onnx.0123456789abcdef.data"))):
        with pytest.raises(OutputError, match=re.escape(label)):
            pio.check_write_targets({**ok, label: bad}, [str(model), str(data)])
    # an input named like the output's data files would be replaced or removed on publishing
    named = tmp_path / "o.onnx.0123456789abcdef.data"
    named.write_bytes(b"x")
    with pytest.raises(OutputError, match="data file"):
        pio.check_write_targets({"-o": out}, [str(model), str(named)])
    pio.check_write_targets({"--report": "-", "-o": out}, [str(model)])  # "-" is stdout, never a file


# --- publishing ------------------------------------------------------------------------------------------------

def _prune_to(path, out, sparsity=0.5):
    loaded = pio.load_model(path)
    onnxprune.prune_loaded(loaded, onnxprune.PruneConfig(sparsity=sparsity))
    return pio.save_model(loaded, str(out))


def test_external_data_name_is_content_addressed_and_previous_one_removed(tmp_path):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    w1 = _prune_to(path, out, 0.5)
    first = [os.path.basename(p) for p in w1 if p.endswith(".data")]
    assert len(first) == 1 and re.fullmatch(r"o\.onnx\.[0-9a-f]{16}\.data", first[0])
    ref = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer for e in t.external_data
           if e.key == "location"}
    assert ref == set(first)
    model_bytes = out.read_bytes()
    _prune_to(path, out, 0.5)  # same input and options: byte-identical, same data file kept
    assert out.read_bytes() == model_bytes and (tmp_path / first[0]).exists()
    w3 = _prune_to(path, out, 0.9)
    second = [os.path.basename(p) for p in w3 if p.endswith(".data")]
    assert second != first and (tmp_path / second[0]).exists() and not (tmp_path / first[0]).exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["mdl", "o.onnx", second[0]])
    onnx.checker.check_model(str(out), full_check=True)


def test_data_not_named_like_ours_or_not_referenced_is_never_removed(tmp_path):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    _prune_to(path, out, 0.5)
    stranger = tmp_path / "o.onnx.ffffffffffffffff.data"  # our naming, but not referenced by the old output
    stranger.write_bytes(b"keep")
    other = tmp_path / "o.onnx.data"
    other.write_bytes(b"keep")
    _prune_to(path, out, 0.9)
    assert stranger.read_bytes() == b"keep" and other.read_bytes() == b"keep"


def test_crash_between_the_two_renames_keeps_old_model_with_its_old_data(tmp_path, monkeypatch):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    _prune_to(path, out, 0.5)
    old_model = out.read_bytes()
    fail_rename_to(monkeypatch, out)
    with pytest.raises(OutputError):
        _prune_to(path, out, 0.9)
    monkeypatch.undo()
    assert out.read_bytes() == old_model
    # the old model still loads with its own data, and nothing new is left beside it
    pio.load_model(str(out))
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".data")]) == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]


@pytest.mark.parametrize("exc", [Interrupted(15), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["_write_synced", "_externalize", "replace"])
def test_interrupt_anywhere_in_staging_or_commit_leaves_nothing(tmp_path, monkeypatch, exc, where):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    if where == "replace":
        real = os.replace

        def hit(src, dst):
            if str(dst) == str(out):
                raise exc
            return real(src, dst)
        monkeypatch.setattr(os, "replace", hit)
    else:
        def hit(*a, **k):
            raise exc
        monkeypatch.setattr(pio.save, where, hit)
    with pytest.raises(type(exc)):
        _prune_to(path, out)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["mdl", "o.onnx"]


def test_stale_staging_of_dead_runs_is_removed_and_nothing_else(tmp_path, cnn):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    tag = pio.staging._host_tag()
    stale_dir = tmp_path / f".onnxprune-staging-{dead}-{tag}-abc123de"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".onnxprune-staging-{dead}-{tag}-0011aabb"
    stale_file.write_bytes(b"x")
    alive = tmp_path / f".onnxprune-staging-{os.getppid()}-{tag}-abc123de"
    alive.mkdir()
    other_host = tmp_path / f".onnxprune-staging-{dead}-00000000-abc123de"
    other_host.mkdir()
    unrelated = tmp_path / ".onnxprune-something"
    unrelated.mkdir()
    target = tmp_path / "keep"
    target.mkdir()
    link = tmp_path / f".onnxprune-staging-{dead}-{tag}-linklink"
    os.symlink(target, link)
    r = invoke(cnn, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0, r.output
    left = set(os.listdir(tmp_path))
    assert stale_dir.name not in left and stale_file.name not in left
    assert {alive.name, other_host.name, unrelated.name, link.name, "keep"} <= left and target.is_dir()


def test_staging_names_are_recognisable(tmp_path, cnn):
    loaded = pio.load_model(cnn)
    with pio.stage_model(loaded, str(tmp_path / "o.onnx")) as staged:
        name = os.path.basename(staged.tmp)
        assert pio.is_staging_name(name) and name.startswith(f".onnxprune-staging-{os.getpid()}-")
    assert not os.path.exists(staged.tmp)


# --- modes -----------------------------------------------------------------------------------------------------

def test_modes_new_files_follow_umask_replaced_files_keep_theirs(tmp_path):
    path = _external(tmp_path)
    old = os.umask(0o027)
    try:
        out = tmp_path / "o.onnx"
        written = _prune_to(path, out)
        for p in written:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p
        os.chmod(out, 0o604)
        written = _prune_to(path, out, 0.9)
        for p in written:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o604, p
        rep = tmp_path / "r.json"
        pio.atomic_write_bytes(str(rep), b"{}")
        assert stat.S_IMODE(os.stat(rep).st_mode) == 0o640
        os.chmod(rep, 0o664)
        pio.atomic_write_bytes(str(rep), b"{ }")
        assert stat.S_IMODE(os.stat(rep).st_mode) == 0o664 and rep.read_bytes() == b"{ }"
    finally:
        os.umask(old)


def test_atomic_write_bytes_leaves_nothing_on_failure_or_interrupt(tmp_path, monkeypatch):
    dest = tmp_path / "r.json"
    dest.write_bytes(b"old")
    real = os.replace
    for exc in (OSError(28, "No space left on device"), Interrupted(1), KeyboardInterrupt()):
        def boom(src, dst, exc=exc):
            raise exc
        monkeypatch.setattr(os, "replace", boom)
        with pytest.raises((OutputError, Interrupted, KeyboardInterrupt)):
            pio.atomic_write_bytes(str(dest), b"new")
        monkeypatch.setattr(os, "replace", real)
        assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(OutputError, match="does not exist"):
        pio.atomic_write_bytes(str(tmp_path / "nope" / "r.json"), b"x")


# --- quiet without -v -------------------------------------------------------------------------------------------

def test_no_validate_run_prints_no_native_log_or_numpy_warning(tmp_path):
    """A model whose removal folds constants (the ONNX Runtime probe runs) and whose fp16 bias overflows."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float16)
    w1[:, :4] = 0  # hidden units 0..3 constant (relu(0 + b)) -> folded into the next bias
    b1 = np.full(16, 60000, np.float16)
    w2 = rng.standard_normal((16, 4)).astype(np.float16) * 100
    b2 = np.full(4, 65000, np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 8], TensorProto.FLOAT16)], [vi("y", ["N", 4], TensorProto.FLOAT16)],
                   [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with warnings.catch_warnings(record=True) as caught:  # pytest would otherwise swallow them
        warnings.simplefilter("always")
        r = invoke(path, "-s", "0.3", "--no-validate", "-o", tmp_path / "o.onnx", "--json")
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))], \
        [str(w.message) for w in caught]
    assert json.loads(r.stdout)["connectivity"]["removal"]["left_in_place"] > 0  # the fp16 fold was refused
    assert "Warning" not in r.stderr and "[W:onnxruntime" not in r.stderr and "[E:onnxruntime" not in r.stderr


def test_special_paths_are_refused_without_touching_them():
    for p in ("/dev/null", "/dev/stdout", "/dev/shm/../null", "/proc/self/fd/1"):
        with pytest.raises(OutputError):
            pio.check_write_target(p)
        with pytest.raises(OutputError):
            pio.check_write_targets({"--report": p})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_external_data_model_validates_from_its_staged_copy(tmp_path):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    r = invoke(path, "-s", "0.5", "-o", out, "--batches", "1", "--batch-size", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["validation"] and doc["validation"].get("samples", 0) > 0
    names = [os.path.basename(p) for p in doc["written"]] if isinstance(doc["written"], dict) else []
    assert any(re.fullmatch(r"o\.onnx\.[0-9a-f]{16}\.data", n) for n in names), doc["written"]


@pytest.mark.parametrize("field", ["doc_string", "node name"])
def test_invalid_utf8_in_a_string_field_is_exit_3(tmp_path, field):
    m = two_layer_mlp()
    if field == "doc_string":
        m.doc_string = "MARKMARK"
    else:
        m.graph.node[0].name = "MARKMARK"
    data = m.SerializeToString().replace(b"MARKMARK", b"\xf5\xf5\xf5\xf5\xf5\xf5\xf5\xf5")
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    r = invoke(path, "-s", "0.5", "--no-validate", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 3 and "UTF-8" in r.stderr
    with pytest.raises(InputError, match="UTF-8"):
        onnxprune.prune(onnx.load_model_from_string(data), sparsity=0.5)


def test_interrupt_right_after_the_staging_dir_is_made_leaves_nothing(tmp_path, monkeypatch):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"

    def mkdir_then_interrupt(p):
        os.mkdir(p, 0o700)
        raise Interrupted(1)
    monkeypatch.setattr(pio.staging, "_make_staging_dir", mkdir_then_interrupt)
    with pytest.raises(Interrupted):
        _prune_to(path, out)
    assert sorted(os.listdir(tmp_path)) == ["mdl"]


def test_live_staging_registry_removes_what_an_interrupt_orphaned(tmp_path):
    p, fd = pio.staging._create_staging_file(str(tmp_path))
    os.close(fd)
    d = pio.staging.make_staging_dir(str(tmp_path))
    (tmp_path / os.path.basename(d) / "x").write_bytes(b"x")
    assert set(pio.remove_live_staging()) >= {p, d}
    assert os.listdir(tmp_path) == []


def test_interrupt_just_after_the_model_rename_keeps_a_complete_output(tmp_path, monkeypatch):
    path = _external(tmp_path)
    out = tmp_path / "o.onnx"
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        if str(dst) == str(out):
            raise Interrupted(15)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(Interrupted):
        _prune_to(path, out)
    monkeypatch.setattr(os, "replace", real)
    pio.load_model(str(out))  # the new model found its new data
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxprune")]
