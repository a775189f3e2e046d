"""A layer problem's moments from captured activations: H, the cross terms through the dense outputs, and the
dense outputs' per-row mean and square, accumulated over the calibration batches from float32 sample rows into
float64 (the rows themselves kept only when they are few)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import Capture
from ..errors import InputError
from .problems import Unsupported

ACC_BYTES = 1 << 23  # bytes of buffered sample rows per accumulation step (per model: dense and pruned prefix)
GRAM_BLOCK = 1024  # columns of H updated per product
SMALL_GRAM = 64  # inputs per group up to which every group's H is updated in one batched product
HOLDOUT_BELOW = 0.5  # layers with fewer sample rows than this many times their inputs choose on held-out rows
#                       (PP-OCRv4 rec's 2881-input Conv with 2560 rows: four solves, 12 s, for the same choice)
HOLDOUT_MAX_INPUTS = 1024  # ... for layers up to this wide (wider ones: 13 O(p^3) solves; with one split's four, the
#                            30 M benchmark model's 2048-wide Gemms with 128 rows took 2.5x the time, 1.7x the memory)
HOLDOUT_MIN_TEST = 8  # ... given at least this many rows per fold (a quarter of the rows; fewer: default damping)
F32_ROWS = 8192  # float32 sample rows per product (its float32 sums then go into the float64 moments)
F32_SAFE = 1e36  # a float32 step whose sums could come near float32's 3.4e38 runs in float64 instead


@dataclass
class Moments:
    """What the layer problem needs of the calibration data, per group (float64, averaged over sample rows):
    H [g, p, p] = E[x~_p x~_p^T]; GW [g, p, og] = E[x~_p y_d^T] with y_d = W~ x~_d the dense layer's output;
    ymean, ysq [g, og] = E[y_d], E[y_d^2]; X: per group the pruned prefix's sample rows [m, p] (ones column last),
    kept only when there are fewer of them than inputs (H is then low-rank plus the damping); rows: m."""
    H: np.ndarray
    GW: np.ndarray
    ymean: np.ndarray
    ysq: np.ndarray
    rows: int
    X: list | None = None
    held: tuple | None = None  # (dense, pruned prefix) sample rows [g, m, p] when few: the held-out choice


def _add_gram(H: np.ndarray, x: np.ndarray) -> None:
    """H += x^T x for the upper triangle in column blocks (no p x p temporary), then mirrored: exactly symmetric."""
    p = H.shape[0]
    if p <= GRAM_BLOCK:
        t = x.T @ x
        H += (t + t.T) / 2
        return
    for a in range(0, p, GRAM_BLOCK):
        b = min(p, a + GRAM_BLOCK)
        H[:b, a:b] += x[:, :b].T @ x[:, a:b]
        blk = H[a:b, a:b]
        blk[...] = (blk + blk.T) / 2
        H[a:b, :a] = H[:a, a:b].T


def dense_output(site, wide: bool) -> tuple | None:
    """(name, bias to add [out] or None) when the dense layer's output y_d = W~ x~_d can be read from the dense
    model's own convolution output instead of computed from im2col rows: a single float Conv whose output is
    y_d itself (its own bias B, or none) or y_d less a following Add's / BatchNormalization's bias sink."""
    node = site.node
    if site.kind != "conv" or wide or site.scale != 1.0:
        return None
    own = len(node.input) > 2 and bool(node.input[2])
    sink = site.bias
    if own:  # the output carries B: it must be the sink the refit writes (Wt's bias column)
        return (node.output[0], None) if sink is not None else None
    if sink is None:
        return node.output[0], None
    return node.output[0], (sink.dense if sink.kind == "tensor" else None)  # "bn": its dense bias is 0


def _output_rows(y: np.ndarray, g: int, step: int, bias) -> np.ndarray:
    """A Conv output [N, g * og, *out] -> [g, rows, og] in im2col's row order (n, positions), every step-th row."""
    n, o = y.shape[0], y.shape[1]
    rows = y.reshape(n, g, o // g, -1).transpose(1, 0, 3, 2).reshape(g, -1, o // g)[:, ::step]
    rows = np.ascontiguousarray(rows, dtype=np.float64 if y.dtype == np.float64 else np.float32)
    if bias is not None:
        rows += bias.reshape(g, 1, o // g).astype(rows.dtype)
    return rows


def _batch_scale(feeds) -> float:
    """The calibration batches' total size in units of the first batch's (sum of their arrays' elements)."""
    sizes = [sum(int(np.size(a)) for a in feed.values()) for feed in feeds]
    return sum(sizes) / sizes[0] if sizes and sizes[0] else float(len(feeds))


def accumulate(sites, feeds, dense: Capture, current: Capture | None, max_rows: int, Wt: np.ndarray,
               output: tuple | None = None) -> Moments:
    """Accumulate the layer's ``Moments`` over the calibration batches; ``Wt`` [g, og, p]: the dense rows [W | b]
    (or a ``wide.LayerRows`` giving them a block of rows at a time). ``output`` (from ``dense_output``, the name
    among what ``dense`` captures): the dense outputs are read from it (no dense im2col, no product) whenever the
    pruned prefix differs and the rows are enough for no held-out choice.

    Only H is p x p: the cross terms with the dense inputs are taken through the dense outputs y_d (p x og), which
    is all the objective, the targets and the mean/variance correction need of G and Hdd. Sample rows are copied
    into preallocated buffers (ones column last) of up to ACC_BYTES (or all rows, when at most half the inputs)
    and multiplied once full, so that small batches (batch-1 models) still give large matrix products."""
    g, og, p = Wt.shape
    d = p - 1
    same = current is None
    H = np.zeros((g, p, p))
    GW = np.zeros((g, p, og))
    ysum = np.zeros((g, og))
    ysq = np.zeros((g, og))
    if isinstance(Wt, np.ndarray):
        WtT = np.ascontiguousarray(Wt.transpose(0, 2, 1))
        w_l1 = float(np.abs(Wt).sum(axis=2).max(initial=0))  # bounds |y_d| / max |x|
    else:  # a wide layer's rows (wide.LayerRows): built a block at a time, never whole
        WtT, w_l1 = Wt, Wt.l1()
    Bd = Bp = Yd = None
    fill, rows, flushes, cap = 0, 0, 0, 0
    stride = None
    direct = None  # reading the dense outputs from ``output`` (decided on the first batch)

    def flush():
        nonlocal flushes
        xp = Bp[:, :fill] if not same else Bd[:, :fill]
        xd = None if direct else Bd[:, :fill]
        if xp.dtype != np.float64:
            # huge but finite activations (|x| beyond ~1e17 overflows a float32 sum of squares over F32_ROWS
            # rows): this step in float64, where a float32 value's square and any row count stay finite
            big = float(np.abs(xp).max(initial=0))
            if direct:
                ybig = float(np.abs(Yd[:, :fill]).max(initial=0))
            else:
                big = max(big, float(np.abs(xd).max(initial=0)))
                ybig = big * w_l1
            if big * max(big, ybig) * fill > F32_SAFE:
                xp = xp.astype(np.float64)
                xd = None if xd is None else xd.astype(np.float64)
        if direct:
            _add_products(None, xp, None, H, GW, ysum, ysq, yd=Yd[:, :fill])
        else:
            _add_products(xd, xp, WtT, H, GW, ysum, ysq)
        flushes += 1

    for j, feed in enumerate(feeds):
        od = dense.run(feed, j)
        oc = od if same else current.run(feed, j)
        for site in sites:
            if max_rows and stride is None:  # fixed from the first batch: deterministic, evenly spread rows
                n0 = site.count(od[site.act])
                # the batches' sizes scale the first one's rows (a short last batch: a whole one's estimate
                # could double the stride and halve the rows, below what the layer's cap asked for)
                stride = max(1, -(-int(n0 * _batch_scale(feeds) + 0.5) * len(sites) // max_rows))
            if direct is None:
                # twice the held-out bound (a short last batch gives at least half the estimate with two or
                # more batches): the held-out choice needs the dense sample rows themselves
                total = site.count(od[site.act]) // (stride or 1) * len(feeds)
                y = od.get(output[0]) if output is not None else None
                direct = bool(not same and len(sites) == 1 and y is not None and y.dtype in (np.float32, np.float64)
                              and total >= 2 * HOLDOUT_BELOW * p)
            xp = site.samples((od if same else oc)[site.act], stride or 1)
            if direct:
                yd = _output_rows(od[output[0]], g, stride or 1, output[1])
                if yd.shape[:2] != xp.shape[:2] or yd.shape[2] != og:
                    raise Unsupported("the dense layer's output does not match its sample rows")
                xd = None
            else:
                yd = None
                xd = xp if same else site.samples(od[site.act], stride or 1)
                if xd.shape != xp.shape:
                    raise Unsupported("dense and pruned activations differ in shape")
            if xp.shape[2] != d or xp.shape[0] != g:
                raise Unsupported(f"activation gives {xp.shape[0]}x{xp.shape[2]} inputs per group, the weight "
                                  f"{g}x{d}")
            if xp.shape[1] == 0:
                continue
            if not np.isfinite(xd if yd is None else yd).all():
                raise InputError(f"calibration batch {j + 1}: the dense model's activations reaching this layer "
                                 f"({site.act}) are not finite (float32 overflow or NaN): the calibration values "
                                 f"are out of this model's range")
            if not same and not np.isfinite(xp).all():
                raise Unsupported("the pruned model's activations reaching this layer are not finite")
            if Bp is None and Bd is None:  # at most the rows all batches can give (as many as the first), at most
                dt = xp.dtype  # ACC_BYTES
                cap = max(256, ACC_BYTES // (dt.itemsize * p * g))
                if dt == np.float32:  # float32 products summed over at most F32_ROWS rows, then in float64
                    cap = min(cap, F32_ROWS)
                total = xp.shape[1] * len(feeds) * len(sites)
                if total < HOLDOUT_BELOW * p:  # few rows: keep them all in one buffer (smaller than H), for
                    cap = total  # the held-out choice and (under p / 2 rows) the low-rank path
                cap = max(1, min(cap, total))
                if direct:
                    Yd = np.empty((g, cap, og), dtype=yd.dtype)
                else:
                    Bd = np.empty((g, cap, p), dtype=dt)
                    Bd[:, :, d] = 1.0
                if not same:
                    Bp = np.empty((g, cap, p), dtype=dt)
                    Bp[:, :, d] = 1.0
            a, n = 0, xp.shape[1]
            while a < n:
                take = min(n - a, cap - fill)
                if direct:
                    Yd[:, fill:fill + take] = yd[:, a:a + take]
                else:
                    Bd[:, fill:fill + take, :d] = xd[:, a:a + take]
                if not same:
                    Bp[:, fill:fill + take, :d] = xp[:, a:a + take]
                fill += take
                rows += take
                a += take
                if fill == cap:
                    flush()
                    fill = 0
            del xd, xp, yd
        del od, oc
    if fill:
        flush()
    if rows == 0:
        raise Unsupported("no calibration rows reached this layer")
    H /= rows
    GW /= rows
    ysum /= rows
    ysq /= rows
    X = None
    if flushes == 1 and 2 * rows <= d:  # every row is still in the buffer: H = lambda*I + low rank, used
        B = Bd if same else Bp
        X = [B[gi, :rows].astype(np.float64) for gi in range(g)]
    held = None
    if flushes == 1 and 4 * HOLDOUT_MIN_TEST <= rows < HOLDOUT_BELOW * p and d <= HOLDOUT_MAX_INPUTS and not direct:
        held = (Bd[:, :rows], (Bd if same else Bp)[:, :rows])
    Bd = Bp = Yd = None
    return Moments(H, GW, ysum, ysq, rows, X, held)


def _add_products(xd, xp, WtT, H, GW, ysum, ysq, yd=None) -> None:
    """Add one accumulation step's sums to the float64 moments: x_p^T x_p, x_p^T y_d, sum y_d, sum y_d^2 (``yd``:
    the dense outputs as read from the model, else y_d = x_d W~^T)."""
    g, p = H.shape[0], H.shape[1]
    if p <= SMALL_GRAM:  # many small groups (depthwise): one batched product
        t = xp.transpose(0, 2, 1) @ xp
        H[...] += (t + t.transpose(0, 2, 1)) / 2
    else:
        for gi in range(g):
            _add_gram(H[gi], xp[gi])
    if yd is not None:
        blocks = [(slice(None), None)]
    elif isinstance(WtT, np.ndarray):
        blocks = [(slice(None), WtT)]
    else:  # a wide layer (one group): its output rows by blocks
        blocks = ((slice(a, b), WtT.block(a, b).T[None]) for a, b in WtT.spans())
    for cols, wt in blocks:
        if wt is not None:
            yd = xd @ wt.astype(xd.dtype, copy=False)  # [g, n, rows]: the dense layer's outputs
        GW[:, :, cols] += xp.transpose(0, 2, 1) @ yd.astype(xp.dtype, copy=False)
        yd = yd.astype(np.float64, copy=False)
        ysum[:, cols] += yd.sum(axis=1)
        ysq[:, cols] += np.einsum("gnr,gnr->gr", yd, yd)


def row_moments(xd: np.ndarray, xp: np.ndarray, Wt: np.ndarray) -> Moments:
    """``Moments`` of given sample rows [g, m, p] (dense, pruned prefix; ones column last), in float64."""
    xd, xp = xd.astype(np.float64), xp.astype(np.float64)
    m, d = xd.shape[1], xd.shape[2] - 1
    yd = xd @ Wt.transpose(0, 2, 1)
    H = xp.transpose(0, 2, 1) @ xp / m
    H = (H + H.transpose(0, 2, 1)) / 2
    X = [xp[gi] for gi in range(xp.shape[0])] if 2 * m <= d else None
    return Moments(H, xp.transpose(0, 2, 1) @ yd / m, yd.mean(axis=1), (yd * yd).mean(axis=1), m, X)
