"""Reading and writing models without losing anything: every check before any work, atomic publication.

Loading (``model``): the file must be a regular file; the model is parsed, checked (``checks.check_model``:
structure, tensors, attributes, the ONNX checker) and its external data loaded through onnx's validated reader
(relative, no '..', no symlink or hardlink, inside the model's directory, in bounds), training_info included.

Writing (``staging``, ``save``): every file is staged next to its destination under a recognisable name
(``.onnxprune-staging-<pid>-<host>-<random>``), fsynced, then renamed into place; staging is removed on every
exit path (``Interrupted``/``KeyboardInterrupt`` included), and stale staging of dead runs on this host is
removed by the next run into that directory. External data is written under a content-addressed name
(``<output>.<16 hex of its sha256>.data``), published before the model that references it, and the previous
output's data file is removed only after the model is replaced (and only if it matched that naming and was
referenced by the replaced model). A replaced file keeps its mode; new files follow the umask.
"""
from .model import (FLOAT_TYPES, ExternalInfo, LoadedModel, check_structure, hold, load_model, read_tensor,
                    write_tensor)
from .save import Staged, save_model, stage_model, trim_heap
from .staging import (DATA_SUFFIX, STAGING_PREFIX, atomic_write_bytes, check_output_path, check_write_target,
                      check_write_targets, clean_stale_staging, deferred_signals, is_staging_name,
                      remove_live_staging)

__all__ = ["FLOAT_TYPES", "ExternalInfo", "LoadedModel", "check_structure", "hold", "load_model", "read_tensor",
           "write_tensor", "Staged", "save_model", "stage_model", "trim_heap", "DATA_SUFFIX", "STAGING_PREFIX",
           "atomic_write_bytes", "check_output_path", "check_write_target", "check_write_targets",
           "clean_stale_staging", "deferred_signals", "is_staging_name", "remove_live_staging"]
