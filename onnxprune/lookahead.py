"""Lookahead pruning (LAP) scores over the real graph (ALGORITHMS.md section 3).

score(w: unit i -> unit j)^2 = w^2 * F[i] * B[j], where F[i] is the squared norm of every weight feeding input
unit i and B[j] that of every weight reading output unit j, found through the unit graph: summed over all
producers and consumers at residual Adds and Concats, spread over HW features at a Flatten, scaled by
BatchNormalization's gamma^2/(var + eps) where one sits between (our extension of the paper's chains; the
model's own epsilon, not the reference's 1e-10), and 1 at graph inputs and outputs. Squared scores (same order
as the paper's norms) in float64.
"""
from __future__ import annotations

import logging

import numpy as np
from onnx import numpy_helper

from .connectivity import _in_vec, _out_axis, analyse
from .layout import node_attr
from .unitops import Mode

log = logging.getLogger("onnxprune")


def _bn_scale_fn(model):
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}

    def get(name):
        t = inits.get(name) or consts.get(name)
        return None if t is None else numpy_helper.to_array(t).astype(np.float64)

    def scale(node):
        if len(node.input) < 5:
            return None
        gamma, var = get(node.input[1]), get(node.input[4])
        if gamma is None or var is None:
            return None
        eps = node_attr(node, "epsilon", 1e-5)
        return gamma ** 2 / (var + eps)
    return scale


def lookahead_factors(model, layers, values, shapes):
    """layer name -> list of (LayerOp, F over input units, B over output units), one per analysed consumer."""
    weights = {l.name: values[i] for i, l in enumerate(layers)}
    mode = Mode(False, scale=_bn_scale_fn(model))
    res = analyse(model, layers, weights, shapes, mode,
                  layer_fwd=lambda lop, z, in_vec: z.sum(axis=1).reshape(-1),
                  layer_bwd=lambda lop, z, out_vec: z.sum(axis=2).reshape(-1))
    nodes = list(model.graph.node)
    out = {}
    for idx, lop in res.ops.items():
        node = nodes[idx]
        f = _in_vec(lop, node, res.fwd.get(node.input[lop.data_slot]), res.shapes, mode)
        u = res.bwd.get(node.output[0])
        b = u.on(_out_axis(lop, node, res.shapes), lop.c_out, mode) if u is not None else np.ones(lop.c_out)
        out.setdefault(lop.layer.name, []).append((lop, np.asarray(f, np.float64), np.asarray(b, np.float64)))
    return out


def lap_scores(w: np.ndarray, layer, factors: dict) -> np.ndarray:
    """Squared LAP scores of one layer, flat, float64 (zeros -inf). Unanalysed uses fall back to factor 1."""
    w64 = np.asarray(w, dtype=np.float64)
    entries = factors.get(layer.name, [])
    if len(entries) < len(layer.consumers):
        log.warning("%s: some uses are not in the unit graph; lookahead factors of 1 used there", layer.name)
    total = np.zeros(w64.shape)
    for lop, f, b in entries:
        total += lop.element_mask(w64, f, b)
    total += max(0, len(layer.consumers) - len(entries))
    s = (w64 * w64 * total).reshape(-1)
    s[w64.reshape(-1) == 0] = -np.inf
    return s
