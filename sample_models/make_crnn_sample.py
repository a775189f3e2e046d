"""Make the CRNN-like sample (crnn.onnx) and its test lines (crnn_test.npz), offline, from synthetic text lines.

The "script" is 10 random binary 8x6 glyphs (classes 1..10; 0 is the CTC blank), drawn 2x (16x12 px) on a grey
32x128 line with 4-12 px gaps, random contrast, corrupted glyph cells and dark specks. The model reads a line as
a sequence of 32 columns (4 px each) and predicts one class per column, trained with a per-position cross-entropy
on aligned targets (a glyph's label on the 4-px columns it covers at least 3 px of, the blank elsewhere), so greedy CTC decoding
(argmax, collapse repeats, drop blanks) gives the line's text.

Training uses PyTorch (optional, CPU is enough: `pip install torch==2.13.0`); the ONNX graph is written by hand
with onnx.helper (IR 10, opset 17) so every layout is what we say it is. Nothing here is downloaded.
Run: python sample_models/make_crnn_sample.py   (writes next to this file; deterministic on one machine)

  crnn.onnx       x [N, 1, 32, 128] -> probs [N, 32, 11] (softmax over classes, blank = 0):
                  conv1 3x3 16 + BatchNormalization + Relu
                  conv2 3x3/2 32 + BatchNormalization + Relu
                  dw 3x3 depthwise (group=32, BN folded into its bias) + Relu, pw 1x1 32 + BatchNormalization,
                      residual Add with conv2's output, Relu
                  conv3 3x3/2 48 (BN folded) + Relu, MaxPool (2, 1)                      -> [N, 48, 4, 32]
                  Reshape [N, 192, 32], Transpose -> [T, N, 192] (time-first, as ONNX LSTM reads it)
                  proj MatMul 192x64 + Add + Relu, bidirectional LSTM (hidden 32)     -> [T, 2, N, 32]
                  Transpose + Reshape -> [N, T, 64], classifier MatMul 64x11 + Add, Softmax
  crnn_test.npz   200 held-out lines: x (float32 [200, 1, 32, 128]) and y (int64 [200, 32], per-position labels)
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET, IR = 17, 10
H, W, STRIDE = 32, 128, 4  # input height/width; one output position per 4 columns
T = W // STRIDE
GLYPHS, GH, GW, SCALE = 10, 8, 6, 2  # 10 glyph classes (1..10), 8x6 cells drawn 2x
CLASSES = GLYPHS + 1  # + blank (0)
N_TEST = 200


def glyph_set(seed=7):
    """10 random binary 8x6 glyphs, about half ink, pairwise at least 16 cells apart."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < GLYPHS:
        g = rng.random((GH, GW)) < 0.5
        if all((g != o).sum() >= 16 for o in out):
            out.append(g)
    return np.stack(out)


def lines(n, seed, glyphs):
    """n synthetic text lines: images [n, 1, H, W] (values k/255), per-position labels [n, T], texts (lists)."""
    rng = np.random.default_rng(seed)
    gw, gh = GW * SCALE, GH * SCALE
    xs = np.empty((n, 1, H, W), np.float32)
    ys = np.zeros((n, T), np.int64)
    texts = []
    for i in range(n):
        k = int(rng.integers(3, 8))
        gaps = rng.choice([4, 8, 12], size=k - 1)
        while k * gw + gaps.sum() > W - 8:
            gaps = np.maximum(gaps - 4, 4)
        span = k * gw + int(gaps.sum())
        x0 = int(rng.integers(0, W - span + 1))
        bg, ink = rng.uniform(0.65, 1.0), rng.uniform(0.0, 0.4)
        img = np.full((H, W), bg)
        text = [int(c) for c in rng.integers(1, GLYPHS + 1, size=k)]
        cov = np.zeros((T, CLASSES))  # pixels of each class in each 4-px column group
        x = x0
        for j, c in enumerate(text):
            cells = glyphs[c - 1] ^ (rng.random((GH, GW)) < 0.06)  # corrupt ~6% of the glyph's cells
            pix = np.kron(cells, np.ones((SCALE, SCALE), bool))
            y0 = int(rng.integers(4, H - gh - 4 + 1))
            img[y0:y0 + gh, x:x + gw] = np.where(pix, ink, bg)
            for col in range(x, x + gw):
                cov[col // STRIDE, c] += 1
            x += gw + (int(gaps[j]) if j < k - 1 else 0)
        specks = rng.random((H, W)) < 0.02
        img[specks] = ink
        xs[i, 0] = np.round(img * 255) / 255
        ys[i] = np.where(cov.max(1) >= 3, cov.argmax(1), 0)  # a glyph's label where it covers >= 3 of 4 columns
        texts.append(text)
    return xs, ys, texts


def greedy_decode(probs, blank=0):
    out = []
    for seq in probs.argmax(-1):
        s, prev = [], None
        for c in seq.tolist():
            if c != prev and c != blank:
                s.append(c)
            prev = c
        out.append(s)
    return out


def build_torch():
    import torch
    import torch.nn as nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
            self.dw, self.bn_dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32)
            self.pw, self.bn_pw = nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32)
            self.conv3, self.bn3 = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48)
            self.proj = nn.Linear(192, 64)
            self.lstm = nn.LSTM(64, 32, bidirectional=True)  # time-first
            self.cls = nn.Linear(64, CLASSES)

        def forward(self, x):  # -> logits [N, T, C]
            a1 = torch.relu(self.bn1(self.conv1(x)))
            a2 = torch.relu(self.bn2(self.conv2(a1)))
            d = torch.relu(self.bn_dw(self.dw(a2)))
            r = torch.relu(self.bn_pw(self.pw(d)) + a2)
            a3 = torch.nn.functional.max_pool2d(torch.relu(self.bn3(self.conv3(r))), (2, 1))
            seq = a3.reshape(a3.shape[0], 192, -1).permute(2, 0, 1)  # [T, N, 192]
            h, _ = self.lstm(torch.relu(self.proj(seq)))  # [T, N, 64]
            return self.cls(h).permute(1, 0, 2)

    return CRNN()


def train(net, glyphs, n_train=12000, epochs=14, seed=0):
    import torch
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    xtr, ytr, _ = lines(n_train, seed=1, glyphs=glyphs)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((n_train + 63) // 64))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        tot = 0.0
        for idx in torch.randperm(n_train, generator=g).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]).reshape(-1, CLASSES), yt[idx].reshape(-1))
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss) * len(idx)
        print(f"epoch {ep + 1}/{epochs}: loss {tot / n_train:.4f}", flush=True)
    net.eval()
    return net


def to_onnx(net):
    import torch
    inits = []

    def a(t):
        return t.detach().numpy().astype(np.float32) if isinstance(t, torch.Tensor) else np.asarray(t)

    def init(name, t):
        inits.append(numpy_helper.from_array(a(t), name))
        return name

    def bn(name, mod, inp, out):
        return helper.make_node("BatchNormalization", [inp, init(f"{name}.weight", mod.weight),
                                                       init(f"{name}.bias", mod.bias),
                                                       init(f"{name}.running_mean", mod.running_mean),
                                                       init(f"{name}.running_var", mod.running_var)],
                                [out], name=name, epsilon=mod.eps)

    def folded(conv, bnm):  # conv weight and bias with the BatchNormalization folded in
        s = a(bnm.weight) / np.sqrt(a(bnm.running_var) + bnm.eps)
        return (a(conv.weight) * s[:, None, None, None]).astype(np.float32), \
            (a(bnm.bias) - a(bnm.running_mean) * s).astype(np.float32)

    dw_w, dw_b = folded(net.dw, net.bn_dw)
    c3_w, c3_b = folded(net.conv3, net.bn3)
    # LSTM: torch gates (i, f, g, o) -> ONNX (i, o, f, c); W [dirs, 4H, in], R [dirs, 4H, H], B [dirs, 8H]
    order = [0, 3, 1, 2]
    hs = net.lstm.hidden_size

    def gates(w):
        return np.concatenate([w[k * hs:(k + 1) * hs] for k in order])

    Ws, Rs, Bs = [], [], []
    for sfx in ("", "_reverse"):
        Ws.append(gates(a(getattr(net.lstm, "weight_ih_l0" + sfx))))
        Rs.append(gates(a(getattr(net.lstm, "weight_hh_l0" + sfx))))
        Bs.append(np.concatenate([gates(a(getattr(net.lstm, "bias_ih_l0" + sfx))),
                                  gates(a(getattr(net.lstm, "bias_hh_l0" + sfx)))]))
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", init("conv1.weight", net.conv1.weight)], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn("bn1", net.bn1, "c1", "b1"), mk("Relu", ["b1"], ["a1"], name="relu1"),
        mk("Conv", ["a1", init("conv2.weight", net.conv2.weight)], ["c2"], name="conv2", pads=[1, 1, 1, 1],
           strides=[2, 2]),
        bn("bn2", net.bn2, "c2", "b2"), mk("Relu", ["b2"], ["a2"], name="relu2"),
        mk("Conv", ["a2", init("dw.weight", dw_w), init("dw.bias", dw_b)], ["cd"], name="dw", pads=[1, 1, 1, 1],
           group=32),
        mk("Relu", ["cd"], ["d"], name="relu_dw"),
        mk("Conv", ["d", init("pw.weight", net.pw.weight)], ["cp"], name="pw"),
        bn("bn_pw", net.bn_pw, "cp", "bp"),
        mk("Add", ["bp", "a2"], ["s"], name="residual"), mk("Relu", ["s"], ["r"], name="relu_res"),
        mk("Conv", ["r", init("conv3.weight", c3_w), init("conv3.bias", c3_b)], ["c3"], name="conv3",
           pads=[1, 1, 1, 1], strides=[2, 2]),
        mk("Relu", ["c3"], ["a3"], name="relu3"),
        mk("MaxPool", ["a3"], ["p3"], name="pool", kernel_shape=[2, 1], strides=[2, 1]),
        mk("Reshape", ["p3", init("seq_shape", np.array([0, 192, -1], np.int64))], ["f"], name="to_seq"),
        mk("Transpose", ["f"], ["tnc"], name="time_first", perm=[2, 0, 1]),
        mk("MatMul", ["tnc", init("proj.weight", a(net.proj.weight).T.copy())], ["pm"], name="proj"),
        mk("Add", ["pm", init("proj.bias", net.proj.bias)], ["pa"], name="proj_bias"),
        mk("Relu", ["pa"], ["ph"], name="relu_proj"),
        mk("LSTM", ["ph", init("lstm.W", np.stack(Ws)), init("lstm.R", np.stack(Rs)), init("lstm.B", np.stack(Bs))],
           ["lstm_y"], name="lstm", hidden_size=hs, direction="bidirectional"),
        mk("Transpose", ["lstm_y"], ["ly"], name="batch_first", perm=[2, 0, 1, 3]),  # [N, T, 2, H]
        mk("Reshape", ["ly", init("feat_shape", np.array([0, 0, 2 * hs], np.int64))], ["feat"], name="merge_dirs"),
        mk("MatMul", ["feat", init("cls.weight", a(net.cls.weight).T.copy())], ["cm"], name="cls"),
        mk("Add", ["cm", init("cls.bias", net.cls.bias)], ["logits"], name="cls_bias"),
        mk("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    g = helper.make_graph(nodes, "crnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, H, W])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", T, CLASSES])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-samples",
                          doc_string="CRNN-like text-line recognizer: conv stem (BN, depthwise, residual), "
                                     "bidirectional LSTM, per-position softmax [N, T, C], blank = 0")
    m.ir_version = IR
    onnx.checker.check_model(m, full_check=True)
    return m


def main():
    import onnxruntime as ort
    import torch
    glyphs = glyph_set()
    net = train(build_torch(), glyphs)
    model = to_onnx(net)
    path = os.path.join(HERE, "crnn.onnx")
    onnx.save(model, path)
    xte, yte, texts = lines(N_TEST, seed=2, glyphs=glyphs)
    np.savez_compressed(os.path.join(HERE, "crnn_test.npz"), x=xte, y=yte)
    probs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": xte})[0]
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(xte)), -1).numpy()
    dec = greedy_decode(probs)
    print(f"crnn.onnx: {os.path.getsize(path)} bytes; max |ORT - torch| {np.abs(probs - ref).max():.2e}")
    print(f"per-position accuracy {(probs.argmax(-1) == yte).mean():.4f}; "
          f"labels decode to the text on {np.mean([greedy_decode(np.eye(CLASSES)[y][None])[0] == t for y, t in zip(yte, texts)]):.3f} "
          f"of lines; greedy decoding matches the text on {np.mean([d == t for d, t in zip(dec, texts)]):.4f} of lines")


if __name__ == "__main__":
    main()
