"""Make the small untrained sample models that exercise validation on real-export shapes (offline, no torch).

Their weights are seeded random numbers: they test what onnxprune compares and how it feeds a model, not accuracy.
Run: python sample_models/make_shape_samples.py   (writes next to this file; byte-identical on every run)

  detector.onnx   YOLO-style raw head: images [N, 3, height, width] (dynamic H/W), SiLU convs, box and class
                  branches joined by Concat into output0 [N, 4 + 3, A]
  encoder.onnx    a one-block token-id transformer: input_ids and attention_mask [batch, sequence] (int64),
                  embedding Gather, attention with a mask bias, LayerNorm, FFN; outputs input_ids passed through
                  (first), last_hidden_state [batch, sequence, 16] and an L2-normalised sentence_embedding [batch, 16]
  vad.onnx        a Silero-VAD-like recurrent step: input [batch, 64], state [2, batch, 32] (batch on axis 1),
                  sr (int64 scalar); outputs a speech probability [batch, 1] and the next state
  segmenter.onnx  a DBNet-like map: x [N, 1, 16, 16] -> Relu(conv) map [N, 1, 16, 16]
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET, IR = 17, 10


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _w(rng, *shape, fan_in=None):
    fan_in = fan_in or int(np.prod(shape[1:])) or 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _save(graph, name, metadata=None):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-samples")
    m.ir_version = IR
    for k, v in (metadata or {}).items():
        helper.set_model_props(m, {k: v})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, os.path.join(HERE, name))


def detector(rng):
    n = helper.make_node
    inits = [_init("stem.w", _w(rng, 8, 3, 3, 3)), _init("stem.b", np.zeros(8, np.float32)),
             _init("down.w", _w(rng, 16, 8, 3, 3)), _init("down.b", np.zeros(16, np.float32)),
             _init("box.w", _w(rng, 4, 16, 1, 1)), _init("box.b", np.full(4, 0.5, np.float32)),
             _init("cls.w", _w(rng, 3, 16, 1, 1)), _init("cls.b", np.zeros(3, np.float32)),
             _init("head_shape", np.array([0, 7, -1], np.int64))]
    nodes = [n("Conv", ["images", "stem.w", "stem.b"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem"),
             n("Sigmoid", ["c1"], ["s1"]), n("Mul", ["c1", "s1"], ["a1"]),  # SiLU as exporters write it
             n("Conv", ["a1", "down.w", "down.b"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="down"),
             n("Sigmoid", ["c2"], ["s2"]), n("Mul", ["c2", "s2"], ["a2"]),
             n("Conv", ["a2", "box.w", "box.b"], ["box"], name="box_head"),
             n("Conv", ["a2", "cls.w", "cls.b"], ["cls_logits"], name="cls_head"),
             n("Sigmoid", ["cls_logits"], ["cls"]),
             n("Concat", ["box", "cls"], ["head"], axis=1),
             n("Reshape", ["head", "head_shape"], ["output0"])]
    g = helper.make_graph(nodes, "detector",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "height", "width"])],
                          [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 7, "anchors"])], inits)
    _save(g, "detector.onnx")


def encoder(rng, vocab=100, d=16, ff=32):
    n = helper.make_node
    inits = [_init("embed.weight", (rng.standard_normal((vocab, d)) * 0.5).astype(np.float32)),
             _init("q.weight", _w(rng, d, d)), _init("k.weight", _w(rng, d, d)), _init("v.weight", _w(rng, d, d)),
             _init("o.weight", _w(rng, d, d)), _init("ff1.weight", _w(rng, d, ff)), _init("ff2.weight", _w(rng, ff, d)),
             _init("ln.gamma", np.ones(d, np.float32)), _init("ln.beta", np.zeros(d, np.float32)),
             _init("scale", np.array(1 / np.sqrt(d), np.float32)), _init("one", np.array(1.0, np.float32)),
             _init("neg", np.array(-1e4, np.float32)), _init("axes1", np.array([1], np.int64))]
    nodes = [n("Identity", ["input_ids"], ["input_ids_out"]),  # exporters often pass an input through first
             n("Gather", ["embed.weight", "input_ids"], ["emb"]),
             n("MatMul", ["emb", "q.weight"], ["q"], name="q_proj"),
             n("MatMul", ["emb", "k.weight"], ["k"], name="k_proj"),
             n("MatMul", ["emb", "v.weight"], ["v"], name="v_proj"),
             n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             n("MatMul", ["q", "kt"], ["qk"]), n("Mul", ["qk", "scale"], ["qks"]),
             n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             n("Sub", ["one", "maskf"], ["inv"]), n("Mul", ["inv", "neg"], ["bias2"]),
             n("Unsqueeze", ["bias2", "axes1"], ["bias3"]),
             n("Add", ["qks", "bias3"], ["scores"]), n("Softmax", ["scores"], ["attn"], axis=-1),
             n("MatMul", ["attn", "v"], ["ctx"]),
             n("MatMul", ["ctx", "o.weight"], ["proj"], name="o_proj"),
             n("Add", ["emb", "proj"], ["res1"]),
             n("LayerNormalization", ["res1", "ln.gamma", "ln.beta"], ["h1"], axis=-1),
             n("MatMul", ["h1", "ff1.weight"], ["f1"], name="ff1"), n("Relu", ["f1"], ["f1r"]),
             n("MatMul", ["f1r", "ff2.weight"], ["f2"], name="ff2"),
             n("Add", ["h1", "f2"], ["last_hidden_state"]),
             n("ReduceMean", ["last_hidden_state"], ["pooled"], axes=[1], keepdims=0),
             n("LpNormalization", ["pooled"], ["sentence_embedding"], axis=-1, p=2)]
    seq = ["batch", "sequence"]
    g = helper.make_graph(nodes, "encoder",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, seq)],
                          [helper.make_tensor_value_info("input_ids_out", TensorProto.INT64, seq),
                           helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, seq + [d]),
                           helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", d])],
                          inits)
    _save(g, "encoder.onnx")


def vad(rng, width=64, hidden=32):
    n = helper.make_node
    inits = [_init("in.weight", _w(rng, width, hidden)), _init("rec.weight", _w(rng, hidden, hidden)),
             _init("rec2.weight", _w(rng, hidden, hidden)), _init("out.weight", _w(rng, hidden, 1)),
             _init("out.bias", np.zeros(1, np.float32)), _init("rate_ref", np.array(16000.0, np.float32)),
             _init("i0", np.array(0, np.int64)), _init("i1", np.array(1, np.int64)),
             _init("ax0", np.array([0], np.int64))]
    nodes = [n("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT), n("Div", ["srf", "rate_ref"], ["gain"]),
             n("Mul", ["input", "gain"], ["x"]),  # the scalar sample rate scales the chunk
             n("Gather", ["state", "i0"], ["h_prev"], axis=0), n("Gather", ["state", "i1"], ["c_prev"], axis=0),
             n("MatMul", ["x", "in.weight"], ["xi"], name="input_proj"),
             n("MatMul", ["h_prev", "rec.weight"], ["hr"], name="recurrent"),
             n("Add", ["xi", "hr"], ["pre"]), n("Tanh", ["pre"], ["h"]),
             n("MatMul", ["c_prev", "rec2.weight"], ["cr"], name="recurrent2"),
             n("Add", ["h", "cr"], ["c_pre"]), n("Tanh", ["c_pre"], ["c"]),
             n("Unsqueeze", ["h", "ax0"], ["h3"]), n("Unsqueeze", ["c", "ax0"], ["c3"]),
             n("Concat", ["h3", "c3"], ["stateN"], axis=0),
             n("Gemm", ["c", "out.weight", "out.bias"], ["logit"], name="classifier"),
             n("Sigmoid", ["logit"], ["output"])]
    g = helper.make_graph(nodes, "vad",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
                           helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", hidden])], inits)
    _save(g, "vad.onnx")


def segmenter(rng):
    n = helper.make_node
    inits = [_init("c1.w", _w(rng, 8, 1, 3, 3)), _init("c1.b", np.full(8, 0.1, np.float32)),
             _init("c2.w", _w(rng, 8, 8, 3, 3)), _init("c2.b", np.full(8, 0.1, np.float32)),
             _init("c3.w", _w(rng, 1, 8, 1, 1)), _init("c3.b", np.full(1, 0.05, np.float32))]
    nodes = [n("Conv", ["x", "c1.w", "c1.b"], ["a"], pads=[1, 1, 1, 1], name="c1"), n("Relu", ["a"], ["ar"]),
             n("Conv", ["ar", "c2.w", "c2.b"], ["b"], pads=[1, 1, 1, 1], name="c2"), n("Relu", ["b"], ["br"]),
             n("Conv", ["br", "c3.w", "c3.b"], ["c"], name="c3"), n("Relu", ["c"], ["map"])]
    g = helper.make_graph(nodes, "segmenter",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                          [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 16, 16])], inits)
    _save(g, "segmenter.onnx")


def main():
    rng = np.random.default_rng(0)
    detector(rng)
    encoder(rng)
    vad(rng)
    segmenter(rng)


if __name__ == "__main__":
    main()
