"""Model sanity checks, run before any work on an input and on every output before it is written.

``check_model`` refuses (with the error class it is given, InputError by default) a model that the rest of
onnxprune could misread or crash on, naming the problem:

* not an ONNX model (no ir_version, graph or opset_import);
* sparse tensors anywhere (sparse initializers in any graph, ``Constant(sparse_value=...)``, sparse attributes):
  onnx does not validate their external data;
* tensors whose stored data disagrees with their dims and dtype (short, long or odd-length raw data, typed
  fields of the wrong length or kind), negative or overflowing dims, unknown ``data_type`` enums, two data fields,
  segments, external data that was not loaded (validated) by ``io.load_model``;
* duplicate initializer names, a name produced twice, a node input that nothing produces (dangling) or that is
  produced only later (a cycle or an unsorted graph);
* malformed attributes of the ops onnxprune analyses: a Constant without exactly one output and one value,
  Conv/ConvTranspose ``group`` < 1 or not dividing the channels, weights of rank < 3, negative pads, strides or
  dilations < 1, kernel shapes that disagree with the weight;
* whatever the ONNX checker (``check_model`` plus strict shape inference, i.e. ``full_check=True``) rejects.

The ONNX checker runs on a *skeleton* of the model: large float initializers (and main-graph ``Constant`` nodes
holding them) become graph inputs of the same type and shape, so the checker sees the same graph, types and
shapes without copying and re-parsing every weight (on a 30 M-weight model the full checker costs ~15 % of a
run, the skeleton ~1 %). Those tensors' own checks (data length, fields, dtype, dims) are done here, more
strictly than the checker does them (it only catches raw data that is too short).
"""
from __future__ import annotations

import onnx

from ..errors import InputError
from .checker import big_float, run_onnx_checker, skeleton
from .graphs import check_conv_channels, check_graphs
from .tensors import (DEFAULT_DOMAINS, MAX_DEPTH, MAX_ELEMENTS, MAXIMUM_PROTOBUF, SKELETON_MIN_BYTES, all_tensors,
                      check_external_entries, check_header, check_pending, check_sparse, check_strings,
                      check_tensor, iter_graphs, tensor_elements, tensor_places)

__all__ = ["check_model", "check_fields", "check_data", "big_float", "run_onnx_checker", "skeleton", "all_tensors",
           "check_external_entries", "check_header", "check_sparse", "check_strings", "check_tensor", "iter_graphs", "tensor_elements",
           "tensor_places", "DEFAULT_DOMAINS", "MAX_DEPTH", "MAX_ELEMENTS", "MAXIMUM_PROTOBUF", "SKELETON_MIN_BYTES"]


def check_model(model: onnx.ModelProto, where: str = "model", error=InputError, keep: dict | None = None,
                pending: dict | None = None) -> None:
    """Every check in this module, in order (``check_fields``, then ``check_data``); the first problem found is
    raised as ``error``."""
    check_fields(model, where, error)
    check_data(model, where, error, keep, pending)


def check_fields(model: onnx.ModelProto, where: str = "model", error=InputError) -> None:
    """The checks that read no tensor data (a loader runs them before it loads external data): the header, UTF-8
    in every string field, no sparse tensors."""
    check_header(model, where, error)
    check_strings(model, where, error)
    check_sparse(model, where, error)


def check_data(model: onnx.ModelProto, where: str = "model", error=InputError, keep: dict | None = None,
               pending: dict | None = None) -> None:
    """The checks after ``check_fields``: every tensor's data, the graphs, the ONNX checker.

    ``keep``: a dict that receives, for every main-graph initializer stored in ``raw_data``, name -> the bytes the
    check read (protobuf copies ``raw_data`` on every access: a caller that reads the weights next uses these);
    entries it already holds are taken as those tensors' raw_data (``wire.initializer_data`` of the file read).
    ``pending``: main-graph initializer name -> the array that replaces its (empty) raw_data when it is saved
    (``io.LoadedModel.pending``); checked against the tensor's dims and type instead."""
    try:
        _check_data(model, where, error, keep, pending or {})
    except UnicodeDecodeError as exc:  # check_strings covers every field; this is a second net
        raise error(f"{where}: invalid UTF-8 in a string field ({exc.reason})") from None


def _check_data(model, where, error, keep, pending) -> None:
    own = keep is not None or pending
    if own:
        for tensor in model.graph.initializer:
            what = f"{where}: initializer '{tensor.name}' (graph)"
            if tensor.name in pending:
                check_pending(tensor, pending[tensor.name], what, error)
                continue
            raw = check_tensor(tensor, what, error, raw=keep.get(tensor.name) if keep is not None else None)
            if keep is not None:
                if raw is not None:
                    keep[tensor.name] = raw
                else:
                    keep.pop(tensor.name, None)
    for tensor, what in all_tensors(model, main_initializers=not own):
        check_tensor(tensor, f"{where}: {what}", error)
    convs = check_graphs(model, where, error)
    shapes = run_onnx_checker(model, where, error)
    check_conv_channels(convs, shapes, where, error)
