"""The console script's entry point: Ctrl-C while the CLI's modules import exits 130 with one line, no traceback."""
import os
import sys


def main():
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("onnxprune: interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # nothing is staged yet; a half-imported native module may not survive interpreter shutdown
    try:
        return cli_main()
    finally:
        from .cli import ignore_late_signals
        ignore_late_signals()
