"""The layer problem in closed form (float64): damping, OBS saliency, exact per-row refit, mean/variance
correction, and the output error E||W~x~_d - W^x~_p||^2 for any candidate weights.

Notation (ALGORITHMS.md section 6): inputs are augmented with a trailing 1 (p = d + 1 columns),
H = E[x~_p x~_p^T], G = E[x~_p x~_d^T], Hdd = E[x~_d x~_d^T]; target rows W~ = [W | b] (b = 0 without a bias).
G and Hdd only ever appear multiplied by W~, so they are never formed: the accumulation keeps G W~^T = E[x~_p y_d^T]
and the per-row E[y_d], E[y_d^2] of the dense outputs y_d = W~ x~_d (p x out instead of two p x p matrices).

Cost (p inputs, m sample rows, k_r weights kept in row r): H_lambda^-1 for the OBS mask O(p^3), or, when m <= p / 2,
O(m^2 p) through the Woodbury identity on the kept sample rows; the refit O(sum_r k_r^3), or O(m^2 k_r) for
rows with k_r >= 2 m.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

SOLVE_BYTES = 1 << 25  # batched refit: at most this many bytes of stacked sub-matrices at once
ADMM_GROWTH = (1.3, 1.2)  # ADMM penalty growth per check while many / some kept weights still change
ADMM_GROWTH_FAST = (1.6, 1.4)  # ... for costly layers (``fast``): ~20 instead of ~30 iterations
ADMM_SETTLED = 0.002  # ADMM stops once fewer than this fraction of the kept weights changed in 3 iterations
KEEP_INVERSE_BYTES = 1 << 26  # H_lambda^-1 up to this size stays for the refit (rows keeping most inputs)
SPD_BLOCKED = 1024  # wider damped systems are inverted by blocks in one copy (``spd_inverse``), not by LAPACK


def spd_inverse(A: np.ndarray, block: int = 512) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix by block Gauss-Jordan elimination in one copy of ``A``.

    Same O(p^3) multiply-adds as LAPACK's getrf + getri, but the only other memory is a few p x block panels
    (np.linalg.inv needs three p x p float64 buffers). No pivoting: every pivot block of a positive definite
    matrix is a (positive definite) Schur complement."""
    X = np.array(A, dtype=np.float64, order="C", copy=True)
    n = X.shape[0]
    for a in range(0, n, block):
        b = min(n, a + block)
        P = np.linalg.inv(X[a:b, a:b])
        col = X[:, a:b].copy()
        row = P @ X[a:b, :]
        for c in range(0, n, block):
            e = min(n, c + block)
            X[:, c:e] -= col @ row[:, c:e]
        X[a:b, :] = row
        X[:, a:b] = -(col @ P)
        X[a:b, a:b] = P
    if not np.all(np.isfinite(np.diag(X))):
        raise np.linalg.LinAlgError("non-finite inverse")
    return X


class Rows(NamedTuple):
    """Candidate rows [out, d + 1] (bias last) and their quadratic forms w^T H w [out]."""
    w: np.ndarray
    q: np.ndarray


class Group:
    """One problem: rows ``R`` [out, d] of the dense weight, dense bias (or None when the layer has no bias the
    refit may change), and the accumulated moments (see ``Moments``).

    ``H`` [p, p] is damped in place (it becomes H_lambda); nothing else of size p^2 is kept. ``X`` [m, p] (the
    pruned prefix's sample rows, ones column last) is given when there are fewer rows than inputs: H_lambda is then
    lambda*I plus a rank-m term and its inverse comes from an m x m system (Woodbury)."""

    def __init__(self, R, bias, H, GW, ymean, ysq, delta: float, X=None, like: "Group | None" = None):
        """``like``: a Group of the same layer over other output rows (a wide layer is solved a block of rows at a
        time): its damped H, sample rows and cached inverse are shared, not prepared again."""
        self.R, self.bias = R, bias
        d = R.shape[1]
        self.d = d
        self.has_bias = bias is not None
        self.Wt = np.concatenate([R, (bias if bias is not None else np.zeros(R.shape[0]))[:, None]], axis=1)
        self.vars = np.arange(d + 1) if self.has_bias else np.arange(d)
        if like is None:
            diag = np.diag(H)[:d]
            lam = delta * float(diag.mean()) if d else 0.0
            if not np.isfinite(lam) or lam <= 0:
                lam = max(delta, 1e-12) * 1e-6
            self.lam = lam
            H[np.arange(d), np.arange(d)] += lam  # in place: H is H_lambda from here on (bias entry undamped)
            self.Hd = H  # [p, p] damped, ones row/column last
            self.Hl = H if self.has_bias else H[:d, :d]  # the system over the refit's variables (a view)
            self.cache = {}  # the unconstrained solve's inverse, once per layer
        else:
            self.lam, self.Hd, self.Hl, self.cache = like.lam, like.Hd, like.Hl, like.cache
        lam = self.lam
        self._GW = GW  # [p, out] = E[x~_p y_d^T]
        C = GW[self.vars].copy()
        C[:d] += lam * R.T
        self.C = C  # [vars, out]
        self._mu_d = ymean  # E[y_d] per row
        self._sq_d = ysq  # E[y_d^2] per row
        self.X, self.A, self.mu = X, None, None
        if like is not None:
            self.X, self.A, self.mu = like.X, like.A, like.mu
        elif X is not None:
            self._prepare_lowrank()
        self._energy = float(np.sum(ysq))

    # -- the damped system ---------------------------------------------------------------------------------
    def _prepare_lowrank(self):
        """Turn the kept sample rows' weight columns, in place, into A with H_lambda's weight block minus the
        bias coupling = lambda*I + A^T A: A = centred rows / sqrt(m) with a bias, rows / sqrt(m) without (any
        column subset of A is then the same for that subset). ``self.mu``: the column means (bias only)."""
        X = self.X
        m = X.shape[0]
        A = X[:, :self.d]
        self.mu = None
        if self.has_bias:
            self.mu = A.mean(axis=0)
            A -= self.mu
        A *= 1.0 / np.sqrt(m)
        self.A = A

    def _use_lowrank(self, k: int) -> bool:
        return self.X is not None and 2 * self.X.shape[0] <= k

    def unconstrained(self):
        """(W* [out, vars], diag of H_lambda^-1 [d]): the dense optimum on the pruned prefix's inputs."""
        d = self.d
        if self._use_lowrank(d):
            A, mu = self.A, self.mu
            m = A.shape[0]
            if "K" not in self.cache:
                K = A @ A.T
                K[np.arange(m), np.arange(m)] += self.lam
                K = np.linalg.inv(K)
                hdiag = np.empty(d)
                for a in range(0, d, 1024):  # diag(A^T K A) by column blocks: no m x d temporary
                    hdiag[a:a + 1024] = np.einsum("ij,ij->j", K @ A[:, a:a + 1024], A[:, a:a + 1024])
                self.cache["K"], self.cache["hdiag"] = K, (1.0 - hdiag) / self.lam
            K, hdiag = self.cache["K"], self.cache["hdiag"]
            cw = self.C[:d]
            if mu is not None:
                cw = cw - np.outer(mu, self.C[d])
            t = K @ (A @ cw)
            ww = (cw - A.T @ t) / self.lam  # [d, out]
            if mu is None:
                return ww.T.copy(), hdiag
            b = self.C[d] - mu @ ww
            return np.concatenate([ww, b[None]], axis=0).T.copy(), hdiag
        Hinv = self._inverse()
        Wstar = (Hinv @ self.C).T
        hdiag = np.diag(Hinv)[:d].copy()
        return Wstar, hdiag

    def _invert(self):
        """(H_lambda^-1 over the refit's variables, True), or its pseudo-inverse and False where it is singular."""
        try:
            return (spd_inverse(self.Hl) if self.Hl.shape[0] > SPD_BLOCKED else np.linalg.inv(self.Hl)), True
        except np.linalg.LinAlgError:
            return np.linalg.pinv(self.Hl), False

    def _inverse(self) -> np.ndarray:
        """H_lambda^-1; kept for the refit's complement solves when it is small and a true inverse."""
        Hinv = self.cache.get("Hinv")
        if Hinv is None:
            Hinv, exact = self._invert()
            if exact and Hinv.nbytes <= KEEP_INVERSE_BYTES:
                self.cache["Hinv"] = Hinv
        return Hinv

    def keep_inverse(self) -> None:
        """Keep the unconstrained solve's p x p inverse for the other row blocks of the layer (``release``)."""
        if self.X is None and "Hinv" not in self.cache:
            self.cache["Hinv"], exact = self._invert()
            if not exact:
                self.cache["pinv"] = True  # good enough for scores, not for the refit's complement solves

    def release(self) -> None:
        self.cache.pop("Hinv", None)
        self.cache.pop("pinv", None)

    def saliency(self):
        """OBS saliency (w*_j)^2 / [H^-1]_jj of every weight entry [out, d] (bias eliminated by the Schur
        complement: the weight block of the full inverse is the inverse of the complement)."""
        Wstar, hdiag = self.unconstrained()
        return Wstar[:, :self.d] ** 2 / np.maximum(hdiag, 1e-300)[None, :]

    def _supports(self, keep: np.ndarray, bias: bool | None = None):
        """Yield (rows, columns [n, s]) for the rows of equal support size: kept columns, then the bias column."""
        d = self.d
        bias = self.has_bias if bias is None else bias
        sizes = keep.sum(axis=1)
        for s in np.unique(sizes):
            rows = np.flatnonzero(sizes == s)
            cols = np.nonzero(keep[rows])[1].reshape(len(rows), int(s))
            if bias:
                cols = np.concatenate([cols, np.full((len(rows), 1), d)], axis=1)
            if cols.shape[1] == 0:
                continue
            if self._use_lowrank(int(s)):  # [n, m, k] sample columns and [n, m, m] systems
                m = self.X.shape[0]
                per_row = 8 * (2 * m * cols.shape[1] + m * m)
            else:  # [n, s, s] gathered sub-matrices
                per_row = 8 * cols.shape[1] ** 2
            step = max(1, SOLVE_BYTES // per_row)
            for a in range(0, len(rows), step):
                yield rows[a:a + step], cols[a:a + step]

    def _gather(self, c):
        """H_lambda[c, c] for every row of ``c`` [n, s] -> [n, s, s]."""
        p = self.Hd.shape[0]
        flat = c[:, :, None] * p + c[:, None, :]
        return np.take(self.Hd.reshape(-1), flat)

    def refit(self, keep: np.ndarray) -> Rows:
        """Exact least squares per output row over the kept columns (and the bias). A row that keeps more than
        55 % of its variables is solved through the pruned ones when H_lambda^-1 is at hand (the OBS identity:
        w_S = w*_S - [H^-1]_SP [H^-1]_PP^-1 w*_P, a |P| x |P| system instead of |S| x |S|); its w^T H w is then
        computed from the weights (the identity below assumes the tiny residual of a direct solve)."""
        out, d = keep.shape
        full = np.zeros((out, d + 1))
        Hinv = self.cache.get("Hinv") if self.X is None and not self.cache.get("pinv") else None
        via = np.zeros(out, dtype=bool)
        n_vars = len(self.vars)
        for r, c in self._supports(keep):
            k = c.shape[1] - (1 if self.has_bias else 0)
            if k and self._use_lowrank(k):
                full[r[:, None], c] = self._refit_lowrank(r, c[:, :k])
                continue
            if Hinv is not None and 20 * c.shape[1] > 11 * n_vars:
                ws = (Hinv @ self.C[:, r]).T  # these rows' unconstrained optimum [n, vars]
                full[r[:, None], self.vars] = self._refit_complement(Hinv, ws, keep[r])
                via[r] = True
                continue
            A = self._gather(c)
            rhs = self.C[c, r[:, None]]
            try:
                sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                sol = np.stack([np.linalg.lstsq(A[j], rhs[j], rcond=None)[0] for j in range(len(r))])
            full[r[:, None], c] = sol
        # w^T H w from the solve itself: H_lambda w = C on the support, H = H_lambda - lambda on the weights
        v = self.vars
        q = np.einsum("vr,rv->r", self.C, full[:, v]) - self.lam * np.einsum("ri,ri->r", full[:, :d], full[:, :d])
        if via.any():
            wv = full[via][:, v]
            q[via] = np.einsum("ri,ri->r", wv @ self.Hl, wv) - self.lam * np.einsum("ri,ri->r", wv[:, :d], wv[:, :d])
        return Rows(full, q)

    def _refit_complement(self, Hinv, ws, kept):
        """Rows whose kept weights ``kept`` [n, d] leave q = d - k pruned each: the unconstrained optimum ``ws``
        [n, vars] corrected by the pruned columns (exact: the constrained optimum of the damped problem)."""
        n, d = kept.shape
        P = np.nonzero(~kept)[1].reshape(n, -1)  # [n, q]
        out = ws.copy()
        if P.shape[1]:
            v = np.take_along_axis(ws, P, axis=1)  # [n, q]
            flat = P[:, :, None] * Hinv.shape[0] + P[:, None, :]
            t = np.linalg.solve(np.take(Hinv.reshape(-1), flat), v[:, :, None])  # [n, q, 1]
            out -= (Hinv[:, P].transpose(1, 0, 2) @ t)[:, :, 0]
            np.put_along_axis(out, P, 0.0, axis=1)
        return out

    def _refit_lowrank(self, r, c):
        """The refit of rows ``r`` whose supports ``c`` [n, k] are wider than twice the sample rows: per row
        (lambda*I + A_S^T A_S) w = c_S (Woodbury, an m x m solve), bias eliminated as in ``unconstrained``."""
        m = self.A.shape[0]
        A = self.A[:, c].transpose(1, 0, 2)  # [n, m, k]
        rhs = self.C[c, r[:, None]]  # [n, k]
        if self.has_bias:
            mu = self.mu[c]  # [n, k]
            cb = self.C[self.d, r]
            rhs = rhs - mu * cb[:, None]
        K = A @ A.transpose(0, 2, 1)
        K[:, np.arange(m), np.arange(m)] += self.lam
        t = np.linalg.solve(K, (A @ rhs[:, :, None]))  # [n, m, 1]
        w = (rhs - (A.transpose(0, 2, 1) @ t)[:, :, 0]) / self.lam
        if self.has_bias:
            b = cb - np.einsum("nk,nk->n", mu, w)
            return np.concatenate([w, b[:, None]], axis=1)
        return w

    def masked(self, keep: np.ndarray) -> Rows:
        """The dense rows with the mask applied, dense bias kept."""
        full = np.zeros((keep.shape[0], self.d + 1))
        full[:, :self.d] = np.where(keep, self.R, 0.0)
        if self.has_bias:
            full[:, self.d] = self.bias
        return Rows(full, self._quad(full, keep))

    def _quad(self, full: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Per-row w^T H w (undamped), on each row's support when that is cheaper than the dense product."""
        d = self.d
        if self.X is not None:  # H = mean of x~ x~^T over the m kept sample rows: an [out, m] product
            return self._quad_rows(full)
        sizes = keep.sum(axis=1) + 1
        damp = self.lam * np.einsum("ri,ri->r", full[:, :d], full[:, :d])
        # a gathered entry costs about as much as 50-100 multiply-adds of a dense product
        if 64 * float(np.sum(sizes.astype(np.float64) ** 2)) > full.shape[0] * full.shape[1] ** 2:
            return np.einsum("ri,ri->r", full @ self.Hd, full) - damp
        q = np.zeros(full.shape[0])
        for r, c in self._supports(keep, bias=True):
            w = full[r[:, None], c]
            q[r] = np.einsum("ni,nij,nj->n", w, self._gather(c), w)
        return q - damp

    def _quad_rows(self, full: np.ndarray) -> np.ndarray:
        """Per-row w^T H w (undamped) from the sample rows, H being their mean of x~ x~^T: with a bias
        ||A w||^2 + (w.mu + b)^2 (A centred), without (1/m) sum_i (w.x_i + b)^2 = ||A w + b / sqrt(m)||^2."""
        d, A = self.d, self.A
        q = np.zeros(full.shape[0])
        for a in range(0, full.shape[0], 1024):  # no [out, m] temporary beyond a block of rows
            w, b = full[a:a + 1024, :d], full[a:a + 1024, d]
            t = A @ w.T
            if self.mu is not None:
                q[a:a + 1024] = np.einsum("mr,mr->r", t, t) + (w @ self.mu + b) ** 2
            else:
                t += b / np.sqrt(A.shape[0])
                q[a:a + 1024] = np.einsum("mr,mr->r", t, t)
        return q

    def correct(self, rows: Rows) -> Rows:
        """Mean and variance correction per output row (never mean-only). Without a bias only the scale."""
        d = self.d
        full, q = rows
        mu_d = self._mu_d
        var_d = self._sq_d - mu_d ** 2
        mu_p = full @ self.Hd[:, d]
        var_p = q - mu_p ** 2
        sd, sp = np.sqrt(np.maximum(var_d, 0)), np.sqrt(np.maximum(var_p, 0))
        ok = sp > 1e-12 * np.maximum(sd, 1e-300)
        a = np.where(ok, np.clip(sd / np.where(ok, sp, 1.0), 0.0, 10.0), 1.0)
        out = full.copy()
        out[:, :d] *= a[:, None]
        b = full[:, d]
        s = full[:, :d] @ self.Hd[:d, d]  # E[w.x]
        uhu = q - 2 * b * s - b * b  # weights-only quadratic form (H[d, d] = 1)
        if self.has_bias:
            out[:, d] = a * b + mu_d - a * mu_p
        b2 = out[:, d]
        return Rows(out, a * a * uhu + 2 * a * b2 * s + b2 * b2)

    def energy(self) -> float:
        """sum over rows of E||w~ x~_d||^2: the denominator of the relative error."""
        return self._energy

    def error(self, rows: Rows) -> float:
        """sum over rows of E||w~ x~_d - w^ x~_p||^2 (>= 0 up to rounding)."""
        return max(self.error_terms(rows), 0.0)

    def error_terms(self, rows: Rows) -> float:
        """``error`` before the clamp at 0 (row blocks of one layer add up)."""
        return self.energy() - 2 * float(np.einsum("ir,ri->", self._GW, rows.w)) + float(np.sum(rows.q))


def admm_support(groups: list, select, max_iter: int = 30, fast: bool = False) -> np.ndarray:
    """ALPS-like ADMM for the support under one layer-wide count (the ADMM support of section 6.3, step 2; at
    most 30 iterations: the prototype found nothing changed beyond that, and each costs 4 out d^2; it stops
    earlier once a check finds fewer than ADMM_SETTLED of the kept weights changed in the last 3). ``fast``: the
    penalty grows by ADMM_GROWTH_FAST, settling in about 20 iterations (for layers where each costs most).

    ``select(scores [g, out, d]) -> pruned bool [g, out, d]`` applies the exact layer-wide count (existing zeros
    first, deterministic ties). Returns the final pruned mask [g, out, d].
    """
    grow = ADMM_GROWTH_FAST if fast else ADMM_GROWTH
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
    B, Q, L = np.stack(Bs), np.stack(Qs), np.stack(Ls)  # [g, out, d], [g, d, d], [g, d]
    QT = np.ascontiguousarray(Q.transpose(0, 2, 1))
    pruned = select(np.abs(Vs))
    D = np.where(pruned, 0.0, Vs)
    U = np.zeros_like(D)
    last = pruned
    for it in range(1, max_iter + 1):
        V = (((B + rho * (D - U)) @ Q) / (L + rho)[:, None, :]) @ QT
        pruned = select(np.abs(V + U))
        D = np.where(pruned, 0.0, V + U)
        U += V - D
        if it % 3 == 0:
            kept = max(int((~pruned).sum()), 1)
            change = int(np.count_nonzero(pruned != last)) / 2 / kept
            if change < ADMM_SETTLED:
                break
            rho *= grow[0] if change >= 0.1 else grow[1] if change >= 0.005 else 1.1
            last = pruned
    return pruned
