"""Click parameter types for the options: sparsities, fractions, bounds and sizes, checked finite."""
from __future__ import annotations

import math

import click


class SparsityType(click.ParamType):
    """A finite float in [0, 1), or 'auto'. (click.FloatRange lets 'nan' through.)"""
    name = "FLOAT|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (or 'auto')", param, ctx)
        if not math.isfinite(v) or not 0.0 <= v < 1.0:
            hint = f"; did you mean {v / 100:g}?" if 1.0 <= v < 100.0 else ""
            self.fail(f"{value!r} is not a finite number in [0, 1){hint}", param, ctx)
        return v


class FractionType(click.ParamType):
    name = "FRACTION"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            self.fail(f"{value!r} is not a finite number in [0, 1]", param, ctx)
        return v


class BoundType(click.ParamType):
    """A finite float within [lo, hi]."""
    name = "FLOAT"

    def __init__(self, lo=-math.inf, hi=math.inf):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not self.lo <= v <= self.hi:
            self.fail(f"{value!r} is not a finite number in [{self.lo}, {self.hi}]", param, ctx)
        return v


class SizeType(click.ParamType):
    """A byte count with an optional K/M/G/T suffix (powers of 1024), or 'never' (None)."""
    name = "SIZE"
    UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        if text == "NEVER":
            return None
        unit = text[-1:] if text[-1:] in self.UNITS else ""
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or number * self.UNITS[unit] > 1 << 62:
            self.fail(f"{value!r} is not a size (e.g. 0, 512M, 2G) or 'never'", param, ctx)
        return int(number * self.UNITS[unit])
