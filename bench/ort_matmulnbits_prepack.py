"""onnxruntime's bug behind issue 31's "q4f16 is wrong below ORT_ENABLE_ALL", reduced to one node.

    pip install onnx onnxruntime==1.32.0 && python3 bench/ort_matmulnbits_prepack.py

Minimal reproduction: onnxruntime CPU MatMulNBits(accuracy_level=4) computes wrong results when its
`scales` input is not a constant initializer at session-creation time (B is prepacked without the scales).
In an fp16 model this happens automatically: the CPU EP has no fp16 Mul/Add kernels, so InsertCastTransformer
runs the Mul -> MatMulNBits -> Add island in fp32 and feeds MatMulNBits' scales through an inserted
Cast(fp16->fp32) node. Only ORT_ENABLE_ALL folds that Cast back into an initializer ("FusedBack_...")."""
import numpy as np, onnx, onnxruntime as ort
from onnx import helper as h, TensorProto as T, numpy_helper as nh
rng = np.random.default_rng(0)
LEVELS = [("ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL), ("ORT_ENABLE_BASIC", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
          ("ORT_ENABLE_EXTENDED", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED), ("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]
M, K, N, BS = 4, 64, 64, 32

def q4(W):  # W [K,N] -> B uint8 [N, K/BS, BS/2], scales [N*K/BS]; symmetric (default zero point 8)
    nb = K // BS; Wt = W.T.reshape(N, nb, BS)
    s = np.abs(Wt).max(-1) / 7.0
    q = np.clip(np.round(Wt / s[..., None]), -8, 7).astype(np.int32) + 8
    B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return B, s.astype(np.float16), ((q - 8) * s.astype(np.float16).astype(np.float32)[..., None]).reshape(N, K).T

W = rng.standard_normal((K, N)).astype(np.float32)
B, S, Wdq = q4(W)
mnb = lambda a, s, y, acc: h.make_node("MatMulNBits", [a, "B", s], [y], domain="com.microsoft", K=K, N=N, bits=4, block_size=BS, accuracy_level=acc)

def model_fp16(acc):
    # Y = (X * X) @ dequant(B)  + X     all fp16, 3 nodes
    nodes = [h.make_node("Mul", ["X", "X"], ["A"]), mnb("A", "S", "P", acc), h.make_node("Add", ["P", "X"], ["Y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", T.FLOAT16, [M, K])], [h.make_tensor_value_info("Y", T.FLOAT16, [M, N])],
                     [nh.from_array(B, "B"), nh.from_array(S, "S")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=8)

def model_fp32_scales_input(acc):
    # fp32, single node, scales supplied as a graph input (not an initializer)
    g = h.make_graph([mnb("X", "S", "Y", acc)], "g",
                     [h.make_tensor_value_info("X", T.FLOAT, [M, K]), h.make_tensor_value_info("S", T.FLOAT, [S.size])],
                     [h.make_tensor_value_info("Y", T.FLOAT, [M, N])], [nh.from_array(B, "B")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=8)

def run(m, feeds, lvl, noprepack):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.graph_optimization_level = lvl
    if noprepack: so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float32)

print("onnxruntime", ort.__version__)
X16 = rng.standard_normal((M, K)).astype(np.float16); X = X16.astype(np.float32)
X32 = rng.standard_normal((M, K)).astype(np.float32)
cases = [("A: fp16 graph  X*X -> MatMulNBits(fp16 scales initializer) -> +X", model_fp16, {"X": X16}, (X * X) @ Wdq + X),
         ("B: fp32 graph  MatMulNBits with scales as graph input", model_fp32_scales_input, {"X": X32, "S": S.astype(np.float32).ravel()}, X32 @ Wdq)]
for title, mk, feeds, ref in cases:
    print(title)
    for acc in (0, 4):
        m = mk(acc)
        for name, lvl in LEVELS:
            for npk in (0, 1):
                y = run(m, feeds, lvl, npk)
                e = float(np.abs(y - ref).max() / np.abs(ref).max())
                print(f"  accuracy_level={acc} {name:<20} disable_prepacking={npk}  rel max err {e:.4f}  {'WRONG' if e > 0.05 else 'ok'}")
