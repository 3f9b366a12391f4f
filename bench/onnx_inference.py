#!/usr/bin/env python3
"""Greedy decoding speed of decoder ONNX files in ONNX Runtime (2 threads):
64 new tokens with the KV cache after a 16-token prompt; prints a table.

    python3 bench/onnx_inference.py FILE.onnx [FILE.onnx ...]
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort


def speed(path, new_tokens=64, prompt=16):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    heads, head_dim = pasts[0].shape[1], pasts[0].shape[3]
    outputs = [o.name for o in session.get_outputs()]
    ids = list(range(100, 100 + prompt))
    feed = {p.name: np.zeros((1, heads, 0, head_dim), np.float32) for p in pasts}
    total, start = len(ids), time.perf_counter()
    tokens = ids
    for step in range(new_tokens + 1):
        feed.update({"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.arange(total - len(tokens), total, dtype=np.int64)[None]})
        result = session.run(outputs, feed)
        if step == 0:
            start = time.perf_counter()  # time the decoding steps, not the prefill
        tokens = [int(np.argmax(result[0][0, -1]))]
        total += 1
        feed = {name.replace("present.", "past_key_values."): value for name, value in zip(outputs[1:], result[1:])}
    return new_tokens / (time.perf_counter() - start)


print("| file | MB | tokens/s |")
print("|---|---|---|")
for path in sys.argv[1:]:
    print(f"| {path} | {os.path.getsize(path) / 1e6:.1f} | {speed(path):.1f} |")
