#!/usr/bin/env python3
"""LoRA training throughput and peak memory: symb (candle) against PyTorch +
PEFT on the same shapes, in the same run; prints a table.

    python3 bench/train_throughput.py [--steps-tiny N] [--steps-small N]

Shapes (issue 3): batch 8 x block 128, LoRA r 8 alpha 16 on c_attn, vocab
57,689 (GPT-2's 50,257 plus 7,432 added tokens), fp32, 2 threads; (a) a tiny
GPT-2 (2 layers, 64 wide, 4 heads), (b) GPT-2 small (12 layers, 768, 12
heads). Random weights and random token ids: throughput does not depend on
them. Needs `pip install torch transformers peft`.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 57_689

TORCH = r"""
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
torch.set_num_threads(2)
torch.manual_seed(0)
layers, width, heads, vocab, steps = map(int, sys.argv[1:])
config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                       target_modules=["c_attn"], fan_in_fan_out=True))
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
timed = 0.0
for step in range(steps + 1):
    ids = torch.randint(0, vocab, (8, 129))
    start = time.perf_counter()
    logits = model(input_ids=ids[:, :128]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step > 0:
        timed += time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_second": steps * 8 * 128 / timed, "peak_memory_mb": peak, "steps": steps}))
"""


def run(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps-tiny", type=int, default=20)
    ap.add_argument("--steps-small", type=int, default=3)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "train_throughput"], cwd=ROOT, check=True)
    ours = os.path.join(ROOT, "target", "release", "examples", "train_throughput")
    rows = []
    for name, (layers, width, heads), steps in [("tiny (2 x 64)", (2, 64, 4), args.steps_tiny),
                                                 ("GPT-2 small (12 x 768)", (12, 768, 12), args.steps_small)]:
        shape = [str(layers), str(width), str(heads), str(VOCAB), str(steps)]
        symb = run([ours, *shape])
        torch = run([sys.executable, "-c", TORCH, *shape])
        rows.append((name, symb, torch))
    print()
    print("| model | symb tokens/s | PyTorch+PEFT tokens/s | symb peak MB | PyTorch peak MB |")
    print("|---|---|---|---|---|")
    for name, symb, torch in rows:
        print(f"| {name} | {symb['tokens_per_second']:.0f} | {torch['tokens_per_second']:.0f} | "
              f"{symb['peak_memory_mb']:.0f} | {torch['peak_memory_mb']:.0f} |")


if __name__ == "__main__":
    main()
