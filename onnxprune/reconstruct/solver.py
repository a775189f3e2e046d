"""The layer problem in closed form (float64): damping, OBS saliency, exact per-row refit, mean/variance
correction, and the output error E||W~x~_d - W^x~_p||^2 for any candidate weights.

Notation (ALGORITHMS.md section 6): inputs are augmented with a trailing 1 (p = d + 1 columns),
H = E[x~_p x~_p^T], G = E[x~_p x~_d^T], Hdd = E[x~_d x~_d^T]; target rows W~ = [W | b] (b = 0 without a bias).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

SOLVE_BYTES = 1 << 27  # batched refit: at most this many bytes of stacked sub-matrices at once


class Rows(NamedTuple):
    """Candidate rows [out, d + 1] (bias last) and their quadratic forms w^T H w [out]."""
    w: np.ndarray
    q: np.ndarray


class Group:
    """One problem: rows ``R`` [out, d] of the dense weight, dense bias (or None when the layer has no bias the
    refit may change), and the accumulated second moments."""

    def __init__(self, R, bias, H, G, Hdd, delta: float):
        self.R, self.bias = R, bias
        self.H, self.G, self.Hdd = H, G, Hdd
        d = R.shape[1]
        self.d = d
        self.has_bias = bias is not None
        self.Wt = np.concatenate([R, (bias if bias is not None else np.zeros(R.shape[0]))[:, None]], axis=1)
        diag = np.diag(H)[:d]
        lam = delta * float(diag.mean()) if d else 0.0
        if not np.isfinite(lam) or lam <= 0:
            lam = max(delta, 1e-12) * 1e-6
        self.lam = lam
        self.vars = np.arange(d + 1) if self.has_bias else np.arange(d)
        v = self.vars
        Hl = H[np.ix_(v, v)].copy()
        Hl[np.arange(d), np.arange(d)] += lam
        self.Hl = (Hl + Hl.T) / 2
        self._GW = G @ self.Wt.T  # [p, out]
        C = self._GW[v]
        C[:d] += lam * R.T
        self.C = C  # [vars, out]
        self._WH = self.Wt @ Hdd  # [out, p]: all that is needed of G and Hdd from here on
        self._energy = None
        self.G = self.Hdd = None

    def unconstrained(self):
        """(W* [out, vars], diag of H_lambda^-1 [d]): the dense optimum on the pruned prefix's inputs."""
        try:
            Hinv = np.linalg.inv(self.Hl)
        except np.linalg.LinAlgError:
            Hinv = np.linalg.pinv(self.Hl)
        Wstar = (Hinv @ self.C).T
        return Wstar, np.diag(Hinv)[:self.d].copy()

    def saliency(self):
        """OBS saliency (w*_j)^2 / [H^-1]_jj of every weight entry [out, d] (bias eliminated by the Schur
        complement: the weight block of the full inverse is the inverse of the complement)."""
        Wstar, hdiag = self.unconstrained()
        return Wstar[:, :self.d] ** 2 / np.maximum(hdiag, 1e-300)[None, :]

    def _supports(self, keep: np.ndarray):
        """Yield (rows, columns [n, s]) for the rows of equal support size: kept columns, then the bias column."""
        d = self.d
        sizes = keep.sum(axis=1)
        for s in np.unique(sizes):
            rows = np.flatnonzero(sizes == s)
            cols = np.nonzero(keep[rows])[1].reshape(len(rows), int(s))
            if self.has_bias:
                cols = np.concatenate([cols, np.full((len(rows), 1), d)], axis=1)
            if cols.shape[1] == 0:
                continue
            step = max(1, SOLVE_BYTES // (8 * cols.shape[1] ** 2))
            for a in range(0, len(rows), step):
                yield rows[a:a + step], cols[a:a + step]

    def refit(self, keep: np.ndarray) -> Rows:
        """Exact least squares per output row over the kept columns (and the bias)."""
        out, d = keep.shape
        full = np.zeros((out, d + 1))
        for r, c in self._supports(keep):
            A = self.Hl[c[:, :, None], c[:, None, :]]
            rhs = self.C[c, r[:, None]]
            try:
                sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                sol = np.stack([np.linalg.lstsq(A[j], rhs[j], rcond=None)[0] for j in range(len(r))])
            full[r[:, None], c] = sol
        # w^T H w from the solve itself: H_lambda w = C on the support, H = H_lambda - lambda on the weights
        v = self.vars
        q = np.einsum("vr,rv->r", self.C, full[:, v]) - self.lam * np.einsum("ri,ri->r", full[:, :d], full[:, :d])
        return Rows(full, q)

    def masked(self, keep: np.ndarray) -> Rows:
        """The dense rows with the mask applied, dense bias kept."""
        full = np.zeros((keep.shape[0], self.d + 1))
        full[:, :self.d] = np.where(keep, self.R, 0.0)
        if self.has_bias:
            full[:, self.d] = self.bias
        return Rows(full, self._quad(full, keep))

    def _quad(self, full: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Per-row w^T H w, on each row's support when that is cheaper than the dense product."""
        sizes = keep.sum(axis=1) + 1
        if 8 * float(np.sum(sizes.astype(np.float64) ** 2)) > full.shape[0] * full.shape[1] ** 2:
            return np.einsum("ri,ri->r", full @ self.H, full)
        q = np.zeros(full.shape[0])
        for r, c in self._supports(keep):
            if not self.has_bias:
                c = np.concatenate([c, np.full((len(r), 1), self.d)], axis=1)
            w = full[r[:, None], c]
            q[r] = np.einsum("ni,nij,nj->n", w, self.H[c[:, :, None], c[:, None, :]], w)
        empty = keep.sum(axis=1) == 0
        if not self.has_bias and np.any(empty):
            q[empty] = 0.0
        return q

    def correct(self, rows: Rows) -> Rows:
        """Mean and variance correction per output row (never mean-only). Without a bias only the scale."""
        d = self.d
        full, q = rows
        WH = self.dense_moments()
        mu_d = WH[:, d]
        var_d = np.einsum("ri,ri->r", WH, self.Wt) - mu_d ** 2
        mu_p = full @ self.H[:, d]
        var_p = q - mu_p ** 2
        sd, sp = np.sqrt(np.maximum(var_d, 0)), np.sqrt(np.maximum(var_p, 0))
        ok = sp > 1e-12 * np.maximum(sd, 1e-300)
        a = np.where(ok, np.clip(sd / np.where(ok, sp, 1.0), 0.0, 10.0), 1.0)
        out = full.copy()
        out[:, :d] *= a[:, None]
        b = full[:, d]
        s = full[:, :d] @ self.H[:d, d]  # E[w.x]
        uhu = q - 2 * b * s - b * b  # weights-only quadratic form (H[d, d] = 1)
        if self.has_bias:
            out[:, d] = a * b + mu_d - a * mu_p
        b2 = out[:, d]
        return Rows(out, a * a * uhu + 2 * a * b2 * s + b2 * b2)

    def dense_moments(self) -> np.ndarray:
        """W~ Hdd [out, p]: the dense outputs' first and second moments come from it."""
        return self._WH

    def energy(self) -> float:
        """sum over rows of E||w~ x~_d||^2: the denominator of the relative error."""
        if self._energy is None:
            self._energy = float(np.einsum("ri,ri->", self.dense_moments(), self.Wt))
        return self._energy

    def error(self, rows: Rows) -> float:
        """sum over rows of E||w~ x~_d - w^ x~_p||^2 (>= 0 up to rounding)."""
        e = self.energy() - 2 * float(np.einsum("ir,ri->", self._GW, rows.w)) + float(np.sum(rows.q))
        return max(e, 0.0)


def admm_support(groups: list, select, max_iter: int = 60) -> np.ndarray:
    """ALPS-like ADMM for the support under one layer-wide count (ALGORITHMS.md 6.3 step 2).

    ``select(scores [g, out, d]) -> pruned bool [g, out, d]`` applies the exact layer-wide count (existing zeros
    first, deterministic ties). Returns the final pruned mask [g, out, d].
    """
    Bs, Qs, Ls, Vstar = [], [], [], []
    for grp in groups:
        d = grp.d
        Wstar, _ = grp.unconstrained()
        Hl = grp.Hl
        Hc = Hl[:d, :d] - np.outer(Hl[:d, d], Hl[:d, d]) / Hl[d, d] if grp.has_bias else Hl
        e = 1.0 / np.sqrt(np.maximum(np.diag(Hc), 1e-300))
        Hn = Hc * e[:, None] * e[None, :]
        lam, Q = np.linalg.eigh((Hn + Hn.T) / 2)
        lam = np.maximum(lam, 0.0)
        vs = Wstar[:, :d] / e[None, :]
        Vstar.append(vs)
        Bs.append(vs @ Hn)
        Qs.append(Q)
        Ls.append(lam)
    rho = 0.1 * float(np.mean(np.concatenate(Ls)))
    if not rho > 0:
        rho = 1e-6
    Vs = np.stack(Vstar)
    pruned = select(np.abs(Vs))
    D = np.where(pruned, 0.0, Vs)
    U = np.zeros_like(D)
    last = pruned
    for it in range(1, max_iter + 1):
        V = np.stack([((Bs[j] + rho * (D[j] - U[j])) @ Qs[j] / (Ls[j] + rho)[None, :]) @ Qs[j].T
                      for j in range(len(groups))])
        pruned = select(np.abs(V + U))
        D = np.where(pruned, 0.0, V + U)
        U += V - D
        if it % 3 == 0:
            kept = max(int((~pruned).sum()), 1)
            change = int(np.count_nonzero(pruned != last)) / 2 / kept
            if change == 0:
                break
            rho *= 1.3 if change >= 0.1 else 1.2 if change >= 0.005 else 1.1
            last = pruned
    return pruned
