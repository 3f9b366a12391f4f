#!/usr/bin/env python3
"""A merged output folder in Python transformers: the same token ids, the
same logits (within 1e-4) and the same greedy tokens as symb's candle
forward pass, for every prompt; prints a table.

    python3 bench/merged_in_transformers.py FOLDER [--symb PATH] [--prompt TEXT ...]
           [--base FOLDER --adapter FOLDER]

FOLDER is what `symb build` wrote (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). With --base and --adapter, PEFT also
applies the adapter to the base and its logits are compared with the merged
folder's (the base must have the merged folder's vocabulary). Needs
`pip install torch transformers peft`; too heavy for CI, so the issue's
note reports a run.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Nouses-ka poulkain-ni posa", "Tosoulso-ka", "The quick brown fox", "a"]

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("--symb", default=os.path.join(ROOT, "target", "release", "symb"))
ap.add_argument("--prompt", action="append")
ap.add_argument("--base")
ap.add_argument("--adapter")
a = ap.parse_args()
prompts = a.prompt or PROMPTS
torch.set_num_threads(2)

tokenizer = AutoTokenizer.from_pretrained(a.folder)
model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.float32).eval()
peft_model = None
if a.base and a.adapter:
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32), a.adapter).eval()

args = [a.symb, "generate", "--model", a.folder, "--max-new-tokens", "20", "--json"]
for p in prompts:
    args += ["--prompt", p]
ours = [json.loads(line) for line in subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()]

print(f"{'prompt':<32} {'ids':>5} {'max |logit diff|':>17} {'greedy':>8}" + (f" {'PEFT vs merged':>15}" if peft_model else ""))
worst, all_ok = 0.0, True
for prompt, out in zip(prompts, ours):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    same_ids = ids[0].tolist() == out["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                   eos_token_id=model.generation_config.eos_token_id,
                                   pad_token_id=model.generation_config.eos_token_id)[0, ids.shape[1]:].tolist()
        peft = (peft_model(ids).logits[0, -1] - logits).abs().max().item() if peft_model else None
    diff = (logits - torch.tensor(out["logits"])).abs().max().item()
    same_greedy = generated == out["generated_ids"]
    worst = max(worst, diff)
    all_ok &= same_ids and same_greedy and diff < 1e-4 and (peft is None or peft < 1e-4)
    row = f"{prompt[:32]:<32} {'same' if same_ids else 'DIFF':>5} {diff:>17.2e} {'same' if same_greedy else 'DIFF':>8}"
    print(row + (f" {peft:>15.2e}" if peft is not None else ""))
print(f"worst logit difference {worst:.2e}: {'ok' if all_ok else 'MISMATCH'}")
sys.exit(0 if all_ok else 1)
