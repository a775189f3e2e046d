"""The command line, the only package that prints or exits: ``main`` is the click command."""
from .command import DEVICES, GATE_METRICS, default_output, main
from .process import _stdout_to_stderr, ignore_late_signals  # noqa: F401 - the tests redirect with it
from .run import (EXIT_CODES, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_OUTPUT, EXIT_REQUEST, EXIT_USAGE,
                  Run, report_json)

__all__ = ["DEVICES", "EXIT_CODES", "EXIT_GATE", "EXIT_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_OUTPUT",
           "EXIT_REQUEST", "EXIT_USAGE", "GATE_METRICS", "Run", "default_output", "ignore_late_signals", "main",
           "report_json"]
