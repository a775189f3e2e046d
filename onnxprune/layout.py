"""One table: for each prunable op and weight slot, which weight axis holds out-units and in-units.

Every other axis is a kernel (or batch) axis. Scores and masks are element-wise, so the layout only matters for
reporting, ERK's shape term, and the unit-level analyses built on top (connectivity, lookahead).
"""
from dataclasses import dataclass
from typing import Optional

from onnx import AttributeProto, helper

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layout:
    out_axis: Optional[int]
    in_axis: Optional[int]
    group: int = 1

    def describe(self, shape) -> str:
        names = []
        for ax in range(len(shape)):
            if ax == self._norm(self.out_axis, shape):
                names.append("out")
            elif ax == self._norm(self.in_axis, shape):
                names.append("in")
            else:
                names.append("k")
        return ",".join(names)

    @staticmethod
    def _norm(axis, shape):
        if axis is None:
            return None
        return axis % len(shape)


def node_attr(node, name: str, default=None):
    """A node attribute's value (ints/floats as Python lists, strings decoded), or ``default`` if absent."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                return value.decode()
            if a.type in (AttributeProto.INTS, AttributeProto.FLOATS, AttributeProto.STRINGS):
                return [v.decode() if isinstance(v, bytes) else v for v in value]
            return value
    return default


def layout_for(node, slot: int, rank: int) -> Layout:
    """Layout of input ``slot`` (the weight) of ``node`` whose weight has ``rank`` dims."""
    op = node.op_type
    if op == "Conv":
        return Layout(out_axis=0, in_axis=1, group=node_attr(node, "group", 1))
    if op == "ConvTranspose":
        # W[C_in, C_out/group, k...]: out-units are on axis 1 (Torch-Pruning PR #155 got this wrong).
        return Layout(out_axis=1, in_axis=0, group=node_attr(node, "group", 1))
    if op == "Gemm":
        if slot == 1:  # B: [K, N], or [N, K] with transB=1
            return Layout(out_axis=0, in_axis=1) if node_attr(node, "transB", 0) else Layout(out_axis=1, in_axis=0)
        # A constant on the left: A is [M, K] (or [K, M] with transA=1); its rows are output rows.
        return Layout(out_axis=1, in_axis=0) if node_attr(node, "transA", 0) else Layout(out_axis=0, in_axis=1)
    if op == "MatMul":
        if rank == 1:
            return Layout(out_axis=None, in_axis=0)
        if slot == 1:  # x @ W, W[..., K, N]
            return Layout(out_axis=-1, in_axis=-2)
        return Layout(out_axis=-2, in_axis=-1)  # W @ x, W[..., M, K]
    raise ValueError(f"not a prunable op: {op}")


def weight_slots(node):
    """Input positions of ``node`` that may hold a prunable weight, in order of preference."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return (1,)
    if op in ("Gemm", "MatMul"):
        return (1, 0)
    return ()


def unpadded(node) -> bool:
    """No padding at all (pads zero, auto_pad NOTSET/VALID): every output position sees the whole kernel."""
    pads = node_attr(node, "pads")
    return (not pads or not any(pads)) and node_attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")


def set_attr(node, name: str, value) -> None:
    """Replace (or add) one attribute of ``node``."""
    import onnx
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
