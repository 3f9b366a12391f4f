#!/usr/bin/env python3
"""Chat LoRA training throughput: symb against PyTorch + PEFT, on the same
conversations, in the same run; prints a table.

    python3 bench/chat_train.py [--conversations N] [--steps N] [--rounds N]

The SmolLM2-135M shape (30 x 576, 9 / 3 heads, intermediate 1536, vocab
49,152, tied), random weights, LoRA r 8 alpha 16 on q_proj and v_proj, fp32,
2 threads. Conversations of mixed lengths (50 to 400 tokens, drawn with a seed),
each a user turn and an assistant turn whose tokens train (about the second
half). symb packs them whole into blocks of 512 (`pack_sequences`: several to a
block, block-diagonal attention, positions from 0 each); PyTorch + PEFT takes
batches of 8 conversations padded to the longest, labels -100 outside the
assistant turn (axolotl's masking without sample packing). Both count real
tokens only (no padding). Needs `pip install torch transformers peft`.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH = r"""
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
torch.manual_seed(0)
conversations = json.load(open(sys.argv[1]))
steps = int(sys.argv[2])
config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                     rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                       target_modules=["q_proj", "v_proj"]))
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
batches = [conversations[i:i + 8] for i in range(0, len(conversations), 8)]
timed, tokens = 0.0, 0
for step in range(steps + 1):
    batch = batches[step % len(batches)]
    longest = max(len(c["ids"]) for c in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for row, c in enumerate(batch):
        n = len(c["ids"])
        ids[row, :n] = torch.tensor(c["ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(c["ids"], c["trained"])])
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step > 0:
        timed += time.perf_counter() - start
        tokens += sum(len(c["ids"]) - 1 for c in batch)
print(json.dumps({"tokens_per_second": tokens / timed, "steps": steps}))
"""


def run(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each side (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="each side this many times, alternating")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and peft")
    args = ap.parse_args()
    rng = random.Random(0)
    conversations = []
    for _ in range(args.conversations):
        n = rng.randint(50, 400)
        user = rng.randint(n // 4, 3 * n // 4)
        ids = [rng.randrange(3, 49_152) for _ in range(n)]
        conversations.append({"ids": ids, "trained": [i >= user for i in range(n)]})
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "chat_throughput"], cwd=ROOT, check=True)
    ours = os.path.join(ROOT, "target", "release", "examples", "chat_throughput")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(conversations, f)
    # symb's steps are blocks of 512 packed (8 a batch); PyTorch's, 8
    # conversations padded: the same number of real tokens per side overall
    # is covered by running each over the whole set at least once per round.
    real = sum(len(c["ids"]) - 1 for c in conversations)
    print(f"{len(conversations)} conversations, {real} real tokens, lengths 50-400, load {os.getloadavg()[0]:.2f}")
    rows = []
    for round in range(args.rounds):
        symb = run([ours, f.name, str(args.steps)])
        torch = run([args.python, "-c", TORCH, f.name, str(args.steps)])
        rows.append((round + 1, symb, torch))
    print(f"load after {os.getloadavg()[0]:.2f}")
    print()
    print("| round | symb real tokens/s (packed) | PyTorch+PEFT real tokens/s (padded) | ratio |")
    print("|---|---|---|---|")
    for round, symb, torch in rows:
        print(f"| {round} | {symb['tokens_per_second']:.0f} | {torch['tokens_per_second']:.0f} | "
              f"{symb['tokens_per_second'] / torch['tokens_per_second']:.2f}x |")


if __name__ == "__main__":
    main()
