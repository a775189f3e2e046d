"""Wide layers (an LLM's 11008 x 4096 projection) solved a block of output rows at a time: the dense rows built
from the stored weight on demand, the OBS scores spilled to an unnamed temporary file and the layer's exact count
selected from it in a few passes, the candidate rows kept on disk until one is chosen. A layer then holds its
moments (H, p x p; GW, p x out), one block of rows, its masks and its new values, whatever its size."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..select import canonical_index, layout_perm
from .problems import cast_finite, stored_finite
from .solver import Group, Rows

ROW_BYTES = 1 << 26  # float64 bytes of one block of rows [rows, p]
WIDE_BYTES = 1 << 28  # one-group, one-consumer layers whose [out, p] float64 rows exceed this are solved by blocks
READ_VALUES = 1 << 20  # float64 scores per read of the spilled file


class LayerRows:
    """The dense problem rows W~ = [W * scale | b] ([out, p], p = d + 1) of a one-group layer, a block at a time:
    ``w`` the stored weight (a mapped view stays mapped), ``index`` [out, d] its storage positions."""

    def __init__(self, w: np.ndarray, index: np.ndarray, scale: float, bias: np.ndarray | None):
        self.w, self.index, self.scale, self.bias = w.reshape(-1), index, scale, bias
        og, d = index.shape
        self.shape = (1, og, d + 1)
        self.step = max(1, ROW_BYTES // (8 * (d + 1)))

    def spans(self):
        og = self.shape[1]
        return [(a, min(og, a + self.step)) for a in range(0, og, self.step)]

    def weights(self, a: int, b: int) -> np.ndarray:
        """R rows [b - a, d] (float64, scaled), as the whole-layer path computes them."""
        return self.w[self.index[a:b]].astype(np.float64) * self.scale

    def block(self, a: int, b: int) -> np.ndarray:
        """W~ rows [b - a, p]."""
        out = np.empty((b - a, self.shape[2]))
        out[:, :-1] = self.weights(a, b)
        out[:, -1] = self.bias[a:b] if self.bias is not None else 0.0
        return out

    def l1(self) -> float:
        """max over rows of sum |W~|: bounds |y_d| / max |x|."""
        return max((float(np.abs(self.block(a, b)).sum(axis=1).max(initial=0)) for a, b in self.spans()),
                   default=0.0)


def by_blocks(g: int, og: int, d: int, sites: list, mask: str) -> bool:
    """Whether a layer is solved by row blocks (ADMM's support needs every row at once: whole-layer)."""
    return g == 1 and len(sites) == 1 and mask != "admm" and 8 * og * (d + 1) > WIDE_BYTES


class _Spill:
    """float64 rows appended to an unnamed temporary file (gone when closed or at exit), read back by blocks."""

    def __init__(self, width: int):
        self.fh = tempfile.TemporaryFile(prefix="onnxprune-")
        self.width = width

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, dtype=np.float64).tobytes())

    def rows(self, a: int, b: int) -> np.ndarray:
        return self.read(a * self.width, (b - a) * self.width).reshape(b - a, self.width)

    def read(self, start: int, count: int) -> np.ndarray:
        self.fh.flush()
        data = os.pread(self.fh.fileno(), 8 * count, 8 * start)
        if len(data) != 8 * count:  # pragma: no cover - a file we wrote ourselves came back short
            raise OSError("reconstruction: a temporary file came back short")
        return np.frombuffer(data, dtype=np.float64)

    def close(self) -> None:
        self.fh.close()


_SIGN = np.uint64(1 << 63)


def _keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 scores (-0.0 as +0.0, NaN as +inf: the order comparisons give)."""
    s = np.where(np.isnan(scores), np.inf, scores) + 0.0
    k = s.view(np.uint64)
    neg = (k & _SIGN) != 0
    return np.where(neg, ~k, k | _SIGN)


def _kth_key(blocks, k: int) -> np.uint64:
    """The k-th smallest key (1-based) of the keys ``blocks()`` yields, 16 bits a pass (four passes)."""
    prefix = 0
    for shift in (48, 32, 16, 0):
        hist = np.zeros(1 << 16, dtype=np.int64)
        for keys in blocks():
            if shift < 48:
                keys = keys[(keys >> np.uint64(shift + 16)) == np.uint64(prefix)]
            hist += np.bincount(((keys >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64),
                                minlength=1 << 16)
        c = np.cumsum(hist)
        b = int(np.searchsorted(c, k))  # the first digit whose cumulative count reaches k
        k -= int(c[b - 1]) if b else 0
        prefix = (prefix << 16) | b
    return np.uint64(prefix)


def select_spilled(spill: _Spill, n: int, n_prune: int, positions, shape: tuple, perm: tuple) -> np.ndarray:
    """``select.prune_mask`` over the layer's scores in row order [out * d] (read from ``spill``): the ``n_prune``
    lowest by (score, canonical index), as a flat row-order boolean array. ``positions(flat)``: storage positions
    of row-order positions (for the canonical tie-break)."""
    if n_prune <= 0:
        return np.zeros(n, dtype=bool)
    if n_prune >= n:
        return np.ones(n, dtype=bool)

    def blocks():
        for start in range(0, n, READ_VALUES):
            yield _keys(spill.read(start, min(READ_VALUES, n - start)))
    t = _kth_key(blocks, n_prune)
    pruned = np.empty(n, dtype=bool)
    ties = []
    for start in range(0, n, READ_VALUES):
        keys = _keys(spill.read(start, min(READ_VALUES, n - start)))
        np.less(keys, t, out=pruned[start:start + keys.size])
        ties.append(np.flatnonzero(keys == t) + start)
    short = n_prune - int(np.count_nonzero(pruned))
    if short:
        at = np.concatenate(ties)
        at = at[np.argsort(canonical_index(positions(at), shape, perm), kind="stable")]
        pruned[at[:short]] = True
    return pruned


def solve_wide(layer, w, site, mom, rows: LayerRows, n_prune: int, plain_pruned: np.ndarray, options,
               mask_used: str):
    """``driver._solve`` for a one-group layer a block of rows at a time (OBS or the plain mask): the same support
    under the exact count, refit, correction and guard. Returns (new weights, new stored bias or None, fields)."""
    index = rows.index  # [og, d]
    og, d = index.shape
    sink = site.bias
    flat_w = w.reshape(-1)
    spans = rows.spans()
    X = None if mom.X is None else mom.X[0]
    perm = layout_perm(w.shape, layer.layout.out_axis, layer.layout.in_axis)
    first = None

    def group(a, b):
        nonlocal first
        if first is not None and (a, b) == spans[0]:
            return first  # the first block's problem is built once (it damps H, which every block shares)
        grp = Group(rows.weights(a, b), sink.dense[a:b] if sink is not None else None, mom.H[0],
                    mom.GW[0][:, a:b], mom.ymean[0][a:b], mom.ysq[0][a:b], options.damping, X, like=first)
        first = first or grp
        return grp

    group(*spans[0])  # damps H in place once; every block shares it
    files = []
    try:
        if mask_used == "obs":
            scores = _Spill(d)
            files.append(scores)
            first.keep_inverse()
            for a, b in spans:
                s = group(a, b).saliency()
                s[flat_w[index[a:b]] == 0] = -np.inf  # existing zeros first
                scores.append(s)
            first.release()
            pruned_rows = select_spilled(scores, og * d, n_prune, lambda at: index[at // d, at % d], w.shape,
                                         perm).reshape(og, d)
            scores.close()
            files.remove(scores)
            pruned = np.empty(w.size, dtype=bool)
            pruned[index] = pruned_rows
            del pruned_rows
        else:
            pruned = plain_pruned
        energy = err_plain = 0.0
        terms = {"refit": 0.0, "refit+meanvar": 0.0}
        refit_file = _Spill(d + 1)
        files.append(refit_file)
        q_refit = np.empty(og)
        for a, b in spans:
            grp = group(a, b)
            energy += grp.energy()
            err_plain += grp.error_terms(grp.masked(~plain_pruned[index[a:b]]))
            refit = grp.refit(~pruned[index[a:b]])
            refit_file.append(refit.w)
            q_refit[a:b] = refit.q
            terms["refit"] += grp.error_terms(refit)
            if options.correction == "meanvar":
                terms["refit+meanvar"] += grp.error_terms(grp.correct(refit))
        err_plain = max(err_plain, 0.0)
        names = (["refit+meanvar"] if options.correction == "meanvar" else []) + ["refit"]
        chosen = next(((n, max(terms[n], 0.0)) for n in names
                       if max(terms[n], 0.0) <= err_plain * (1 + 1e-9) + 1e-300), None)
        msk = pruned
        if chosen is None:  # guard: never worse than plain selection on the calibration data
            refit_file.close()
            files.remove(refit_file)
            refit_file = _Spill(d + 1)
            files.append(refit_file)
            e = 0.0
            for a, b in spans:
                grp = group(a, b)
                refit = grp.refit(~plain_pruned[index[a:b]])
                refit_file.append(refit.w)
                q_refit[a:b] = refit.q
                e += grp.error_terms(refit)
            e = max(e, 0.0)
            chosen = ("plain-mask refit", e) if e <= err_plain else ("plain", err_plain)
            msk = plain_pruned
        method, err_after = chosen
        out = np.empty(w.size, dtype=w.dtype)
        stored_bias = np.empty(og) if sink is not None and method != "plain" else None
        for a, b in spans:
            if method == "plain":
                block = group(a, b).masked(~plain_pruned[index[a:b]]).w
            elif method == "refit+meanvar":
                block = group(a, b).correct(Rows(refit_file.rows(a, b), q_refit[a:b])).w
            else:
                block = refit_file.rows(a, b)
            if stored_bias is not None:
                stored_bias[a:b] = block[:, d]
            new = block[:, :d] / site.scale
            m = msk[index[a:b]]
            new[m] = 0.0
            o = cast_finite(new, w.dtype)
            lost = (o == 0) & ~m
            if lost.any():  # a kept weight that rounds to zero would change the count: a tiny non-zero
                o[lost] = np.copysign(np.finfo(w.dtype).smallest_subnormal, new[lost]).astype(w.dtype)
            out[index[a:b]] = o
    finally:
        for f in files:
            f.close()
    bias = None
    if stored_bias is not None:
        bias = stored_finite(sink, stored_bias)
    energy = max(energy, 1e-300)
    fields = {"method": method, "mask": mask_used if msk is pruned else "plain", "groups": 1, "inputs": d,
              "outputs": og, "bias": None if sink is None else sink.kind, "lambda": float(first.lam),
              "rel_error_before": err_plain / energy, "rel_error_masked": None, "rel_error_after": err_after / energy,
              "row_blocks": len(spans)}
    return out.reshape(w.shape), bias, fields
