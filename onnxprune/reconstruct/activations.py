"""Capture layer inputs with ONNX Runtime: a prefix model per request (nodes the tensors depend on, extra graph
outputs), streamed batch by batch over the calibration feeds."""
from __future__ import annotations

import onnx
from onnx import helper

from ..connectivity import node_reads
from ..errors import InputError, RequestError, first_line
from ..validate import quiet_native_stderr, session_options


def _replaced(tensor, values):
    from ..io import write_tensor
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    write_tensor(out, values)
    return out


def prefix_model(model: onnx.ModelProto, names: list, cut: dict | None = None, overrides: dict | None = None) -> tuple:
    """(serialised model computing ``names``, the inputs it must be fed).

    The walk back from ``names`` stops at graph inputs and at the tensors in ``cut`` (name -> an example array),
    which become inputs of the prefix: values already captured need not be recomputed. ``overrides``: constant
    tensor (initializer or Constant node output) name -> the values the prefix uses instead of the stored ones."""
    overrides = overrides or {}
    cut = cut or {}
    g = model.graph
    producer = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            producer[o] = i
    inits = {t.name for t in g.initializer}
    needed_nodes, stack, seen, cut_used = set(), list(names), set(), []
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in cut and name not in names and name in producer:
            cut_used.append(name)
            continue
        i = producer.get(name)
        if i is None or i in needed_nodes:
            continue
        needed_nodes.add(i)
        stack.extend(node_reads(g.node[i]))
    used = set(seen)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = g.name
    for i in sorted(needed_nodes):
        node = g.node[i]
        if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] in overrides:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for a in copy.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(_replaced(a.t, overrides[node.output[0]]))
            node = copy
        out.graph.node.append(node)
    out.graph.initializer.extend(_replaced(t, overrides[t.name]) if t.name in overrides else t
                                 for t in g.initializer if t.name in used)
    feeds = [i for i in g.input if i.name in used and i.name not in inits]
    out.graph.input.extend(feeds)
    cut_used.sort()
    for n in cut_used:
        arr = cut[n]
        out.graph.input.append(helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(arr.dtype), [f"d{k}" for k in range(arr.ndim)]))
    out.graph.input.extend(i for i in g.input if i.name in used and i.name in inits)
    out.graph.value_info.extend(v for v in g.value_info if v.name in used and v.name not in cut_used)
    for n in names:
        out.graph.output.append(onnx.ValueInfoProto(name=n))
    return out.SerializeToString(), [i.name for i in feeds] + cut_used


class Capture:
    """A prefix of ``model`` in ONNX Runtime: ``run(feed, j)`` gives {name: array} for calibration batch ``j``
    (graph inputs asked for are passed through; ``cut`` values stand in for the nodes that computed them)."""

    def __init__(self, model: onnx.ModelProto, names: list, feeds: list, threads: int = 0, cut=None,
                 overrides: dict | None = None):
        self.names = list(dict.fromkeys(names))
        graph_inputs = {i.name for i in model.graph.input}
        # a graph input no node produces (checks refuse a value produced twice)
        self.direct = [n for n in self.names if n in graph_inputs]
        self.computed = [n for n in self.names if n not in self.direct]
        self.session = None
        self.inputs = []
        self.cut = None
        if self.computed:
            import onnxruntime as ort
            self.cut = cut
            try:
                payload, self.inputs = prefix_model(model, self.computed,
                                                    cut.examples() if cut is not None else None, overrides)
            except ValueError as exc:  # protobuf refuses to serialise more than 2 GiB
                raise RequestError(f"reconstruction cannot hand this model's prefix to ONNX Runtime "
                                   f"({first_line(exc)}); models over 2 GiB are not reconstructed yet") from exc
            try:
                with quiet_native_stderr():
                    self.session = ort.InferenceSession(payload, session_options(threads=threads, spin=False),
                                                        providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise InputError(f"reconstruction: ONNX Runtime cannot run the model's prefix up to "
                                 f"{', '.join(self.computed[:3])}: {first_line(exc)}") from exc

    def run(self, feed: dict, j: int = -1) -> dict:
        cut = self.cut.batch(j) if self.cut is not None else {}
        missing = [n for n in self.direct + self.inputs if n not in feed and n not in cut]
        if missing:
            raise InputError(f"calibration data has no array for input(s) {', '.join(missing)}")
        out = {n: feed[n] for n in self.direct}
        if self.session is not None:
            try:
                res = self.session.run(self.computed, {k: cut[k] if k in cut else feed[k] for k in self.inputs})
            except Exception as exc:
                raise InputError(f"reconstruction: ONNX Runtime failed on a calibration batch: "
                                 f"{first_line(exc)}") from exc
            out.update(zip(self.computed, res))
        return out

    def close(self):
        self.session = None


class CutStore:
    """Captured activations of the partly reconstructed model that stay valid (they depend only on layers already
    final), kept per batch within a byte budget; later prefixes start from them instead of the graph inputs."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.values = {}  # name -> [array per batch]

    def add(self, name: str, arrays: list) -> None:
        size = sum(a.nbytes for a in arrays)
        if name in self.values or self.used + size > self.budget:
            return
        self.values[name] = arrays
        self.used += size

    def forget(self, keep) -> None:
        """Drop the entries ``keep(name)`` rejects (prefixes then just start further back)."""
        for name in [n for n in self.values if not keep(n)]:
            self.used -= sum(a.nbytes for a in self.values.pop(name))

    def examples(self) -> dict:
        return {n: v[0] for n, v in self.values.items()}

    def batch(self, j: int) -> dict:
        return {n: v[j] for n, v in self.values.items()}
