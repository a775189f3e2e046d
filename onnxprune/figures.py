"""The figures a user decides on: file size, gzip size, parameters and MACs of the prunable layers."""
from __future__ import annotations

import gzip
import os

import numpy as np
import onnx

from .shapes import _numel, infer_shapes
from .graph import find_layers
from .io import read_tensor

GZIP_LEVEL = 6


GZIP_MAX_BYTES = 16 << 20  # above this the gzip size is not computed (about 3 s per 100 MB on 2 cores)


def gzip_size(data: bytes) -> int | None:
    """Bytes of ``data`` gzip-compressed at level 6 with a zero timestamp (deterministic); None above 16 MiB,
    where compressing would cost more than the whole prune (gzip the file yourself: `gzip -6 -c F | wc -c`)."""
    if len(data) > GZIP_MAX_BYTES:
        return None
    return len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def figures(model_or_path, input_shapes: dict | None = None, files: list | None = None,
            nonzero: int | None = None) -> dict:
    """File size, gzip size (level 6) of the model file, parameters and MACs.

    ``model_or_path``: a path (the file and its external data files are measured) or an ``onnx.ModelProto``
    (then ``files`` names the model file it was written to and its data files, so nothing is serialized again;
    without ``files`` its serialization is measured). The gzip size covers the model file and its data files, each compressed on its
    own, and is None above 16 MiB. ``input_shapes``: {input name: [dims]} used for shape inference; inputs not
    named keep their declared shapes. MACs count multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul layers
    with a constant weight (dense: zeros count), per sample: the total at the given shapes divided by the batch,
    the first dim of the first graph input. A layer whose output shape is not known gets None, and the total
    then covers the layers that are known (``macs_complete`` False). ``nonzero``: the non-zero prunable weights
    when the caller already counted them (the report does), so the weights are not read again.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        if not files:
            size = model.ByteSize()
            file_bytes, gz = size, gzip_size(model.SerializeToString()) if size <= GZIP_MAX_BYTES else None
        else:
            file_bytes, gz = _file_figures(files)
    else:
        path = str(model_or_path)
        model = onnx.load(path, load_external_data=False)
        file_bytes, gz = _file_figures([path] + _external_files(model, os.path.dirname(os.path.abspath(path))))
        if any(_is_external(t) for t in model.graph.initializer):
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    layers, _ = find_layers(model)
    prunable = sum(l.size for l in layers)
    if nonzero is None:
        nonzero = sum(int(np.count_nonzero(read_tensor(l.tensor))) for l in layers)
    total = _total_params(model)
    macs, batch = _macs(model, layers, input_shapes or {})
    known = [v for v in macs.values() if v is not None]
    return {"file_bytes": file_bytes, "gzip_bytes": gz, "params_total": total,
            "params_prunable": prunable,
            "nonzero_prunable": nonzero, "macs": int(sum(known)) if known else None,
            "macs_complete": len(known) == len(macs), "macs_per_layer": macs, "batch": batch}


def ratios(dense: dict, pruned: dict) -> dict:
    """pruned / dense for every figure both hold as numbers."""
    out = {}
    for k in ("file_bytes", "gzip_bytes", "params_total", "params_prunable", "nonzero_prunable", "macs"):
        a, b = dense.get(k), pruned.get(k)
        out[k] = (b / a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
    return out


def _unique(files) -> list:
    """Each file once, however it is named (relative, absolute, through a symlink)."""
    return list(dict.fromkeys(os.path.realpath(f) for f in files))


def disk_bytes(files) -> int:
    """Bytes on disk of a model file and its external data files (each counted once)."""
    return sum(os.path.getsize(f) for f in _unique(files))


def _file_figures(files: list) -> tuple:
    """(bytes on disk of a model file and its external data files, their gzip size or None; each file once)."""
    files = _unique(files)
    file_bytes = disk_bytes(files)
    if file_bytes > GZIP_MAX_BYTES:
        return file_bytes, None
    gz = 0
    for f in files:
        with open(f, "rb") as fh:
            gz += gzip_size(fh.read())
    return file_bytes, gz


def _is_external(t) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_files(model, base) -> list:
    files = []
    for t in model.graph.initializer:
        if _is_external(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            p = os.path.join(base, loc) if loc else None
            if p and p not in files and os.path.isfile(p):
                files.append(p)
    return files


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _total_params(model) -> int:
    """Elements of every float initializer and Constant tensor, in the main graph and in every subgraph (If/Loop/
    Scan bodies: exports such as Silero VAD keep all their weights there), graph-input overrides too. Every
    prunable weight the report counts is one of these, so this is never below ``params_prunable``."""
    n, todo = 0, [model.graph]
    while todo:
        graph = todo.pop()
        n += sum(_numel(t.dims) for t in graph.initializer if t.data_type in _FLOATS)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    todo.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    todo.extend(a.graphs)
                elif node.op_type == "Constant" and a.name == "value" and a.t.data_type in _FLOATS:
                    n += _numel(a.t.dims)
    return n


def layer_macs(model, layers, input_shapes: dict | None = None, batch_one: bool = False) -> dict:
    """{layer name: multiply-accumulates per sample, or None where not known}, as ``figures`` counts them (dense:
    zeros count). ``input_shapes``: {input name: [dims]}; inputs not named keep their declared shapes, and with
    ``batch_one`` a symbolic first dim of such an input (rank 2 or more) is taken as a batch of 1, so that a model
    exported with a dynamic batch and otherwise static shapes needs no shape from the user. Every weight of a
    Conv/ConvTranspose/Gemm/MatMul layer is used the same number of times per sample, so a layer's MACs divided
    by its weight count is what each of its weights costs (what channel planning uses)."""
    return _macs(model, layers, input_shapes or {}, batch_one)[0]


def _macs(model, layers, input_shapes, batch_one: bool = False) -> tuple:
    graph = model.graph
    saved = [onnx.ValueInfoProto() for _ in graph.input]
    for s, vi in zip(saved, graph.input):
        s.CopyFrom(vi)
    try:
        inits = {t.name for t in graph.initializer}
        for vi in graph.input:
            tt = vi.type.tensor_type
            if vi.name in input_shapes:
                tt.ClearField("shape")
                tt.shape.SetInParent()  # a scalar (no dims) has a shape of rank 0, not an unknown one
                for d in input_shapes[vi.name]:
                    tt.shape.dim.add().dim_value = int(d)
            elif batch_one and vi.name not in inits and tt.HasField("shape") and len(tt.shape.dim) >= 2 \
                    and not tt.shape.dim[0].HasField("dim_value"):
                tt.shape.dim[0].dim_value = 1
        shapes = infer_shapes(model)
    finally:
        del graph.input[:]
        graph.input.extend(saved)
    inits = {t.name for t in graph.initializer}
    first = next((vi.name for vi in graph.input if vi.name not in inits), None)
    batch = None
    if first is not None:
        d = shapes.dims.get(first)
        batch = d[0] if d and isinstance(d[0], int) and d[0] > 0 else None
    nodes = list(graph.node)
    out = {}
    for layer in layers:
        total = 0
        for c in layer.consumers:
            if c.graph != "":
                total = None
                break
            node = nodes[c.index]
            m = _layer_macs(node, layer, c, shapes)
            if m is None:
                total = None
                break
            total += m
        if total is not None:
            total = total // batch if batch else None
        out[layer.name] = total
    return out, batch


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)


def _layer_macs(node, layer, consumer, shapes):
    w = [int(d) for d in layer.tensor.dims]
    op = node.op_type
    if op == "Conv":
        o = shapes.dims.get(node.output[0])
        return _numel(o) * _numel(w[1:]) if _known(o) else None
    if op == "ConvTranspose":
        i = shapes.dims.get(node.input[0])
        return _numel(i) * _numel(w) // w[0] if _known(i) and w[0] else None
    o = shapes.dims.get(node.output[0])
    if not _known(o) or consumer.layout.in_axis is None:
        return None
    k = w[consumer.layout.in_axis]
    return _numel(o) * k
