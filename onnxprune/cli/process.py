"""The process around a run: signals that unwind staging, native stdout sent to stderr, ASCII fallback."""
from __future__ import annotations

import os
import signal
import sys

from ..errors import Interrupted


class _signals_raise:
    """SIGTERM / SIGHUP / SIGINT raise Interrupted, so every ``with`` unwinds and removes its staging files; after
    ``hold()`` (the outputs are being published) they are only recorded in ``received``: the run finishes."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))

    def __enter__(self):
        self.old = {}
        self.held = False
        self.received = []
        for sig in self.SIGNALS:
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread (embedded use)
                pass
        return self

    def hold(self):
        self.held = True

    def _handle(self, signum, frame):
        if self.held:
            self.received.append(signum)
            return
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _stdout_to_stderr:
    """File descriptor 1 points at stderr inside the block (LAPACK's and ONNX Runtime's native messages go
    there), and so does ``sys.stdout``; a no-op where stdout is not a real file (an embedding, a test runner)."""

    def __enter__(self):
        self.saved = None
        try:
            if sys.stdout.fileno() != 1 or sys.stderr.fileno() != 2:
                return self
            sys.stdout.flush()
            self.saved = os.dup(1)
            os.dup2(2, 1)
        except (AttributeError, OSError, ValueError):  # no real descriptors: nothing native can print there
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            os.dup2(self.saved, 1)
            os.close(self.saved)


def _ascii_fallback() -> None:
    """On a stream that cannot encode '→' (cp1252 when redirected on Windows), print replacements, not crash."""
    from .. import table
    for stream in (sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or "ascii"
        try:
            "→×—…≥".encode(enc)
        except (UnicodeEncodeError, LookupError):
            table.ASCII = True
            try:
                stream.reconfigure(errors="replace")
            except (AttributeError, ValueError):
                pass


def ignore_late_signals() -> None:
    """The process is exiting with its outcome decided and its files in place: a signal during the interpreter's
    teardown is ignored rather than killing it with another status."""
    for sig in _signals_raise.SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
