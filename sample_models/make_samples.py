"""Make the sample models and their held-out test sets from scikit-learn's digits data (offline).

Training uses PyTorch (optional: `pip install torch==2.13.0 scikit-learn`); the ONNX graphs are written by hand
with onnx.helper so BatchNormalization stays a separate node and every layout is what we say it is.
Run: python sample_models/make_samples.py   (writes next to this file; deterministic on one machine)

  mlp_gemm.onnx    MLP 64-64-32-10, Gemm with transB=1 (PyTorch Linear layout, weights [out, in])
  mlp_matmul.onnx  the same weights as MatMul + Add (Keras/TF layout, weights [in, out])
  cnn.onnx         Conv+BN+ReLU, depthwise Conv+BN, 1x1 Conv+BN, residual Add, a Conv branch joined by Concat,
                   MaxPool, Flatten, two Gemm layers
  cnn_torch.onnx   a small CNN exported by torch.onnx.export itself (dynamo exporter: BN folded into the conv,
                   generated node names, Reshape for flatten, dynamic batch): what real PyTorch exports look like
                   (needs onnxscript too)
  digits_mlp_test.npz / digits_cnn_test.npz   held-out test sets: x (float32) and y (int64)
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET, IR = 17, 10


def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:500], order[500:]
    return x[train], y[train], x[test], y[test]


def train(module, x, y, epochs, lr=3e-3):
    import torch
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        module.train()
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(module(xt[idx]), yt[idx]).backward()
            opt.step()
    module.eval()
    return module


def arr(t):
    return t.detach().numpy().astype(np.float32)


def save(model, name):
    model.ir_version = IR
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.path.join(HERE, name))


def mlp_models(xtr, ytr):
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    train(net, xtr, ytr, epochs=60)
    lin = [m for m in net if isinstance(m, torch.nn.Linear)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    # Gemm, transB=1
    inits, nodes, prev = [], [], "x"
    for i, m in enumerate(lin, 1):
        inits += [numpy_helper.from_array(arr(m.weight), f"fc{i}.weight"), numpy_helper.from_array(arr(m.bias), f"fc{i}.bias")]
        out = "logits" if i == len(lin) else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [out if i == len(lin) else f"z{i}"],
                                      name=f"fc{i}", transB=1))
        if i < len(lin):
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out], name=f"relu{i}"))
        prev = out
    g = helper.make_graph(nodes, "mlp_gemm", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-samples",
                          doc_string="digits MLP, Gemm layout")
    save(m, "mlp_gemm.onnx")
    # MatMul + Add, weights [in, out]
    inits, nodes, prev = [], [], "x"
    for i, m in enumerate(lin, 1):
        inits += [numpy_helper.from_array(np.ascontiguousarray(arr(m.weight).T), f"dense{i}/kernel"),
                  numpy_helper.from_array(arr(m.bias), f"dense{i}/bias")]
        nodes.append(helper.make_node("MatMul", [prev, f"dense{i}/kernel"], [f"mm{i}"], name=f"dense{i}/MatMul"))
        last = i == len(lin)
        nodes.append(helper.make_node("Add", [f"mm{i}", f"dense{i}/bias"], ["logits" if last else f"z{i}"],
                                      name=f"dense{i}/BiasAdd"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"], name=f"dense{i}/Relu"))
        prev = f"h{i}"
    g = helper.make_graph(nodes, "mlp_matmul", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-samples",
                          doc_string="digits MLP, MatMul layout")
    save(m, "mlp_matmul.onnx")


def cnn_model(xtr, ytr):
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
            self.pw, self.bn3 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.branch = nn.Conv2d(16, 8, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(24 * 16, 32), nn.Linear(32, 10)

        def forward(self, x):
            a1 = torch.relu(self.bn1(self.conv1(x)))
            a2 = torch.relu(self.bn2(self.dw(a1)))
            r = torch.relu(self.bn3(self.pw(a2)) + a1)
            c = torch.relu(self.branch(r))
            h = torch.nn.functional.max_pool2d(torch.cat([r, c], 1), 2).flatten(1)
            return self.fc2(torch.relu(self.fc1(h)))

    torch.manual_seed(0)
    net = train(Net(), xtr.reshape(-1, 1, 8, 8), ytr, epochs=40)
    inits = []

    def init(name, t):
        inits.append(numpy_helper.from_array(arr(t) if not isinstance(t, np.ndarray) else t, name))
        return name

    def bn(name, mod, inp, out):
        return helper.make_node("BatchNormalization", [inp, init(f"{name}.weight", mod.weight), init(f"{name}.bias", mod.bias),
                                                       init(f"{name}.running_mean", mod.running_mean),
                                                       init(f"{name}.running_var", mod.running_var)],
                                [out], name=name, epsilon=mod.eps)
    n = [
        helper.make_node("Conv", ["x", init("conv1.weight", net.conv1.weight)], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn("bn1", net.bn1, "c1", "b1"), helper.make_node("Relu", ["b1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", init("dw.weight", net.dw.weight)], ["c2"], name="dw", pads=[1, 1, 1, 1], group=16),
        bn("bn2", net.bn2, "c2", "b2"), helper.make_node("Relu", ["b2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", init("pw.weight", net.pw.weight)], ["c3"], name="pw"),
        bn("bn3", net.bn3, "c3", "b3"),
        helper.make_node("Add", ["b3", "a1"], ["s"], name="residual"), helper.make_node("Relu", ["s"], ["r"], name="relu3"),
        helper.make_node("Conv", ["r", init("branch.weight", net.branch.weight), init("branch.bias", net.branch.bias)],
                         ["c4"], name="branch", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c4"], ["c"], name="relu4"),
        helper.make_node("Concat", ["r", "c"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", init("fc1.weight", net.fc1.weight), init("fc1.bias", net.fc1.bias)], ["z1"],
                         name="fc1", transB=1),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu5"),
        helper.make_node("Gemm", ["h1", init("fc2.weight", net.fc2.weight), init("fc2.bias", net.fc2.bias)], ["logits"],
                         name="fc2", transB=1),
    ]
    g = helper.make_graph(n, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-samples",
                          doc_string="digits CNN: BN, depthwise, residual Add, Concat")
    save(m, "cnn.onnx")


def torch_export_model(xtr, ytr):
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pw = nn.Conv2d(16, 24, 1)
            self.fc1, self.fc2 = nn.Linear(24 * 16, 32), nn.Linear(32, 10)

        def forward(self, x):
            a = torch.relu(self.bn1(self.conv1(x)))
            a = torch.relu(self.dw(a)) + a
            h = torch.nn.functional.max_pool2d(torch.relu(self.pw(a)), 2).flatten(1)
            return self.fc2(torch.relu(self.fc1(h)))

    torch.manual_seed(1)
    net = train(Net(), xtr.reshape(-1, 1, 8, 8), ytr, epochs=30)
    path = os.path.join(HERE, "cnn_torch.onnx")
    torch.onnx.export(net, (torch.from_numpy(xtr[:2].reshape(-1, 1, 8, 8)),), path, external_data=False,
                      dynamic_shapes=({0: "N"},), input_names=["x"], output_names=["logits"])
    m = onnx.load(path)
    m.ir_version = IR  # keep what ORT accepts, whatever the exporter's default
    onnx.save(m, path)


def accuracy(path, x, y):
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return float((s.run(None, {"x": x})[0].argmax(1) == y).mean())


def main():
    xtr, ytr, xte, yte = data()
    mlp_models(xtr, ytr)
    cnn_model(xtr, ytr)
    torch_export_model(xtr, ytr)
    np.savez_compressed(os.path.join(HERE, "digits_mlp_test.npz"), x=xte, y=yte)
    np.savez_compressed(os.path.join(HERE, "digits_cnn_test.npz"), x=xte.reshape(-1, 1, 8, 8), y=yte)
    for name, xs in (("mlp_gemm.onnx", xte), ("mlp_matmul.onnx", xte), ("cnn.onnx", xte.reshape(-1, 1, 8, 8)),
                     ("cnn_torch.onnx", xte.reshape(-1, 1, 8, 8))):
        print(f"{name}: test accuracy {accuracy(os.path.join(HERE, name), xs, yte):.4f}")


if __name__ == "__main__":
    main()
