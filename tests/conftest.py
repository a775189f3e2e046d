import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "sample_models")
SAMPLE_MODELS = {
    "mlp_gemm": ("mlp_gemm.onnx", "digits_mlp_test.npz"),
    "mlp_matmul": ("mlp_matmul.onnx", "digits_mlp_test.npz"),
    "cnn": ("cnn.onnx", "digits_cnn_test.npz"),
    "cnn_torch": ("cnn_torch.onnx", "digits_cnn_test.npz"),  # exported by torch.onnx.export itself
}


def sample(name):
    model, data = SAMPLE_MODELS[name]
    return os.path.join(SAMPLES, model), os.path.join(SAMPLES, data)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, **kw):
    """An ONNX model ORT 1.31 accepts: IR 10, opset 17."""
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)
    m.ir_version = 10
    return m


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def run(model_or_path, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def weights(model):
    """name -> array of every initializer and Constant(value) tensor in the main graph."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def two_layer_mlp(rng=None, dtype=np.float32, hidden=16):
    rng = rng or np.random.default_rng(0)
    w1 = rng.standard_normal((8, hidden)).astype(dtype)
    w2 = rng.standard_normal((hidden, 4)).astype(dtype)
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if dtype is not None else TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", ["N", 8], tp)], [vi("y", ["N", 4], tp)], [init("w1", w1), init("w2", w2)])


@pytest.fixture
def tmp_model(tmp_path):
    def save(model, name="model.onnx"):
        path = str(tmp_path / name)
        onnx.save(model, path)
        return path
    return save


@pytest.fixture
def cnn(tmp_path):
    """A private copy of the sample CNN (so outputs land in tmp_path)."""
    import shutil
    path = str(tmp_path / "cnn.onnx")
    shutil.copy(sample("cnn")[0], path)
    return path


def invoke(*args):
    from click.testing import CliRunner
    from onnxprune.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def fail_rename_to(monkeypatch, dest):
    """Make every os.replace onto ``dest`` fail with EIO (a disk error at the moment of publishing)."""
    real = os.replace

    def boom(src, dst):
        if str(dst) == str(dest):
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", boom)
