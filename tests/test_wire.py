"""Pruned weights held outside the protobuf (LoadedModel.pending) and spliced into the file (wire.chunks): the bytes
must be exactly what serialising the model with the data in place gives."""
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, init, make_model, sample, vi
from onnxprune import checks, io as pio, wire
from onnxprune.errors import OutputError
from onnxprune.pipeline import PruneConfig, prune_loaded


def _model_with_everything():
    """Big and small float initializers in several dtypes, fields after raw_data (doc_string, metadata_props),
    an integer initializer, model fields after the graph (opset, metadata, functions)."""
    rng = np.random.default_rng(0)
    a = init("a", rng.standard_normal((32, 16)).astype(np.float32))
    a.doc_string = "a doc string: field 12, after raw_data"
    entry = a.metadata_props.add()
    entry.key, entry.value = "k", "v"
    small = init("small", rng.standard_normal((4,)).astype(np.float32))
    shape = init("shape", np.array([1, -1], dtype=np.int64))
    h = init("h", rng.standard_normal((16, 40)).astype(np.float16))
    bf = numpy_helper.from_array(rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16), "bf")
    d = init("d", rng.standard_normal((24, 24)))
    nodes = [helper.make_node("MatMul", ["x", "a"], ["y1"]), helper.make_node("Add", ["y1", "small_b"], ["y2"]),
             helper.make_node("Cast", ["y2"], ["y3"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["y3", "h"], ["y4"]),
             helper.make_node("Cast", ["y4"], ["y5"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["y5", "bf"], ["y6"]),
             helper.make_node("Cast", ["y6"], ["y7"], to=TensorProto.DOUBLE),
             helper.make_node("MatMul", ["y7", "d"], ["y8"]), helper.make_node("Reshape", ["y8", "shape"], ["y"])]
    small_b = init("small_b", rng.standard_normal((16,)).astype(np.float32))
    m = make_model(nodes, [vi("x", [1, 32])], [vi("y", None, TensorProto.DOUBLE)],
                   [a, small, shape, h, bf, small_b, d], producer_name="test", doc_string="model doc")
    meta = m.metadata_props.add()
    meta.key, meta.value = "author", "tests"
    return m


def _spliced(model, pending) -> bytes:
    return b"".join(bytes(c) for c in wire.chunks(model, pending))


@pytest.mark.parametrize("subset", [(), ("a",), ("h", "bf"), ("a", "h", "bf", "d")])
def test_splice_equals_serialising_with_the_data_in_place(subset):
    rng = np.random.default_rng(1)
    held, direct = _model_with_everything(), _model_with_everything()
    pending = {}
    for t, u in zip(held.graph.initializer, direct.graph.initializer):
        if t.name in subset:
            old = numpy_helper.to_array(t)
            new = (old * (rng.random(old.shape) < 0.3)).astype(old.dtype)
            assert pio.hold(pending, t, new)
            pio.write_tensor(u, new)
    assert set(pending) == set(subset)
    assert _spliced(held, pending) == direct.SerializeToString(deterministic=True)


def test_only_large_float_raw_data_tensors_are_held():
    m = _model_with_everything()
    inits = {t.name: t for t in m.graph.initializer}
    pending = {}
    assert not pio.hold(pending, inits["small"], np.zeros(4, np.float32))  # below the checker skeleton's size
    assert not pio.hold(pending, inits["shape"], np.zeros(2, np.int64))
    t = onnx.helper.make_tensor("f", TensorProto.FLOAT, [32, 32], np.ones(1024, np.float32))  # float_data
    assert not pio.hold(pending, t, np.zeros(1024, np.float32))
    with pytest.raises(ValueError):
        pio.hold(pending, inits["a"], np.zeros(10, np.float32))
    assert pending == {} and len(inits["a"].raw_data) == 32 * 16 * 4


def test_a_held_tensor_cannot_be_read_by_mistake():
    m = _model_with_everything()
    t = m.graph.initializer[0]
    assert pio.hold({}, t, np.zeros((32, 16), np.float32))
    with pytest.raises(ValueError):
        pio.read_tensor(t)


def test_the_output_check_refuses_a_pending_array_that_does_not_fit():
    m = _model_with_everything()
    t = m.graph.initializer[0]
    pending = {}
    assert pio.hold(pending, t, np.zeros((32, 16), np.float32))
    checks.check_model(m, "pruned model", OutputError, pending=pending)
    pending["a"] = np.zeros((32, 15), np.float32)
    with pytest.raises(OutputError, match="does not fit"):
        checks.check_model(m, "pruned model", OutputError, pending=pending)
    pending["a"] = np.zeros((32, 16), np.float64)
    with pytest.raises(OutputError, match="does not fit"):
        checks.check_model(m, "pruned model", OutputError, pending=pending)
    del pending["a"]  # the placeholder without its array: no data for the dims
    with pytest.raises(OutputError, match="raw_data holds 0 bytes"):
        checks.check_model(m, "pruned model", OutputError, pending=pending)


def test_splice_refuses_mismatches():
    m = _model_with_everything()
    pending = {}
    assert pio.hold(pending, m.graph.initializer[0], np.zeros((32, 16), np.float32))
    with pytest.raises(ValueError):
        wire.chunks(m, {**pending, "nope": np.zeros(3, np.float32)})
    pio.write_tensor(m.graph.initializer[0], np.ones((32, 16), np.float32))  # written behind its back
    with pytest.raises(ValueError, match="placeholder"):
        wire.chunks(m, pending)


CASES = [
    ("mlp_gemm", dict(sparsity=0.9)),
    ("mlp_matmul", dict(sparsity=0.99, method="global")),
    ("cnn", dict(sparsity=0.9)),
    ("cnn", dict(sparsity=0.99, method="global")),
    ("cnn", dict(sparsity=0.9, compact=True)),
    ("cnn", dict(sparsity=0.5, granularity="channel", align=8)),
    ("cnn", dict(sparsity=0.95, effective_mode="exact")),
    ("cnn_torch", dict(sparsity=0.95, compact=True)),
    ("detector", dict(sparsity=0.9, compact=True)),
    ("encoder", dict(sparsity=0.9)),
    ("vad", dict(sparsity=0.95, compact=True)),
    ("segmenter", dict(sparsity=0.99, method="global", compact=True)),  # compaction leaves only small weights
]
NOTHING_HELD = {"segmenter"}


def _path(name):
    try:
        return sample(name)[0]
    except KeyError:
        return os.path.join(SAMPLES, f"{name}.onnx")


def _report(r):
    d = r.to_dict()
    d.pop("timings_s", None)
    return d


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_saved_file_equals_the_materialised_model(tmp_path, name, options):
    """The CLI path (weights held, spliced into the file) and the API path (weights written into the protobuf)
    give byte-identical models and the same report, through removal, constant folding and compaction."""
    path = _path(name)
    direct = pio.load_model(path)
    r1 = prune_loaded(direct, PruneConfig(**options))
    assert direct.pending == {}
    held = pio.load_model(path)
    r2 = prune_loaded(held, PruneConfig(**options), defer_writes=True)
    assert bool(held.pending) == (name not in NOTHING_HELD), "the test would not exercise the splice"
    assert _report(r1) == _report(r2)
    out = tmp_path / "out.onnx"
    pio.save_model(held, str(out))
    assert out.read_bytes() == direct.model.SerializeToString(deterministic=True)
    held.materialize()
    assert held.pending == {}
    assert held.model.SerializeToString(deterministic=True) == out.read_bytes()


def test_constant_folding_probe_path_is_covered():
    """At least one case above folds constant inputs (its probe materialises the held weights first)."""
    folded = 0
    for name, options in CASES:
        if options.get("granularity") == "channel":
            continue
        held = pio.load_model(_path(name))
        r = prune_loaded(held, PruneConfig(**options), defer_writes=True)
        folded += (r.connectivity.get("removal") or {}).get("folded_constant_inputs", 0)
    assert folded > 0


def test_splice_failure_falls_back_to_writing_into_the_protobuf(tmp_path, monkeypatch):
    path = _path("cnn")
    direct = pio.load_model(path)
    prune_loaded(direct, PruneConfig(sparsity=0.9))
    held = pio.load_model(path)
    prune_loaded(held, PruneConfig(sparsity=0.9), defer_writes=True)

    def refuse(model, pending):
        raise ValueError("cannot splice")
    monkeypatch.setattr(wire, "chunks", refuse)
    out = tmp_path / "out.onnx"
    pio.save_model(held, str(out))
    assert held.pending == {}
    assert out.read_bytes() == direct.model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("options", [dict(sparsity=0.9), dict(sparsity=0.9, compact=True),
                                     dict(sparsity=0.5, granularity="channel", align=8)])
def test_external_data_models_write_held_weights_into_the_data_file(tmp_path, options):
    """Held weights that were external go into the output's data file; the result equals the path that writes
    them into the protobuf first, byte for byte (model and data file)."""
    src = onnx.load(_path("cnn"))
    ext = tmp_path / "in.onnx"
    onnx.save_model(src, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="in.data",
                    size_threshold=0)
    outs = []
    for k, defer in enumerate((False, True)):
        loaded = pio.load_model(str(ext))
        prune_loaded(loaded, PruneConfig(**options), defer_writes=defer)
        assert bool(loaded.pending) == defer
        d = tmp_path / f"out{k}"
        d.mkdir()
        written = pio.save_model(loaded, str(d / "m.onnx"))
        outs.append(sorted((os.path.basename(p), open(p, "rb").read()) for p in written))
        if defer:  # after saving, the held tensors are placeholders again and still held
            assert loaded.pending and all(len(t.raw_data) == 0 for t in loaded.model.graph.initializer
                                          if t.name in loaded.pending)
            loaded.materialize()
            assert not loaded.pending
    assert outs[0] == outs[1]
    raw = onnx.load(str(tmp_path / "out1" / "m.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)


@pytest.mark.parametrize("name", ["cnn", "cnn_torch", "mlp_gemm", "detector", "encoder", "vad"])
def test_initializer_views_are_the_parsed_raw_data(name):
    payload = open(_path(name), "rb").read()
    views = wire.initializer_data(payload)
    model = onnx.load_model_from_string(payload)
    raw = {t.name: t.raw_data for t in model.graph.initializer if t.HasField("raw_data")}
    assert views and {k: bytes(v) for k, v in views.items()} == raw


def _with_field(payload: bytes, number: int, value: bytes) -> bytes:
    return payload + wire.varint(number << 3 | 2) + wire.varint(len(value)) + value


def test_initializer_views_give_up_on_unusual_layouts():
    m = _model_with_everything()
    payload = m.SerializeToString()
    assert set(wire.initializer_data(payload)) == {"a", "small", "shape", "h", "bf", "small_b", "d"}
    # a second graph field (protobuf merges the two): not the plain layout
    extra = onnx.GraphProto(initializer=[init("z", np.zeros(300, np.float32))]).SerializeToString()
    assert wire.initializer_data(_with_field(payload, 7, extra)) == {}
    # an initializer with its raw_data field twice (the last one wins in protobuf)
    t = init("dup", np.zeros(300, np.float32)).SerializeToString()
    t = _with_field(t, 9, np.ones(300, np.float32).tobytes())
    g = _with_field(m.graph.SerializeToString(), 5, t)
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    m2.ClearField("graph")
    assert wire.initializer_data(_with_field(m2.SerializeToString(), 7, g)) == {}
    # a nameless initializer, a truncated file
    g = _with_field(m.graph.SerializeToString(), 5, onnx.TensorProto(dims=[1]).SerializeToString())
    assert wire.initializer_data(_with_field(m2.SerializeToString(), 7, g)) == {}
    assert wire.initializer_data(payload[:-3]) == {}


def test_load_with_odd_layout_still_reads_every_weight(tmp_path):
    """A file wire.initializer_data gives up on loads through the protobuf and prunes the same."""
    m = onnx.load(_path("cnn"))
    good = tmp_path / "good.onnx"
    onnx.save(m, str(good))
    payload = good.read_bytes()
    # the same model with its graph split over two fields (protobuf merges them): nodes first, the rest after
    g1 = onnx.GraphProto()
    g1.node.extend(m.graph.node)
    g2 = onnx.GraphProto()
    g2.CopyFrom(m.graph)
    g2.ClearField("node")
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    m2.ClearField("graph")
    odd = tmp_path / "odd.onnx"
    odd.write_bytes(_with_field(_with_field(m2.SerializeToString(), 7, g1.SerializeToString()), 7,
                                g2.SerializeToString()))
    assert wire.initializer_data(odd.read_bytes()) == {} and wire.initializer_data(payload)
    a, b = pio.load_model(str(good)), pio.load_model(str(odd))
    assert b.raw  # the checks read them from the protobuf instead
    prune_loaded(a, PruneConfig(sparsity=0.9))
    prune_loaded(b, PruneConfig(sparsity=0.9))
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)


def _collide_model():
    """x @ W1 -> Relu -> @ Constant whose value tensor is also named 'W1' (names of Constant tensors are free)."""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W1")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Constant", [], ["C"], name="const", value=c),
             helper.make_node("MatMul", ["r", "C"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", ["N", 64])], [vi("y", ["N", 32])],
                      [init("W1", rng.standard_normal((64, 64)).astype(np.float32))])


@pytest.mark.parametrize("options", [dict(sparsity=0.5, granularity="channel"), dict(sparsity=0.9, compact=True)])
def test_a_constant_tensor_named_like_a_held_initializer_is_not_confused_with_it(tmp_path, options):
    """Held weights are keyed by initializer name; compaction rewriting a Constant's tensor of the same name
    must not take (or replace) the initializer's held array."""
    path = tmp_path / "m.onnx"
    onnx.save(_collide_model(), str(path))
    direct = pio.load_model(str(path))
    prune_loaded(direct, PruneConfig(**options))
    onnx.checker.check_model(direct.model, full_check=True)
    held = pio.load_model(str(path))
    prune_loaded(held, PruneConfig(**options), defer_writes=True)
    out = tmp_path / "o.onnx"
    pio.save_model(held, str(out))
    assert out.read_bytes() == direct.model.SerializeToString(deterministic=True)


def test_a_bias_a_subgraph_also_reads_is_not_folded_into(tmp_path):
    """A Gemm bias that an If branch reads too (here as a prunable MatMul weight) is not the Gemm's alone: removal
    leaves it (it used to decode it while held, and before that wrote the folded bias over the branch's weight)."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Constant", [], ["one"], value=init("one_v", np.ones((1, 1), np.float32))),
                                helper.make_node("MatMul", ["one", "B"], ["t_out"])], "then", [],
                               [vi("t_out", [1, 600])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e_out"],
                                                 value=init("zero_v", np.zeros((1, 600), np.float32)))],
                               "else", [], [vi("e_out", [1, 600])])
    nodes = [helper.make_node("Gemm", ["x", "W0"], ["h0"], name="g0"), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("Gemm", ["h1", "W1", "B"], ["y1"], name="g1"),
             helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("x", [4, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y1", [4, 600]), vi("y2", [1, 600])],
                   [init("W0", rng.standard_normal((8, 64)).astype(np.float32)),
                    init("W1", rng.standard_normal((64, 600)).astype(np.float32)),
                    init("B", rng.standard_normal((1, 600)).astype(np.float32))])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    direct = pio.load_model(str(path))
    r = prune_loaded(direct, PruneConfig(sparsity=0.5, method="uniform"))
    assert "B" not in r.connectivity.get("removal", {}).get("biases_changed", [])
    held = pio.load_model(str(path))
    prune_loaded(held, PruneConfig(sparsity=0.5, method="uniform"), defer_writes=True)
    out = tmp_path / "o.onnx"
    pio.save_model(held, str(out))
    assert out.read_bytes() == direct.model.SerializeToString(deterministic=True)
    b = {t.name: numpy_helper.to_array(t) for t in direct.model.graph.initializer}["B"]
    assert np.count_nonzero(b) == 300  # pruned as the branch's weight (uniform 50 %), nothing folded into it


def test_a_failure_half_way_through_the_data_file_leaves_the_model_whole(tmp_path, monkeypatch):
    """Saving fails after some external tensors were moved into the data file: every one gets its data back."""
    src = onnx.load(_path("cnn"))
    ext = tmp_path / "in.onnx"
    onnx.save_model(src, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="in.data",
                    size_threshold=0)
    loaded = pio.load_model(str(ext))
    prune_loaded(loaded, PruneConfig(sparsity=0.9), defer_writes=True)
    before = {t.name: bytes(t.raw_data) for t in loaded.model.graph.initializer}
    held = dict(loaded.pending)
    calls = []
    real = wire.payload

    def payload_then_full(arr):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(arr)
    monkeypatch.setattr(wire, "payload", payload_then_full)
    with pytest.raises(OutputError, match="No space left"):
        pio.save_model(loaded, str(tmp_path / "o.onnx"))
    assert len(calls) == 2 and loaded.pending.keys() == held.keys()
    assert {t.name: bytes(t.raw_data) for t in loaded.model.graph.initializer} == before
    assert all(t.data_location == TensorProto.DEFAULT and not len(t.external_data) for t in loaded.model.graph.initializer)
    monkeypatch.setattr(wire, "payload", real)
    pio.save_model(loaded, str(tmp_path / "o.onnx"))  # and it still saves


def test_splice_refuses_a_model_protobuf_could_not_read_back():
    m = _model_with_everything()
    pending = {}
    assert pio.hold(pending, m.graph.initializer[0], np.zeros((32, 16), np.float32))
    total = sum(len(c) for c in wire.chunks(m, pending))
    assert sum(len(c) for c in wire.chunks(m, pending, limit=total)) == total
    with pytest.raises(ValueError, match="more than protobuf can read"):
        wire.chunks(m, pending, limit=total - 1)
