"""One family of typed exceptions. Exit codes live in cli/run.py, never here."""


class OnnxPruneError(Exception):
    """Base class for every error onnxprune raises on purpose."""


class InputError(OnnxPruneError):
    """The input model is unreadable, corrupt, unsafe or uses something we refuse (exit 3)."""


class RequestError(OnnxPruneError):
    """The request cannot be met on this model: nothing prunable, infeasible target (exit 4)."""


class OutputError(OnnxPruneError):
    """The output cannot be written: same path as the input, permission, disk full (exit 5)."""


class AccuracyGateError(OnnxPruneError):
    """Validation showed a drop beyond the allowed budget (exit 1)."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


class ConfigError(OnnxPruneError):
    """The options do not fit this model, e.g. a dynamic input shape that needs --input-shape (exit 2)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP arrived: unwind (every staging file is removed on the way out), then exit 128+signum.
    A BaseException so that no ``except Exception`` in the core swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def raise_if_interrupted(exc: BaseException) -> None:
    """Re-raise the interrupt behind ``exc``, if any: a signal landing in a native module's initialisation (ONNX
    Runtime's import) surfaces as ``ImportError: initialization failed`` with the interrupt as its context, and
    an ``except Exception`` would otherwise turn Ctrl-C into an error message, or swallow it."""
    seen = set()
    cur = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (Interrupted, KeyboardInterrupt)):
            raise cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__


def first_line(exc: BaseException, join: bool = False, limit: int = 300) -> str:
    """An exception's message on one line (at most ``limit`` characters): its first line, or with ``join`` all
    its non-empty lines joined (native libraries spread one error over several); the type's name when empty."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines) if join else lines[0]
    if len(text) <= limit:
        return text
    cut = text[:limit - 4]  # cut at a word's end, marked: never a word broken off as if it were the message
    return (cut[:cut.rfind(" ")] if " " in cut[limit // 2:] else cut) + " ..."

