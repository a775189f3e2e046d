"""Seeded mutation fuzzing of the sample models through the CLI (issue 8, item 10).

Each case takes a sample model, applies one or more structural (protobuf-level) or byte-level mutations chosen
by its seed, and runs the CLI in-process (``--no-validate`` for most, validation for every 8th case, a
subprocess for a few). For every case: the exit code is one of 0, 2, 3, 4, 5 (never 70), no traceback is
printed without -v, a non-zero exit writes nothing (no output, no data file, no staging left in the directory),
the input is unchanged, and an output written from an input that passes the ONNX checker (full check)
passes it too, by path.

ONNXPRUNE_FUZZ_CASES=N runs N cases instead of the default (for longer campaigns outside CI).
"""
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLE_MODELS, SAMPLES, invoke

N_CASES = int(os.environ.get("ONNXPRUNE_FUZZ_CASES", "480"))
MODELS = sorted(SAMPLE_MODELS)
OPS = ["Conv", "Gemm", "MatMul", "Relu", "Add", "Concat", "Flatten", "Reshape", "Identity", "Cast", "Transpose",
       "MaxPool", "ConvTranspose", "If", "Softmax", "NoSuchOp"]
_BYTES = {}


def _sample_bytes(name):
    if name not in _BYTES:
        with open(os.path.join(SAMPLES, SAMPLE_MODELS[name][0]), "rb") as fh:
            _BYTES[name] = fh.read()
    return _BYTES[name]


# --- structural mutations (each takes a ModelProto and a Random, mutates in place) -----------------------------

def _tensors(m):
    out = list(m.graph.initializer)
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                out.append(a.t)
    return out


def _rand_int(r):
    return r.choice([0, 1, -1, 2, 3, 7, 64, 2 ** 31 - 1, -2 ** 31, 2 ** 40, 2 ** 62, -2 ** 63, 2 ** 63 - 1])


def m_dims(m, r):
    t = r.choice(_tensors(m))
    if t.dims and r.random() < 0.7:
        t.dims[r.randrange(len(t.dims))] = _rand_int(r)
    elif r.random() < 0.5:
        t.dims.append(_rand_int(r))
    else:
        del t.dims[:]


def m_dtype(m, r):
    r.choice(_tensors(m)).data_type = r.choice([0, 1, 2, 6, 7, 8, 9, 10, 11, 16, 17, 21, 23, 28, 29, 99, 1000])


def m_raw(m, r):
    t = r.choice([t for t in _tensors(m) if t.HasField("raw_data")] or _tensors(m))
    raw = t.raw_data
    k = r.choice(["cut", "grow", "odd", "empty", "typed"])
    if k == "cut":
        t.raw_data = raw[: r.randrange(len(raw) + 1)]
    elif k == "grow":
        t.raw_data = raw + bytes(r.randrange(1, 9))
    elif k == "odd":
        t.raw_data = raw[:-1] if raw else b"\1"
    elif k == "empty":
        t.ClearField("raw_data")
    else:
        t.float_data.extend([1.0] * r.randrange(1, 4))


def m_node_op(m, r):
    n = r.choice(m.graph.node)
    n.op_type = r.choice(OPS)


def m_node_input(m, r):
    n = r.choice(m.graph.node)
    k = r.choice(["dangling", "drop", "self", "empty", "extra"])
    if k == "dangling" and n.input:
        n.input[r.randrange(len(n.input))] = "nowhere"
    elif k == "drop" and n.input:
        del n.input[r.randrange(len(n.input))]
    elif k == "self" and n.input and n.output:
        n.input[0] = n.output[0]
    elif k == "empty" and n.input:
        n.input[r.randrange(len(n.input))] = ""
    else:
        n.input.append(r.choice([o for x in m.graph.node for o in x.output] or ["x"]))


def m_node_order(m, r):
    nodes = list(m.graph.node)
    if len(nodes) > 1:
        i, j = r.sample(range(len(nodes)), 2)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del m.graph.node[:]
        m.graph.node.extend(nodes)


def m_node_delete_or_dup(m, r):
    i = r.randrange(len(m.graph.node))
    if r.random() < 0.5:
        del m.graph.node[i]
    else:
        m.graph.node.add().CopyFrom(m.graph.node[i])


def m_attr(m, r):
    n = r.choice(m.graph.node)
    name = r.choice(["group", "axis", "transB", "transA", "pads", "strides", "dilations", "kernel_shape", "perm",
                     "alpha", "beta", "auto_pad", "value", "to", "axes", "keepdims", "epsilon"])
    kind = r.choice(["int", "float", "ints", "str", "tensor", "graph"])
    value = {"int": _rand_int(r), "float": r.choice([0.0, -1.0, 1.5, float("nan"), float("inf")]),
             "ints": [r.choice([0, -1, 1, 2, 3]) for _ in range(r.randrange(0, 6))],
             "str": r.choice(["SAME_UPPER", "VALID", "NOTSET", "bogus", ""]),
             "tensor": numpy_helper.from_array(np.ones(r.randrange(1, 4), np.float32)),
             "graph": helper.make_graph([], "empty", [], [])}[kind]
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value) if kind != "ints" or value
                       else helper.make_attribute(name, [], attr_type=AttributeProto.INTS))


def m_io(m, r):
    vis = list(m.graph.input) + list(m.graph.output)
    vi = r.choice(vis)
    tt = vi.type.tensor_type
    k = r.choice(["dim", "elem", "rank", "noshape"])
    if k == "dim" and len(tt.shape.dim):
        d = tt.shape.dim[r.randrange(len(tt.shape.dim))]
        if r.random() < 0.5:
            d.dim_value = r.choice([0, 1, 3, 10 ** 6, 2 ** 40, 2 ** 62])
        else:
            d.dim_param = r.choice(["N", "", "x y"])
    elif k == "elem":
        tt.elem_type = r.choice([0, 2, 7, 10, 11, 16, 99])
    elif k == "rank":
        tt.shape.dim.add().dim_value = r.choice([1, 2])
    else:
        tt.ClearField("shape")


def m_header(m, r):
    k = r.choice(["ir", "opset", "noopset", "domain"])
    if k == "ir":
        m.ir_version = r.choice([0, 1, 3, 4, 11, 12, 13, 14, 99])
    elif k == "opset":
        m.opset_import[0].version = r.choice([0, 1, 6, 9, 13, 21, 25, 26, 1000])
    elif k == "noopset":
        del m.opset_import[:]
    else:
        r.choice(m.graph.node).domain = r.choice(["com.microsoft", "ai.onnx", "bogus"])


def m_sparse(m, r):
    st = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "sv"),
                                   numpy_helper.from_array(np.array([0, 1], np.int64), "si"), [4])
    if r.random() < 0.5:
        m.graph.sparse_initializer.append(st)
    else:
        m.graph.node.insert(0, helper.make_node("Constant", [], ["sc"], sparse_value=st))


def m_external(m, r):
    t = r.choice(_tensors(m))
    t.data_location = TensorProto.EXTERNAL
    if r.random() < 0.7:
        t.ClearField("raw_data")
    for key, value in (("location", r.choice(["../x.bin", "/etc/passwd", "m.onnx", "", "nope.bin"])),
                       ("offset", r.choice(["0", "-1", "abc", "99999999999"])), ("length", r.choice(["4", "-4"]))):
        e = t.external_data.add()
        e.key, e.value = key, value


def m_value_info(m, r):
    names = [o for n in m.graph.node for o in n.output]
    if names:
        m.graph.value_info.append(helper.make_tensor_value_info(r.choice(names), r.choice([1, 7, 10]),
                                                                [r.choice([1, 2, 5])] * r.randrange(0, 5)))


def m_subgraph(m, r):
    """Wrap the last node in an If whose branches hold it (weights captured from the outer scope)."""
    last = m.graph.node[-1]
    body = helper.make_graph([last], "b", [], [helper.make_tensor_value_info(last.output[0], 1, None)])
    cond = numpy_helper.from_array(np.array(r.random() < 0.5), "fuzz_cond")
    node = helper.make_node("If", ["fuzz_cond"], [last.output[0]], then_branch=body, else_branch=body)
    del m.graph.node[-1]
    m.graph.node.append(node)
    m.graph.initializer.append(cond)


def m_values(m, r):
    """Valid but awkward values: zeros, a constant layer, tiny, huge, denormal, negative zero, ties."""
    ts = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1]
    t = r.choice(ts)
    a = numpy_helper.to_array(t).copy()
    k = r.choice(["zero", "const", "tiny", "huge", "denormal", "negzero", "ties", "mostly_zero"])
    if k == "zero":
        a[...] = 0
    elif k == "const":
        a[...] = r.choice([1.0, -2.5])
    elif k == "tiny":
        a *= 1e-30
    elif k == "huge":
        a *= 1e30
    elif k == "denormal":
        a[...] = np.float32(1e-45)
    elif k == "negzero":
        a[...] = -0.0
    elif k == "ties":
        a = np.round(a * 2) / 2
    else:
        a.reshape(-1)[: a.size * 9 // 10] = 0
    t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))


def m_rename(m, r):
    """Rename one value everywhere (a legal change that must not matter)."""
    names = [o for n in m.graph.node for o in n.output if o]
    old = r.choice(names)
    new = r.choice(["a b", "ünï", "x" * 300, "0", "::", old + "_r"])
    for n in m.graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for vi in list(m.graph.output) + list(m.graph.value_info):
        if vi.name == old:
            vi.name = new


def m_passthrough(m, r):
    """Route a weight through Identity, Cast(to=FLOAT) or a double Transpose (legal, and followed by the tool)."""
    inits = {t.name for t in m.graph.initializer}
    uses = [(n, k) for n in m.graph.node for k, i in enumerate(n.input) if i in inits]
    n, k = r.choice(uses)
    src = n.input[k]
    kind = r.choice(["Identity", "Cast", "Transpose"])
    if kind == "Identity":
        new = [helper.make_node("Identity", [src], [src + "_id"])]
    elif kind == "Cast":
        new = [helper.make_node("Cast", [src], [src + "_id"], to=TensorProto.FLOAT)]
    else:
        new = [helper.make_node("Transpose", [src], [src + "_t"]), helper.make_node("Transpose", [src + "_t"],
                                                                                    [src + "_id"])]
    n.input[k] = src + "_id"
    for x in reversed(new):
        m.graph.node.insert(0, x)


def m_tie(m, r):
    """Make two consumers share one weight of the same shape (a tied weight)."""
    by_shape = {}
    for t in m.graph.initializer:
        by_shape.setdefault(tuple(t.dims), []).append(t.name)
    pairs = [v for v in by_shape.values() if len(v) > 1]
    a, b = r.sample(r.choice(pairs), 2)
    for n in m.graph.node:
        n.input[:] = [a if i == b else i for i in n.input]


STRUCTURAL = [m_values, m_values, m_rename, m_passthrough, m_passthrough, m_tie,  # valid: must prune
              m_dims, m_dtype, m_raw, m_node_op, m_node_input, m_node_order, m_node_delete_or_dup, m_attr, m_io,
              m_header, m_sparse, m_external, m_value_info, m_subgraph]


# --- byte-level mutations ----------------------------------------------------------------------------------------

def b_mutate(data: bytes, r) -> bytes:
    b = bytearray(data)
    k = r.choice(["flip", "truncate", "insert", "dup", "zero", "varint"])
    if k == "flip":
        for _ in range(r.randrange(1, 8)):
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    elif k == "truncate":
        b = b[: r.randrange(len(b))]
    elif k == "insert":
        i = r.randrange(len(b))
        b[i:i] = bytes(r.randrange(256) for _ in range(r.randrange(1, 16)))
    elif k == "dup":
        i = r.randrange(len(b))
        j = min(len(b), i + r.randrange(1, 200))
        b[j:j] = b[i:j]
    elif k == "zero":
        i, n = r.randrange(len(b)), r.randrange(1, 64)
        b[i:i + n] = bytes(len(b[i:i + n]))
    else:  # a huge varint where a length or a dim may be
        i = r.randrange(len(b))
        b[i:i + 1] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    return bytes(b)


def make_case(seed: int):
    r = random.Random(seed)
    name = MODELS[seed % len(MODELS)]
    data = _sample_bytes(name)
    if r.random() < 0.25:
        return name, b_mutate(data, r)
    m = onnx.load_model_from_string(data)
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        try:
            r.choice(STRUCTURAL)(m, r)
        except Exception:  # a mutation that does not apply to this model (or to what earlier ones left)
            pass
    return name, m.SerializeToString()


def _check_outcome(r_code, output, tmp_path, model_path, before, out):
    assert r_code in (0, 1, 2, 3, 4, 5), f"exit {r_code}:\n{output[-3000:]}"  # 1: a validated output collapsed
    assert "Traceback" not in output, output[-3000:]
    assert "a bug in onnxprune" not in output, output[-3000:]
    with open(model_path, "rb") as fh:
        assert fh.read() == before, "input changed"
    left = sorted(os.listdir(tmp_path))
    assert not [f for f in left if f.startswith(".onnxprune")], left
    if r_code != 0:
        assert left == ["m.onnx"], left
    else:
        assert os.path.exists(out)
        try:  # the promise: an input that passes the ONNX checker gives an output that passes it
            onnx.checker.check_model(str(model_path), full_check=True)
        except Exception:
            return
        onnx.checker.check_model(str(out), full_check=True)


METHODS = ["lamp", "global", "global-mt", "uniform", "uniform+", "erk", "igq", "random", "lap"]


def options(seed):
    r = random.Random(seed * 7 + 1)
    return ["-s", r.choice(["0", "0.5", "0.9", "0.999"]), "-m", r.choice(METHODS)]


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzzed_sample_never_crashes_and_writes_nothing_on_error(seed, tmp_path):
    name, data = make_case(seed)
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(data)
    out = tmp_path / "o.onnx"
    args = [model_path, "-o", out] + options(seed)
    if seed % 8 == 0:
        args += ["--batches", "1", "--batch-size", "4"]  # validation on synthetic inputs
    else:
        args += ["--no-validate"]
    if seed % 16 == 1:
        args += ["--target", "effective", "--effective-mode", "exact"]
    r = invoke(*args)
    _check_outcome(r.exit_code, r.output, tmp_path, model_path, data, out)


@pytest.mark.parametrize("seed", [3, 10, 29, 44])
def test_fuzzed_sample_in_a_subprocess(seed, tmp_path):
    """The real entry point: exit status and stderr as a CI job sees them."""
    name, data = make_case(seed)
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(data)
    out = tmp_path / "o.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "onnxprune.cli", str(model_path), "-o", str(out), "--no-validate",
                        *options(seed)], capture_output=True, text=True, env=env, timeout=120)
    _check_outcome(p.returncode, p.stdout + p.stderr, tmp_path, model_path, data, out)
    assert "[W:onnxruntime" not in p.stderr and "Warning" not in p.stderr, p.stderr


def test_mutations_do_mutate():
    """Guard against a fuzzer that silently tests the unmodified samples."""
    changed = sum(make_case(s)[1] != _sample_bytes(MODELS[s % len(MODELS)]) for s in range(40))
    assert changed >= 36


# --- round 3 (issue 17): --reconstruct with --calibration directories; compaction into ConvTranspose ----------

N_RECONSTRUCT = int(os.environ.get("ONNXPRUNE_FUZZ_RECONSTRUCT", "24"))


@pytest.mark.parametrize("seed", range(N_RECONSTRUCT))
def test_fuzzed_sample_with_reconstruct_from_a_calibration_directory(seed, tmp_path):
    """Mutated samples through calibrated reconstruction, the calibration data a directory of .npy (sometimes
    holding an extreme value): exit 0/2/3/4/5 only, nothing written on error, the data untouched."""
    name, data = make_case(seed + 10_000)
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(data)
    calib = tmp_path / "calib"
    calib.mkdir()
    x = np.load(os.path.join(SAMPLES, SAMPLE_MODELS[name][1]))["x"][:24].copy()
    r = random.Random(seed)
    if r.random() < 0.3:
        x.flat[r.randrange(x.size)] = r.choice([1e20, -3e38, 3e38, 1e-45])
    np.save(calib / "x.npy", x)
    before = (calib / "x.npy").read_bytes()
    out = tmp_path / "o.onnx"
    res = invoke(model_path, "-o", out, "-s", r.choice(["0.5", "0.9"]), "--calibration", calib, "--no-validate",
                 *(["--report", calib / "x.npy"] if seed % 6 == 0 else []))
    assert (calib / "x.npy").read_bytes() == before
    shutil.rmtree(calib)
    _check_outcome(res.exit_code, res.output, tmp_path, model_path, data, out)
    if seed % 6 == 0:
        assert res.exit_code != 0


def _conv_transpose_case(seed):
    """Conv -> (Sigmoid | Relu | Identity) -> ConvTranspose (random group, strides, pads, dilations,
    output_padding, 1-3 spatial dims, bias or not) [-> Relu -> 1x1 Conv]; some Conv channels near zero."""
    r = np.random.default_rng(seed)
    nd = int(r.choice([1, 2, 2, 3]))
    g = int(r.choice([1, 1, 2]))
    cout, k = int(r.choice([4, 8])), int(r.choice([1, 2, 3]))
    w1 = r.standard_normal((8, 4) + (3,) * nd).astype(np.float32)
    w1[:r.integers(0, 5)] *= 1e-4
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array((r.standard_normal(8) + 1).astype(np.float32), "b1"),
             numpy_helper.from_array(r.standard_normal((8, cout // g) + (k,) * nd).astype(np.float32), "wt")]
    attrs = {"group": g}
    if r.random() < 0.5:
        attrs["strides"] = [int(r.integers(1, 3))] * nd
    if r.random() < 0.3 and k > 1:
        attrs["pads"] = [int(r.integers(0, k))] * 2 * nd
    if r.random() < 0.3:
        attrs["dilations"] = [2] * nd
    if r.random() < 0.3 and attrs.get("strides", [1])[0] > 1:
        attrs["output_padding"] = [1] * nd
    tin = ["a", "wt"]
    if r.random() < 0.6:
        tin.append("bt")
        inits.append(numpy_helper.from_array(r.standard_normal(cout).astype(np.float32), "bt"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 2 * nd, name="c1"),
             helper.make_node(str(r.choice(["Relu", "Identity", "Sigmoid"])), ["h"], ["a"]),
             helper.make_node("ConvTranspose", tin, ["t"], name="ct", **attrs)]
    out = "t"
    if r.random() < 0.5:
        inits.append(numpy_helper.from_array(r.standard_normal((4, cout) + (1,) * nd).astype(np.float32), "w3"))
        nodes += [helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Conv", ["r", "w3"], ["y"], name="c3")]
        out = "y"
    g_ = helper.make_graph(nodes, "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4] + [6] * nd)],
                           [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g_, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m, [2, 4] + [6] * nd


N_CONV_TRANSPOSE = int(os.environ.get("ONNXPRUNE_FUZZ_CONVT", "30"))


@pytest.mark.parametrize("seed", range(N_CONV_TRANSPOSE))
def test_fuzzed_compaction_into_conv_transpose_keeps_the_outputs(seed, tmp_path):
    """Compaction (--compact, --granularity channel) in front of a ConvTranspose: never exit 70, and the compacted
    model computes what the uncompacted one does."""
    import onnxruntime as ort
    m, shape = _conv_transpose_case(seed)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for args in (["--compact", "-s", "0.9"], ["--granularity", "channel", "-s", "0.5"]):
        a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
        res = invoke(path, *args, "-o", a, "--no-validate", "-q")
        assert res.exit_code in (0, 4), res.output
        if res.exit_code:
            continue
        res = invoke(path, *[s for s in args if s != "--compact"], "--no-compact", "-o", b, "--no-validate", "-q")
        assert res.exit_code == 0, res.output
        ya, yb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                  for p in (a, b))
        np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4)
