"""``python -m onnxprune.cli``: the command, then late signals ignored while the interpreter exits."""
from . import ignore_late_signals, main

try:
    main()
finally:
    ignore_late_signals()
