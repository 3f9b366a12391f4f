#!/usr/bin/env python3
"""LoRA training throughput and peak memory: symb (candle) against PyTorch +
PEFT on the same shapes, in the same run; prints a table.

    python3 bench/train_throughput.py [--steps-tiny N] [--steps-small N] [--steps-smollm2 N] [--only NAME]

Shapes: batch 8 x block 128, LoRA r 8 alpha 16, fp32, 2 threads, random
weights and random token ids (throughput does not depend on them):
(a) a tiny GPT-2 (2 layers, 64 wide, 4 heads) and (b) GPT-2 small (12 x 768,
12 heads), LoRA on c_attn, vocab 57,689 (GPT-2's 50,257 plus 7,432 added
tokens), issue 3; (c) SmolLM2-135M's shape (30 layers, hidden 576, 9 heads /
3 key-value heads, intermediate 1536, vocab 49,152, tied), LoRA on q_proj and
v_proj, issue 12. Needs `pip install torch transformers peft`.
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
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
torch.manual_seed(0)
family, *shape = sys.argv[1:]
if family == "gpt2":
    layers, width, heads, vocab, steps = map(int, shape)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["c_attn"], fan_in_fan_out=True))
else:
    layers, hidden, heads, kv_heads, intermediate, vocab, steps = map(int, shape)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj"]))
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
    ap.add_argument("--steps-smollm2", type=int, default=3)
    ap.add_argument("--only", help="one shape: tiny, small or smollm2")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "train_throughput"], cwd=ROOT, check=True)
    ours = os.path.join(ROOT, "target", "release", "examples", "train_throughput")
    shapes = [
        ("tiny", "tiny GPT-2 (2 x 64)", ["gpt2", 2, 64, 4, VOCAB], args.steps_tiny),
        ("small", "GPT-2 small (12 x 768)", ["gpt2", 12, 768, 12, VOCAB], args.steps_small),
        ("smollm2", "SmolLM2-135M shape (30 x 576, 9/3 heads)", ["llama", 30, 576, 9, 3, 1536, 49_152], args.steps_smollm2),
    ]
    rows = []
    for key, name, shape, steps in shapes:
        if args.only and args.only != key:
            continue
        shape = [str(v) for v in shape] + [str(steps)]
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
