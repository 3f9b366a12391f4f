"""Runs a model card's PEFT snippet in the output folder, as a user would,
and compares the model it builds (the base plus symb's adapter, put together
by PEFT) with the folder's merged model, both in PyTorch.

usage: peft_adapter.py DIST SNIPPET.py TEXT...
prints {"max_abs_error": ..., "top1_agreement": ..., "positions": ..., "vocab": [peft, merged]}
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

dist, snippet, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
code = open(snippet).read()
os.chdir(dist)
scope = {}
exec(code, scope)
model = scope["model"].eval()
merged = AutoModelForCausalLM.from_pretrained(".").eval()
tokenizer = AutoTokenizer.from_pretrained(".")
worst, agree, positions = 0.0, 0, 0
vocab = None
for text in texts:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(input_ids=ids).logits[0]
        b = merged(input_ids=ids).logits[0]
    vocab = [a.shape[-1], b.shape[-1]]
    if a.shape != b.shape:
        break
    worst = max(worst, (a - b).abs().max().item())
    agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
    positions += a.shape[0]
print(json.dumps({"max_abs_error": worst, "top1_agreement": agree / max(positions, 1), "positions": positions, "vocab": vocab}))
