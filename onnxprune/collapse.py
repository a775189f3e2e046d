"""Outputs that pruning cut off from the inputs (constant whatever the input), and the layers that did it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .connectivity import BOOL, Analysis, _in_vec, analyse, node_reads


def _reached(u) -> bool:
    """Some unit of a tensor is reached from a graph input (unknown: assumed reached, never a false alarm)."""
    return u is None or bool(u.vec.any())


def _ancestors(name: str, nodes: list, producers: dict) -> set:
    """Indices of the main-graph nodes ``name`` depends on (inputs and what subgraphs read from outside)."""
    seen, todo = set(), [name]
    while todo:
        idx = producers.get(todo.pop())
        if idx is None or idx in seen:
            continue
        seen.add(idx)
        todo.extend(node_reads(nodes[idx]))
    return seen


_SELECTING = {"Slice", "Split", "Gather"}  # may keep only channels no input reaches: a real stop


def _stops_for_real(idx: int, node, res: Analysis) -> bool:
    """False where a node has an output no input reaches although an input it reads is reached, and that is not
    a sure sign of independence: only a prunable layer whose data input alone is reached (its weights stop the
    flow) and a channel selection (Slice/Split/Gather of its data input) are. Elsewhere the unit analysis keeps
    one side of a product of activations (attention's A @ V) or ignores parameter inputs (Clip bounds, a Gemm's
    C), which may still carry the inputs: an output behind such a node is not claimed cut off."""
    if all(_reached(res.fwd.get(o)) for o in node.output if o):
        return True
    reached = [k for k, name in enumerate(node_reads(node)) if name and _reached(res.fwd.get(name))]
    if not reached:
        return True
    lop = res.ops.get(idx)
    if lop is not None:
        return reached == [lop.data_slot]
    return node.op_type in _SELECTING and reached == [0]


@dataclass
class Collapse:
    """Graph outputs that depend on the graph inputs with the dense weights and no longer do after pruning."""
    outputs: dict = field(default_factory=dict)  # output name -> names of the emptied layers on its paths
    partial: set = field(default_factory=set)  # of those layers: the ones with weights left (on unreached units)
    indirect: set = field(default_factory=set)  # outputs no single layer cuts off (named: layers that lost units)

    def warnings(self) -> list:
        """One line per group of outputs cut off by the same layers."""
        groups = {}
        for out, names in self.outputs.items():
            groups.setdefault((out in self.indirect, tuple(names)), []).append(out)
        lines = []
        for (indirect, names), outs in groups.items():
            q = ", ".join(f"'{o}'" for o in outs)
            one = len(outs) == 1
            what = [f"output{'' if one else 's'} {q} no longer depend{'s' if one else ''} on the inputs"]
            empty = [n for n in names if n not in self.partial]
            part = [n for n in names if n in self.partial]
            why = []
            if empty:
                why.append(f"layer{'' if len(empty) == 1 else 's'} {', '.join(repr(n) for n in empty)} "
                           f"{'has' if len(empty) == 1 else 'have'} no weight left")
            if part:
                why.append(f"layer{'' if len(part) == 1 else 's'} {', '.join(repr(n) for n in part)} "
                           f"{'has' if len(part) == 1 else 'have'} no weight left on the units the inputs still "
                           f"reach")
            where = f"'{outs[0]}'" if one else "them"
            if indirect:
                what.append(f": the pruned weights cut every path from the inputs to {where}"
                            + (f" (layers that lost units on the way: {', '.join(repr(n) for n in names)})"
                               if names else ""))
            elif why:
                what.append(f": {'; '.join(why)} (every path from the inputs to {where} crosses an emptied layer)")
            else:
                what.append(f": the pruned weights cut every path from the inputs to {where}")
            lines.append("".join(what) + f"; {'it is' if one else 'they are'} now constant whatever the input")
        return lines


def collapsed_outputs(model, layers, res: Analysis, dense_weights) -> Collapse:
    """Outputs that no unit of any graph input reaches any more through the pruned weights (``res``: the analysis
    of the pruned weights) although one did through ``dense_weights`` (layer name -> the weights before pruning,
    or an object with ``nonzero(name)``): such an output is constant whatever the input. Outputs that never
    depended on the inputs (constants) are not reported; an input passed through, or a skip connection around an
    emptied layer, keeps an output reached. Forward reachability over-approximates dependence (an op it does not
    understand mixes everything), so an output is never reported while any path may still carry the inputs; the
    dense analysis only runs when some output is cut off. Each output names the layers that stop the flow: their
    input is reached, their output no longer is (and was, dense), and the output depends on them."""
    graph = model.graph
    lost = [o.name for o in graph.output if not _reached(res.fwd.get(o.name))]
    found = Collapse()
    if not lost:
        return found
    dense = analyse(model, layers, dense_weights, res.shapes)
    lost = [o for o in lost if _reached(dense.fwd.get(o))]
    if not lost:
        return found
    nodes = list(graph.node)
    cut, shrunk = {}, {}
    for idx, lop in sorted(res.ops.items()):
        node = nodes[idx]
        out_now, out_dense = res.fwd.get(node.output[0]), dense.fwd.get(node.output[0])
        if out_dense is None or not out_dense.vec.any():
            continue  # dead before pruning too: not pruning's doing
        in_now = _in_vec(lop, node, res.fwd.get(node.input[lop.data_slot]), res.shapes, BOOL)
        if in_now.any() and not _reached(out_now):
            cut[idx] = lop.layer.name
        elif out_now is not None and int(np.count_nonzero(out_now.vec)) < int(np.count_nonzero(out_dense.vec)):
            shrunk[idx] = lop.layer.name
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    for o in lost:
        anc = _ancestors(o, nodes, producers)
        if any(not _stops_for_real(i, nodes[i], res) for i in anc):
            continue  # the flow stops where the analysis may under-approximate dependence: no claim
        names = [cut[i] for i in sorted(anc) if i in cut]
        if not names:  # e.g. a Slice/Gather keeps only units the pruned layer before it no longer feeds
            found.indirect.add(o)
            names = [shrunk[i] for i in sorted(anc) if i in shrunk]
        found.outputs[o] = list(dict.fromkeys(names))
    for o, names in found.outputs.items():
        if o not in found.indirect:
            found.partial.update(n for n in names if res.nonzero.get(n, 0))
    return found
