"""Runs a decoder ONNX file (transformers.js's GPT-2 layout) with ONNX Runtime.

usage: run_onnx.py MODEL.onnx REQUEST.json
REQUEST: {"prompts": [[ids...], ...], "max_new_tokens": N}
Prints JSON: for each prompt, "prefill" (logits of every position in one
pass from an empty past), "stepped" (the same, one token at a time through
the KV cache), "greedy" (N ids decoded with the cache); and "padded": the
prompts as one left-padded batch, the logits of each prompt's positions.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
request = json.load(open(sys.argv[2]))
pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
heads, head_dim = pasts[0].shape[1], pasts[0].shape[3]
assert isinstance(heads, int) and isinstance(head_dim, int), "numeric heads and head_dim"
outputs = [o.name for o in session.get_outputs()]
assert outputs[0] == "logits"


def empty(batch):
    return {p.name: np.zeros((batch, heads, 0, head_dim), np.float32) for p in pasts}


def run(ids, mask, positions, past):
    feed = {"input_ids": np.array(ids, np.int64), "attention_mask": np.array(mask, np.int64), "position_ids": np.array(positions, np.int64)}
    feed.update(past)
    result = session.run(outputs, feed)
    present = {name.replace("present.", "past_key_values."): value for name, value in zip(outputs[1:], result[1:])}
    return result[0], present


report = {"cases": []}
for prompt in request["prompts"]:
    n = len(prompt)
    prefill, _ = run([prompt], [[1] * n], [list(range(n))], empty(1))
    stepped, past = [], empty(1)
    for i, token in enumerate(prompt):
        logits, past = run([[token]], [[1] * (i + 1)], [[i]], past)
        stepped.append(logits[0, 0].tolist())
    greedy, past, logits = [], empty(1), prefill
    ids, position = prompt, 0
    logits, past = run([ids], [[1] * n], [list(range(n))], past)
    total = n
    for _ in range(request["max_new_tokens"]):
        token = int(np.argmax(logits[0, -1]))
        greedy.append(token)
        total += 1
        logits, past = run([[token]], [[1] * total], [[total - 1]], past)
    report["cases"].append({"prefill": prefill[0].tolist(), "stepped": stepped, "greedy": greedy})

# Left padding: one batch, shorter prompts padded on the left with id 0.
longest = max(len(p) for p in request["prompts"])
ids = [[0] * (longest - len(p)) + p for p in request["prompts"]]
mask = [[0] * (longest - len(p)) + [1] * len(p) for p in request["prompts"]]
positions = [[max(0, j - (longest - len(p))) for j in range(longest)] for p in request["prompts"]]
logits, _ = run(ids, mask, positions, empty(len(ids)))
report["padded"] = [logits[b, longest - len(p):].tolist() for b, p in enumerate(request["prompts"])]
print(json.dumps(report))
