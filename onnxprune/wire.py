"""Serialise a model whose large weights are held as NumPy arrays, not in the protobuf (``LoadedModel.pending``).

Copying a pruned weight into the protobuf costs two copies (``tobytes`` and protobuf's own), and serialising
copies it once more. Instead the model is serialised with those tensors' ``raw_data`` empty and the arrays are
spliced into the wire format: the result is exactly the bytes ``SerializeToString(deterministic=True)`` gives
with the data in place (protobuf writes fields in field-number order, which the splice keeps), written straight
from the arrays' memory.
"""
from __future__ import annotations

import sys

import numpy as np

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_NAME = 8  # TensorProto.name
_LEN = 2  # wire type of length-delimited fields


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf, pos: int, end: int):
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, field end) of each field in ``buf[start:end]``.
    Groups (wire types 3 and 4, unused by ONNX) raise ValueError."""
    pos = start
    while pos < end:
        tag, vpos = _read_varint(buf, pos, end)
        number, wt = tag >> 3, tag & 7
        if wt == 0:
            _, nxt = _read_varint(buf, vpos, end)
        elif wt == 1:
            nxt = vpos + 8
        elif wt == _LEN:
            n, vpos = _read_varint(buf, vpos, end)
            nxt = vpos + n
        elif wt == 5:
            nxt = vpos + 4
        else:
            raise ValueError(f"wire type {wt} not supported")
        if nxt > end:
            raise ValueError("field runs past its message")
        yield number, wt, pos, vpos, nxt
        pos = nxt


def _tag(number: int) -> bytes:
    return varint(number << 3 | _LEN)


def payload(arr: np.ndarray) -> memoryview:
    """The array's bytes, little-endian (ONNX's order), without a copy when it is already C-contiguous
    little-endian."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


def _graph(view) -> tuple:
    """(field start, value start, end) of a serialised model's one graph field; ValueError when it has not
    exactly one, length-delimited (protobuf would merge several)."""
    graphs = [f for f in fields(view, 0, len(view)) if f[0] == _GRAPH]
    if len(graphs) != 1 or graphs[0][1] != _LEN:
        raise ValueError("no single graph field")
    return graphs[0][2:]


MAX_BYTES = 2**31 - 1  # protobuf (and so onnx and ONNX Runtime) cannot parse a larger message


def chunks(model, pending: dict, limit: int = MAX_BYTES) -> list:
    """The serialised model as a list of byte chunks (bytes and memoryviews of the arrays): the main graph's
    initializers named in ``pending`` (whose ``raw_data`` must be empty) take those arrays as their data.
    ValueError when the model cannot be spliced (the caller then writes the data into the protobuf, whose own
    serialiser refuses a model over ``limit`` bytes, as this does: nothing could read it back)."""
    view = memoryview(model.SerializeToString(deterministic=True))
    g_start, g_value, g_end = _graph(view)
    names = [t.name for t in model.graph.initializer]
    pieces, used, k, copied = [], set(), 0, g_value
    for number, wt, start, value, end in fields(view, g_value, g_end):
        if number != _INITIALIZER:
            continue
        name = names[k] if k < len(names) else None
        k += 1
        arr = pending.get(name)
        if arr is None:
            continue
        raw = [f for f in fields(view, value, end) if f[0] == _RAW_DATA]
        if wt != _LEN or len(raw) != 1 or raw[0][3] != raw[0][4]:
            raise ValueError(f"initializer '{name}': its raw_data is not the empty placeholder")
        if name in used:
            raise ValueError(f"initializer '{name}' appears twice")
        used.add(name)
        data = payload(arr)
        _, _, r_start, _, r_end = raw[0]
        head = _tag(_RAW_DATA) + varint(data.nbytes)
        tensor_len = (end - value) - (r_end - r_start) + len(head) + data.nbytes
        pieces += [view[copied:start], _tag(_INITIALIZER) + varint(tensor_len), view[value:r_start], head, data]
        copied = r_end
    if k != len(names) or used != set(pending):
        raise ValueError("initializers and pending arrays do not match")
    pieces.append(view[copied:g_end])
    out = [view[:g_start], _tag(_GRAPH) + varint(sum(len(p) for p in pieces)), *pieces, view[g_end:]]
    if sum(len(p) for p in out) > limit:
        raise ValueError(f"the model would be over {limit} bytes, more than protobuf can read")
    return out


def initializer_data(payload: bytes) -> dict:
    """Main-graph initializer name -> a zero-copy view of its raw_data in a serialised model, for the plain
    layout (one graph field, each initializer with one name and at most one raw_data field, names unique); {}
    for anything else (the caller then reads the parsed protobuf)."""
    view = memoryview(payload)
    try:
        _, g_value, g_end = _graph(view)
        out = {}
        for number, wt, _, value, end in fields(view, g_value, g_end):
            if number != _INITIALIZER:
                continue
            if wt != _LEN:
                return {}
            names, raws = [], []
            for n2, wt2, _, v2, e2 in fields(view, value, end):
                if n2 == _NAME and wt2 == _LEN:
                    names.append(bytes(view[v2:e2]))
                elif n2 == _RAW_DATA:
                    raws.append((wt2, v2, e2))
            if len(names) != 1 or len(raws) > 1 or (raws and raws[0][0] != _LEN):
                return {}
            name = names[0].decode("utf-8")
            if name in out:
                return {}
            if raws:
                out[name] = view[raws[0][1]:raws[0][2]]
        return out
    except (ValueError, UnicodeDecodeError):
        return {}
