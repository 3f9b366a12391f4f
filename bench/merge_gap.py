#!/usr/bin/env python3
"""How far PyTorch's own merged model is from its base + adapter, on the
fixtures' PEFT adapters: the float32 floor under symb's "merged = adapter"
check. For each fixture, PEFT applies `lora/` to the base, then
`merge_and_unload()` folds it in; both run the golden prompts, and the table
gives the largest logit difference and the largest logit.

    python3 bench/merge_gap.py

Needs `pip install torch transformers peft` (too heavy for CI; the issue's
note reports a run).
"""
import json
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = ["tiny-gpt2", "tiny-llama", "tiny-llama-sp", "tiny-qwen2"]


def main():
    print("| fixture | max abs (merged - adapter) | max abs logit | ratio |")
    print("|---|---|---|---|")
    for name in FIXTURES:
        folder = os.path.join(ROOT, "tests", "fixtures", name)
        with open(os.path.join(folder, "golden-lora.json")) as f:
            cases = json.load(f)
        cases = cases["cases"] if isinstance(cases, dict) else cases
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(folder, "lora")).eval()
        with torch.no_grad():
            adapted = [model(torch.tensor([c["input_ids"]])).logits[0] for c in cases]
            merged_model = model.merge_and_unload()
            merged = [merged_model(torch.tensor([c["input_ids"]])).logits[0] for c in cases]
        gap = max((m - a).abs().max().item() for m, a in zip(merged, adapted))
        largest = max(a.abs().max().item() for a in adapted)
        print(f"| {name} | {gap:.3g} | {largest:.3g} | {gap / largest:.2g} |")


if __name__ == "__main__":
    main()
