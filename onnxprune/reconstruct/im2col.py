"""im2col for N-d convolutions: patches whose columns follow the (c, k1, k2, ...) order of an OIHW weight reshape."""
from __future__ import annotations

import math

import numpy as np


def sample_dtype(dtype) -> np.dtype:
    """Sample rows keep float32 activations as they are (float16/bfloat16 widen to it); float64 stays float64.
    The moments are accumulated in float64 from products of at most ``moments.F32_ROWS`` rows."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def conv_pads(spatial: tuple, kernel: tuple, strides: tuple, dilations: tuple, pads, auto_pad: str) -> list:
    """Begin/end pads per spatial axis (ONNX order: all begins, then all ends), resolving auto_pad."""
    n = len(spatial)
    if auto_pad in ("", "NOTSET"):
        p = list(pads) if pads else [0] * (2 * n)
        return p
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small), ends.append(big)
        else:  # SAME_LOWER
            begins.append(big), ends.append(small)
    return begins + ends


def conv_out(spatial: tuple, kernel: tuple, strides: tuple, dilations: tuple, pads: list) -> tuple:
    """Output spatial size of a convolution (``pads`` as from ``conv_pads``)."""
    n = len(spatial)
    return tuple((size + pads[i] + pads[i + n] - (k - 1) * d - 1) // s + 1
                 for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)))


def im2col(x: np.ndarray, kernel: tuple, strides: tuple, dilations: tuple, pads: list, groups: int,
           step: int = 1) -> np.ndarray:
    """x [N, C, *S] -> patches [groups, N * prod(out), C/groups * prod(kernel)] (``sample_dtype``).

    Row order is (n, out positions...), column order (c within the group, kernel offsets...), so that
    ``patches[g] @ W[g-th block of out channels].reshape(O/g, -1).T`` is the convolution's output for that group.
    ``step`` > 1 keeps every step-th row only (rows 0, step, 2 step, ...), copying nothing else.
    """
    x = np.asarray(x)
    n_sp = x.ndim - 2
    begins, ends = pads[:n_sp], pads[n_sp:]
    if any(begins) or any(ends):
        x = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begins, ends)])
    x = np.ascontiguousarray(x, dtype=sample_dtype(x.dtype))
    spatial = x.shape[2:]
    out = tuple((size - (k - 1) * d - 1) // s + 1 for size, k, s, d in zip(spatial, kernel, strides, dilations))
    if min(out, default=1) <= 0:
        raise ValueError(f"convolution output would be empty (input {spatial}, kernel {kernel})")
    sN, sC = x.strides[:2]
    sS = x.strides[2:]
    view = np.lib.stride_tricks.as_strided(
        x, shape=(x.shape[0], x.shape[1]) + out + tuple(kernel),
        strides=(sN, sC) + tuple(a * s for a, s in zip(sS, strides)) + tuple(a * d for a, d in zip(sS, dilations)),
        writeable=False)
    n, c, kk = x.shape[0], x.shape[1], int(np.prod(kernel))
    cg = c // groups
    rows = n * int(np.prod(out))
    pick = np.unravel_index(np.arange(0, rows, step), (n,) + out) if step > 1 else None  # the kept rows only
    if groups == 1:  # [N, *out, C, *k]: rows, then (c, k) columns
        cols = view.transpose((0,) + tuple(range(2, 2 + n_sp)) + (1,) + tuple(range(2 + n_sp, 2 + 2 * n_sp)))
        if pick is not None:
            return cols[pick].reshape(1, -1, c * kk)
        return np.ascontiguousarray(cols).reshape(1, rows, c * kk)
    # grouped (depthwise: cg = 1): [groups, N, *out, cg, *k], one copy into the group-major layout
    view = view.reshape((n, groups, cg) + out + tuple(kernel))
    cols = view.transpose((1, 0) + tuple(range(3, 3 + n_sp)) + (2,) + tuple(range(3 + n_sp, 3 + 2 * n_sp)))
    if pick is not None:
        return np.ascontiguousarray(cols[(slice(None),) + pick]).reshape(groups, -1, cg * kk)
    return np.ascontiguousarray(cols).reshape(groups, rows, cg * kk)
