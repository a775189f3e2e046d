"""Which channel groups go: dead (zero weights with a foldable constant, or read by nothing alive), aligned."""
from __future__ import annotations

import numpy as np

from .labels import Graph


def reader_matrix(g, r) -> np.ndarray:
    """Non-zero flags per (input channel, output unit) of a reader's weight."""
    b = g.index.blocks(r.layer)
    if r.kind == "conv":
        return b.T
    if r.kind == "convT":
        return b
    return b if r.w_axis == 0 else b.T


def label_norms(g: Graph) -> np.ndarray:
    """L2 norm of each label's producer weights (0 for labels no producer made)."""
    norms = np.zeros(len(g.parent))
    for pos, p in enumerate(g.producers):
        if p.kind == "dw":
            continue
        chan = g.chans.get(p.out)
        if chan is None:
            continue
        w = g.index.weight(p.layer)
        rows = np.moveaxis(w, p.w_axis, 0).reshape(w.shape[p.w_axis], -1)
        norms[chan.lab] = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    return norms


def out_labels(g: Graph, idx: int):
    for p in g.producers:
        if p.idx == idx:
            c = g.chans.get(p.out)
            return None if c is None else c.lab
    return None


def decide(g: Graph, align: int = 1) -> np.ndarray:
    """Per label: True when its channel is removed."""
    n = len(g.parent)
    roots = g.roots()
    fixed = g.fixed_roots()
    readers = []
    for r in g.readers:
        chan = g.chans.get(r.data)
        if chan is None:
            continue
        m = reader_matrix(g, r)
        if m.shape[0] != chan.lab.size:
            fixed[roots[chan.lab]] = True
            continue
        fin = np.isfinite(chan.val)
        can = fin & ((chan.val == 0) | (r.fold is not None))
        readers.append((roots[chan.lab], can, m, out_labels(g, r.idx)))
    dropped = np.zeros(n, dtype=bool)
    for _ in range(n + 1):
        bad = fixed.copy()
        for lab_roots, can, m, outs in readers:
            live = np.ones(m.shape[1], dtype=bool) if outs is None else ~dropped[roots[outs]]
            nz = m[:, live].any(axis=1) if not live.all() else m.any(axis=1)
            bad[lab_roots[nz & ~can]] = True
        new = ~bad
        if np.array_equal(new, dropped):
            break
        dropped = new
    _keep_some(g, roots, dropped, _Lazy(lambda: label_norms(g)), align)
    return dropped[roots]


class _Lazy:
    def __init__(self, fn):
        self.fn, self.value = fn, None

    def __call__(self):
        if self.value is None:
            self.value = self.fn()
        return self.value


def _undrop_best(dropped, roots, labs, lazy_norms, count):
    """Keep at least ``count`` more of the removed channels among ``labs``, highest norm first (ties: the lower
    index); a group of several channels there (an attention head) comes back whole and counts them all."""
    norms = lazy_norms()
    at = roots[labs]
    cand = np.flatnonzero(dropped[at])
    order = cand[np.lexsort((cand, -norms[labs[cand]]))]
    restored = 0
    for k in order:
        if restored >= count:
            break
        if dropped[at[k]]:
            dropped[at[k]] = False
            restored += int(np.count_nonzero(at == at[k]))


def _keep_some(g, roots, dropped, norms, align):
    """Never leave a tensor without channels; keep each producer's channel count a multiple of ``align``."""
    for _ in range(len(g.parent) + 1):
        changed = False
        for chan in g.chans.values():
            if chan.lab.size and dropped[roots[chan.lab]].all():
                _undrop_best(dropped, roots, chan.lab, norms, 1)
                changed = True
        if align > 1:
            for p in g.producers:
                chan = g.chans.get(p.out)
                if p.kind == "dw" or chan is None:
                    continue
                gone = int(dropped[roots[chan.lab]].sum())
                kept = chan.lab.size - gone
                if gone and kept % align:
                    _undrop_best(dropped, roots, chan.lab, norms, min(gone, align - kept % align))
                    changed = True
        if not changed:
            return
