"""The ONNX checker and strict shape inference, run on a skeleton of the model without its large weights."""
from __future__ import annotations

import logging

import onnx
from onnx import AttributeProto, TensorProto

from ..errors import InputError, first_line
from .tensors import _FLOATS, DEFAULT_DOMAINS, MAXIMUM_PROTOBUF, SKELETON_MIN_BYTES, _repeated

log = logging.getLogger("onnxprune")


def _copy_fields(dst, src, skip=()):
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        target = getattr(dst, fd.name)
        if fd.type == fd.TYPE_MESSAGE:
            if _repeated(fd):
                target.extend(value)
            else:
                target.CopyFrom(value)
        elif _repeated(fd):
            target.extend(value)
        else:
            setattr(dst, fd.name, value)


def big_float(t: TensorProto) -> bool:
    if t.data_type not in _FLOATS:
        return False
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    return n * 2 >= SKELETON_MIN_BYTES


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without the payload of its large float tensors in the main graph: each becomes a
    graph input of the same name, type and shape (so names, types and shapes are what the checker sees)."""
    sk = onnx.ModelProto()
    _copy_fields(sk, model, skip=("graph",))
    src, g = model.graph, sk.graph
    _copy_fields(g, src, skip=("initializer", "node", "input"))
    g.input.extend(src.input)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if big_float(t):
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                declared.add(t.name)
        else:
            g.initializer.add().CopyFrom(t)
    for node in src.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1 \
                and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.attribute[0].type == AttributeProto.TENSOR and big_float(node.attribute[0].t) \
                and node.output[0] and node.output[0] not in declared:
            t = node.attribute[0].t
            g.input.append(onnx.helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims)))
            declared.add(node.output[0])
            continue
        g.node.add().CopyFrom(node)
    return sk


def run_onnx_checker(model: onnx.ModelProto, where: str = "model", error=InputError) -> dict:
    """What ``onnx.checker.check_model(full_check=True)`` runs (the checker, then strict type-checking shape
    inference), on the skeleton. Returns name -> inferred shape (ints or None per axis) of the main graph's values.

    One tolerance: a graph output declared without a shape (ONNX Runtime accepts it, the checker does not) is
    left out of the checker's copy; shape inference still sees it."""
    sk = skeleton(model)
    if sk.ByteSize() > MAXIMUM_PROTOBUF:
        log.warning("%s: ONNX checker skipped: the model's structure alone is over 2 GiB", where)
        return {}
    full = sk.SerializeToString()
    shapeless = [vi for vi in sk.graph.output if vi.type.HasField("tensor_type")
                 and not vi.type.tensor_type.HasField("shape")]
    if shapeless:
        kept = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in sk.graph.output
                if not (vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"))]
        del sk.graph.output[:]
        sk.graph.output.extend(kept)
    try:
        onnx.checker.check_model(sk.SerializeToString() if shapeless else full)
    except Exception as exc:
        raise error(f"{where}: fails the ONNX checker: {_one_line(exc)}") from exc
    try:
        inferred = onnx.shape_inference.infer_shapes(full, check_type=True, strict_mode=True)
    except Exception as exc:
        raise error(f"{where}: fails the ONNX checker (strict shape inference): {_one_line(exc)}") from exc
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def _one_line(exc) -> str:
    return first_line(exc, join=True, limit=500)  # the checker spreads one error over several lines
