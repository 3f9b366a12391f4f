"""The eval loss of a decoder ONNX file, computed as symb's trainer defines it,
with ONNX Runtime and Python's tokenizers (nothing of symb's own code).

usage: eval_loss.py MODEL.onnx TOKENIZER.json EVAL.txt BLOCK_SIZE EOS_ID

Each non-empty line of EVAL.txt is a document: its ids, then EOS_ID, joined
into one stream and cut into blocks of BLOCK_SIZE + 1 ids (the rest dropped);
each block's first BLOCK_SIZE ids are the input, its last BLOCK_SIZE the
labels. Prints {"loss": mean cross-entropy over every label, "blocks": n}.
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

model, tokenizer, eval_file, block, eos = sys.argv[1:6]
block, eos = int(block), int(eos)
tokenizer = Tokenizer.from_file(tokenizer)
stream = []
for line in open(eval_file, encoding="utf-8").read().splitlines():
    if line.strip():
        stream += tokenizer.encode(line).ids + [eos]
blocks = [stream[i : i + block + 1] for i in range(0, len(stream) - block, block + 1)]

session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
names = {i.name for i in session.get_inputs()}
total, count = 0.0, 0
for ids in blocks:
    feed = {"input_ids": np.array([ids[:-1]], np.int64)}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((1, block), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.arange(block, dtype=np.int64)[None]
    for p in pasts:
        feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
    logits = session.run(["logits"], feed)[0][0].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    total -= log_probs[np.arange(block), ids[1:]].sum()
    count += block
print(json.dumps({"loss": total / count, "blocks": len(blocks)}))
