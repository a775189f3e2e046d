"""Layer -> least-squares problem: which activation feeds it, how weight entries map to [group, out, in] rows,
how activations become sample rows (im2col, flattening, transposes), and where a bias can be written."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import other_readers as _other_readers, reader_map
from ..layout import node_attr
from .im2col import conv_out, conv_pads, im2col, sample_dtype


class Unsupported(Exception):
    """This layer cannot be reconstructed; plain selection is used (the message says why)."""


@dataclass
class BiasSink:
    """A per-output-row bias the refit may change: Conv B, Gemm C, a following Add's constant, or a following
    BatchNormalization's running mean (which absorbs -b)."""
    kind: str  # "tensor" | "bn"
    tensor: str  # name of the constant tensor written
    dense: np.ndarray  # the bias as the layer's output sees it, float64 [out]
    scale: float = 1.0  # output bias = scale * stored (Gemm beta)
    shape: tuple = ()
    dtype: np.dtype = np.dtype(np.float32)
    original: np.ndarray | None = None  # stored values (BN running mean)

    def output(self, stored: np.ndarray) -> np.ndarray:
        """The output bias [out] (float64) that stored values give (the inverse of ``stored``)."""
        if self.kind == "bn":
            return self.original.astype(np.float64).reshape(-1) - np.asarray(stored, np.float64).reshape(-1)
        return np.asarray(stored, np.float64).reshape(-1) * self.scale

    def stored(self, bias: np.ndarray) -> np.ndarray:
        """Values to store for a new output bias ``bias`` [out]."""
        if self.kind == "bn":
            return (self.original.astype(np.float64) - bias).astype(self.dtype)
        return (bias / self.scale).reshape(self.shape).astype(self.dtype)


def cast_finite(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` in the weight's storage dtype; Unsupported where one is not finite there (a refit that
    overflows float16 would write inf into the model)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(dtype)
    if not np.all(np.isfinite(out)):
        what = "non-finite" if not np.all(np.isfinite(values)) else f"beyond the range of {np.dtype(dtype)}"
        raise Unsupported(f"the refit produced weights {what}")
    return out


def stored_finite(sink, bias: np.ndarray) -> np.ndarray:
    """``sink.stored(bias)``; Unsupported where a value is not finite in the bias's storage dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = sink.stored(bias) if np.all(np.isfinite(bias)) else None
    if out is None or not np.all(np.isfinite(out)):
        what = "non-finite" if out is None else f"beyond the range of {np.dtype(sink.dtype)}"
        raise Unsupported(f"the refit produced a bias {what}")
    return out


@dataclass
class Site:
    """One consumer node of the weight."""
    node: onnx.NodeProto
    act: str  # the activation input's name
    kind: str  # "conv" | "convT" (ConvTranspose) | "right" (x @ W) | "left" (W @ x)
    index: np.ndarray = field(repr=False, default=None)  # [groups, out_g, d] flat storage indices
    scale: float = 1.0  # Gemm alpha
    transpose_x: bool = False  # Gemm: the activation is used transposed
    conv: dict | None = None
    bias: BiasSink | None = None
    batch: tuple = ()  # a batched MatMul weight's leading dims (one group per slice)

    def _spatial(self, x: np.ndarray) -> int:
        """The kernel's spatial rank; Unsupported when the input's rank does not match it."""
        n_sp = len(self.conv["kernel"])
        if x.ndim - 2 != n_sp:
            raise Unsupported(f"input rank {x.ndim} does not match a {n_sp}-d kernel")
        return n_sp

    def _pads(self, x: np.ndarray):
        """The convolution's explicit pads for this input (auto_pad resolved); Unsupported on a rank mismatch."""
        c = self.conv
        self._spatial(x)
        return conv_pads(x.shape[2:], c["kernel"], c["strides"], c["dilations"], c["pads"], c["auto_pad"])

    def _transposed_input(self, x: np.ndarray) -> np.ndarray:
        """ConvTranspose as a convolution: the input with strides-1 zeros between its elements, padded by
        dilation * (k - 1) - pad (cropped where that is negative; output_padding extends the end)."""
        c = self.conv
        n_sp = self._spatial(x)
        pads = c["pads"] or [0] * (2 * n_sp)
        x = np.asarray(x, dtype=sample_dtype(x.dtype))
        size = tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], c["strides"]))
        up = np.zeros(x.shape[:2] + size, dtype=x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in c["strides"])] = x
        widths, crop = [(0, 0), (0, 0)], [slice(None), slice(None)]
        for a, (k, dl) in enumerate(zip(c["kernel"], c["dilations"])):
            lo = dl * (k - 1) - pads[a]
            hi = dl * (k - 1) - pads[a + n_sp] + c["output_padding"][a]
            widths.append((max(lo, 0), max(hi, 0)))
            crop.append(slice(max(-lo, 0), up.shape[2 + a] - max(-hi, 0)))
        up = up[tuple(crop)]
        if any(w != (0, 0) for w in widths):
            up = np.pad(up, widths)
        return up

    def count(self, x: np.ndarray) -> int:
        """Sample rows one activation batch gives (before any row stride)."""
        d = self.index.shape[2]
        c = self.conv
        if self.kind == "conv":
            out = conv_out(x.shape[2:], c["kernel"], c["strides"], c["dilations"], self._pads(x))
            return int(x.shape[0]) * int(np.prod(out))
        if self.kind == "convT":
            n_sp = self._spatial(x)
            pads = c["pads"] or [0] * (2 * n_sp)
            out = [(n - 1) * s + dl * (k - 1) + 1 - pads[a] - pads[a + n_sp] + c["output_padding"][a]
                   for a, (n, s, k, dl) in enumerate(zip(x.shape[2:], c["strides"], c["kernel"], c["dilations"]))]
            return int(x.shape[0]) * int(np.prod(out))
        if self.batch:
            xb = self._batched(x)
            return int(xb.shape[0]) * int(xb.shape[-2] if self.kind == "right" else xb.shape[-1])
        return int(x.size) // max(d, 1)

    def _batched(self, x: np.ndarray) -> np.ndarray:
        """A batched MatMul's activation as [rest, slices, r, c] (the weight's batch dims last, broadcast)."""
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None, :] if self.kind == "right" else x[:, None]
        b = self.batch
        try:
            shape = np.broadcast_shapes(x.shape[:-2], b)
        except ValueError as exc:
            raise Unsupported(f"activation {x.shape} does not broadcast with the weight's batch dims {b}") from exc
        if tuple(shape[len(shape) - len(b):]) != tuple(b):
            raise Unsupported("the weight's batch dims are broadcast against the activation")
        x = np.broadcast_to(x, tuple(shape) + x.shape[-2:])
        return x.reshape((-1, int(np.prod(b))) + x.shape[-2:])

    def samples(self, x: np.ndarray, step: int = 1) -> np.ndarray:
        """Activation batch -> [groups, m, d] sample rows (``sample_dtype``; every ``step``-th row, from the first)."""
        c = self.conv
        if self.kind == "conv":
            return im2col(x, c["kernel"], c["strides"], c["dilations"], self._pads(x), c["groups"], step)
        if self.kind == "convT":
            n_sp = len(c["kernel"])
            return im2col(self._transposed_input(x), c["kernel"], (1,) * n_sp, c["dilations"], [0] * (2 * n_sp),
                          c["groups"], step)
        d = self.index.shape[2]
        if self.batch:
            x = self._batched(x)  # [rest, G, r, c]
            dt = sample_dtype(x.dtype)
            if self.kind == "left":  # W @ x: samples are x's columns
                x = np.swapaxes(x, -1, -2)
            rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1, d)[:, ::step]
            return np.ascontiguousarray(rows, dtype=dt)
        if self.kind == "right":
            if self.transpose_x:
                x = x.T
            x = np.asarray(x)
            return np.asarray(x.reshape(-1, d)[::step], dtype=sample_dtype(x.dtype)).reshape(1, -1, d)
        # left: W @ x, x [..., K, N] (or [K]); samples are x's columns
        x = np.asarray(x)
        dt = sample_dtype(x.dtype)
        if x.ndim == 1:
            return np.asarray(x, dtype=dt).reshape(1, 1, d)
        if self.transpose_x:
            x = x.T
        rows = np.swapaxes(x, -1, -2).reshape(-1, d)[::step]
        return np.ascontiguousarray(rows, dtype=dt).reshape(1, -1, d)


class Graph:
    """Lookups on the main graph: producers, consumers, constants (initializers and Constant nodes)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {}
        self.producer = {}
        self.uses = reader_map(g)
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            if node.op_type == "Constant" and len(node.output) == 1:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = a.t
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name for i in g.input}

    def stored(self, name: str):
        """The initializer or Constant-node TensorProto named ``name`` itself (no Identity), or None."""
        return self.inits.get(name, self.consts.get(name))

    def constant(self, name: str):
        """The TensorProto holding ``name`` (through Identity), or None."""
        for _ in range(8):
            if name in self.inits:
                return self.inits[name]
            if name in self.consts:
                return self.consts[name]
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def private(self, name: str) -> bool:
        """True when ``name`` is read by exactly one node, is no graph output, and no graph input."""
        return len(self.uses.get(name, ())) == 1 and name not in self.outputs and name not in self.inputs

    def tensor_name(self, name: str) -> str:
        """The initializer / Constant output behind ``name`` (through Identity)."""
        for _ in range(8):
            if name in self.inits or name in self.consts:
                return name
            name = self.producer[name].input[0]
        return name


def _view(index: np.ndarray, perms: list) -> np.ndarray:
    """The storage index array as the node sees it (apply the Transposes from the tensor towards the node)."""
    for p in reversed(perms):
        index = np.transpose(index, p) if p is not None else index.T
    return index


def _const_array(graph: Graph, name: str):
    t = graph.constant(name) if name else None
    return None if t is None else numpy_helper.to_array(t)


def _bias_after(graph: Graph, out_name: str, rows: int, channel_from_end: int) -> BiasSink | None:
    """A following Add with a per-output constant, or a following BatchNormalization (inference mode)."""
    if not graph.private(out_name):
        return None
    nxt = graph.uses[out_name][0]
    if nxt.op_type == "Add" and len(nxt.input) == 2:
        other = nxt.input[1] if nxt.input[0] == out_name else nxt.input[0]
        arr = _const_array(graph, other)
        if arr is None or arr.dtype.kind != "f":
            return None
        tname = graph.tensor_name(other)
        if not graph.private(other) or (tname != other and not graph.private(tname)):
            return None
        shape = arr.shape
        if len(shape) < channel_from_end or shape[-channel_from_end] != rows:
            return None
        if int(np.prod(shape)) != rows:
            return None
        return BiasSink("tensor", tname, arr.reshape(-1).astype(np.float64), 1.0, shape, arr.dtype)
    if nxt.op_type == "BatchNormalization" and nxt.input[0] == out_name and len(nxt.input) >= 5 \
            and not node_attr(nxt, "training_mode", 0) and len(nxt.output) == 1:
        mean = _const_array(graph, nxt.input[3])
        tname = graph.tensor_name(nxt.input[3]) if mean is not None else None
        if mean is None or mean.shape != (rows,) or not graph.private(tname) or mean.dtype.kind != "f":
            return None
        return BiasSink("bn", tname, np.zeros(rows), 1.0, mean.shape, mean.dtype, original=mean)
    return None


def _own_bias(graph: Graph, name: str, rows: int, scale: float) -> BiasSink | None:
    arr = _const_array(graph, name)
    if arr is None or arr.dtype.kind != "f" or int(arr.size) != rows or scale == 0:
        return None
    if arr.ndim > 1 and arr.shape[-1] != rows:
        return None
    tname = graph.tensor_name(name)
    if not graph.private(tname) or (tname != name and not graph.private(name)):
        return None
    return BiasSink("tensor", tname, arr.reshape(-1).astype(np.float64) * scale, scale, arr.shape, arr.dtype)


def _conv_transpose_site(graph: Graph, node, view: np.ndarray) -> Site:
    """ConvTranspose (weight [C_in, C_out/g, *k]) as a stride-1 convolution of the zero-upsampled input with the
    kernel flipped: one problem per group, rows = output channels, columns = (input channel, flipped offset)."""
    if view.ndim < 3:
        raise Unsupported("ConvTranspose weight of rank < 3")
    n_sp = view.ndim - 2
    groups = int(node_attr(node, "group", 1))
    if view.shape[0] % groups:
        raise Unsupported("input channels not divisible by group")
    auto_pad = node_attr(node, "auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID") or node_attr(node, "output_shape", None):
        raise Unsupported(f"ConvTranspose with auto_pad {auto_pad} or output_shape is not reconstructed")
    kernel = tuple(view.shape[2:])
    conv = {"kernel": kernel, "strides": tuple(node_attr(node, "strides", [1] * n_sp)),
            "dilations": tuple(node_attr(node, "dilations", [1] * n_sp)),
            "pads": None if auto_pad == "VALID" else node_attr(node, "pads", None),
            "output_padding": tuple(node_attr(node, "output_padding", [0] * n_sp)), "groups": groups}
    cin_g, cout_g = view.shape[0] // groups, view.shape[1]
    v = view.reshape((groups, cin_g, cout_g) + kernel)[(slice(None),) * 3 + (slice(None, None, -1),) * n_sp]
    index = np.ascontiguousarray(np.swapaxes(v, 1, 2)).reshape(groups, cout_g, -1)
    return Site(node, node.input[0], "convT", index, conv=conv, bias=_conv_bias(graph, node, groups * cout_g, n_sp))


def _conv_bias(graph: Graph, node, out: int, n_sp: int) -> BiasSink | None:
    """A (transposed) convolution's bias: its input B when it has one, else a following Add or BatchNormalization."""
    if len(node.input) > 2 and node.input[2]:
        return _own_bias(graph, node.input[2], out, 1.0)
    return _bias_after(graph, node.output[0], out, n_sp + 1)


def other_readers(graph: Graph, layer) -> list:
    """What reads the layer's weight besides its consumers (``graph.other_readers``): a refit for the
    consumers would change what these compute, unseen by the layer's problem."""
    return _other_readers(layer, graph.graph.node, graph.uses, graph.outputs)


def build_sites(graph: Graph, layer, shape: tuple) -> list:
    """One Site per consumer of ``layer``; raises Unsupported with the reason when the layer cannot be solved."""
    if layer.graph:
        raise Unsupported("weight lives in a subgraph (If/Loop/Scan body)")
    sites = []
    size = int(np.prod(shape)) if shape else 1
    # storage positions (int32 below 2^31 values: an LLM's 11008 x 4096 weight's index is then 180 MB, not 360)
    base = np.arange(size, dtype=np.int32 if size < 2 ** 31 else np.int64).reshape(shape)
    for cons in layer.consumers:
        if cons.graph:
            raise Unsupported(f"read inside a subgraph ({cons.graph}): its input there cannot be captured")
        node = graph.graph.node[cons.index] if 0 <= cons.index < len(graph.graph.node) else None
        if node is None or node.op_type != cons.op:
            raise Unsupported("consumer node not found in the main graph")
        slot = cons.slot
        view = _view(base, cons.perms)  # the Transposes find_layers passed on its way to the tensor
        op = node.op_type
        if op == "ConvTranspose":
            site = _conv_transpose_site(graph, node, view)
        elif op == "Conv":
            if view.ndim < 3:
                raise Unsupported("Conv weight of rank < 3")
            groups = int(node_attr(node, "group", 1))
            o = view.shape[0]
            if o % groups:
                raise Unsupported("output channels not divisible by group")
            n_sp = view.ndim - 2
            kernel = tuple(view.shape[2:])
            conv = {"kernel": kernel, "strides": tuple(node_attr(node, "strides", [1] * n_sp)),
                    "dilations": tuple(node_attr(node, "dilations", [1] * n_sp)),
                    "pads": node_attr(node, "pads", None),
                    "auto_pad": node_attr(node, "auto_pad", "NOTSET") or "NOTSET",
                    "groups": groups}
            index = view.reshape(groups, o // groups, -1)
            site = Site(node, node.input[0], "conv", index, conv=conv, bias=_conv_bias(graph, node, o, n_sp))
        elif op == "Gemm":
            alpha = float(node_attr(node, "alpha", 1.0))
            beta = float(node_attr(node, "beta", 1.0))
            ta, tb = int(node_attr(node, "transA", 0)), int(node_attr(node, "transB", 0))
            if alpha == 0:
                raise Unsupported("Gemm alpha = 0")
            if slot == 1:
                bprime = view.T if tb else view  # [K, N]
                index = bprime.T[None]
                rows = index.shape[1]
                bias = None
                if len(node.input) > 2 and node.input[2]:
                    bias = _own_bias(graph, node.input[2], rows, beta)
                else:
                    bias = _bias_after(graph, node.output[0], rows, 1)
                site = Site(node, node.input[0], "right", index, scale=alpha, transpose_x=bool(ta), bias=bias)
            else:
                aprime = view.T if ta else view  # [M, K]
                index = aprime[None]
                site = Site(node, node.input[1], "left", index, scale=alpha, transpose_x=bool(tb))
        elif op == "MatMul" and view.ndim > 2:  # batched weight [*B, K, N]: one group per slice
            batch = tuple(view.shape[:-2])
            slices = view.reshape((-1,) + view.shape[-2:])
            if slot == 1:
                site = Site(node, node.input[0], "right", np.ascontiguousarray(slices.transpose(0, 2, 1)),
                            batch=batch)
            else:
                site = Site(node, node.input[1], "left", np.ascontiguousarray(slices), batch=batch)
        elif op == "MatMul":
            if slot == 1:
                index = (view.T if view.ndim == 2 else view[None, :])[None]
                bias = _bias_after(graph, node.output[0], index.shape[1], 1)
                site = Site(node, node.input[0], "right", index, bias=bias)
            else:
                index = (view if view.ndim == 2 else view[None, :])[None]
                site = Site(node, node.input[1], "left", index)
        else:
            raise Unsupported(f"{op} is not reconstructed (plain selection)")
        if graph.constant(site.act) is not None:
            raise Unsupported("the layer's other operand is a constant")
        sites.append(site)
    first = sites[0]
    for s in sites[1:]:
        if s.index.shape != first.index.shape or not np.array_equal(s.index, first.index) or s.scale != first.scale:
            raise Unsupported("tied weight read with different layouts by its consumers")
    if len(sites) > 1:
        for s in sites:
            s.bias = None  # one refit serves every consumer: no per-consumer bias shift
    return sites
