"""Builds the PEFT LoRA + trainable-tokens fixture the Rust tests compare against.

    make_trainable_tokens_fixture.py [BASE_MODEL_DIR] [OUT_DIR]

Defaults: BASE_MODEL_DIR=tests/fixtures/tiny-gpt2,
OUT_DIR=tests/data/tiny-gpt2-trainable-tokens (relative to the repository root).

Writes into OUT_DIR:
  adapter_config.json, adapter_model.safetensors  -- PeftModel.save_pretrained()
  golden.safetensors  -- "input_ids" (int64 [1, 8]), "logits" (float32 [1, 8, vocab]) from the
                         PEFT model, "merged_logits" from merge_and_unload() of it
  golden.json         -- how the files were made (versions, config, diffs)

The adapter is LoRA on c_attn (r=4, alpha=8, fan_in_fan_out, init_lora_weights=False so B is
random) plus trainable_token_indices=[4090..4095]. PEFT initialises the trainable token rows
as a copy of the base wte rows; they are then perturbed by 0.5 * seeded normal noise so they
differ from the base. GPT-2 ties lm_head to wte, so the replaced rows also change the logits
of those six tokens.

Everything runs on the CPU in float32, in eval mode (the config's dropouts are 0.1).
"""
import json
import os
import sys

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

SEED = 1234
TOKEN_INDICES = [4090, 4091, 4092, 4093, 4094, 4095]
INPUT_IDS = [[4090, 5, 4091, 17, 4095, 300, 4092, 9]]
NOISE_SCALE = 0.5

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
base_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "tests", "fixtures", "tiny-gpt2")
out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "tests", "data", "tiny-gpt2-trainable-tokens")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(SEED)
torch.use_deterministic_algorithms(True)


def load_base():
    model = GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    return model


input_ids = torch.tensor(INPUT_IDS, dtype=torch.int64)

with torch.no_grad():
    base_logits = load_base()(input_ids).logits.float()

base = load_base()
config = LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["c_attn"],
    fan_in_fan_out=True,
    init_lora_weights=False,
    trainable_token_indices=TOKEN_INDICES,
)
torch.manual_seed(SEED)
model = get_peft_model(base, config)
model.eval()

wte = model.base_model.model.transformer.wte
delta = wte.token_adapter.trainable_tokens_delta["default"]
base_rows = wte.token_adapter.base_layer.weight[TOKEN_INDICES]
assert torch.equal(delta.detach(), base_rows.detach()), "PEFT no longer initialises the rows as a copy of the base"

gen = torch.Generator().manual_seed(SEED + 1)
with torch.no_grad():
    delta.add_(NOISE_SCALE * torch.randn(delta.shape, generator=gen, dtype=delta.dtype))

with torch.no_grad():
    logits = model(input_ids).logits.float()

os.makedirs(out_dir, exist_ok=True)
model.save_pretrained(out_dir)

# The adapter directory is committed: drop the generated model card and do not record this
# machine's path to the base model.
card = os.path.join(out_dir, "README.md")
if os.path.exists(card):
    os.remove(card)
cfg_path = os.path.join(out_dir, "adapter_config.json")
with open(cfg_path, encoding="utf-8") as f:
    saved_cfg = json.load(f)
saved_cfg["base_model_name_or_path"] = None
with open(cfg_path, "w", encoding="utf-8") as f:
    json.dump(saved_cfg, f, indent=2, sort_keys=True)
    f.write("\n")

merged = model.merge_and_unload()
merged.eval()
assert merged.transformer.wte.weight is merged.lm_head.weight, "merged model lost the wte/lm_head tie"
with torch.no_grad():
    merged_logits = merged(input_ids).logits.float()

# Reload the saved adapter onto a fresh base model: the saved files alone must reproduce the logits.
from peft import PeftModel  # noqa: E402

with torch.no_grad():
    reloaded = PeftModel.from_pretrained(load_base(), out_dir)
    reloaded.eval()
    reloaded_logits = reloaded(input_ids).logits.float()

diff_merged = (logits - merged_logits).abs().max().item()
diff_reloaded = (logits - reloaded_logits).abs().max().item()
diff_base = (logits - base_logits).abs().max().item()
diff_base_other = (logits - base_logits)[..., : TOKEN_INDICES[0]].abs().max().item()
diff_base_tokens = (logits - base_logits)[..., TOKEN_INDICES].abs().max().item()

save_file(
    {
        "input_ids": input_ids.contiguous(),
        "logits": logits.contiguous(),
        "merged_logits": merged_logits.contiguous(),
    },
    os.path.join(out_dir, "golden.safetensors"),
)

adapter = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
info = {
    "script": "tests/python/make_trainable_tokens_fixture.py",
    "base_model": "tests/fixtures/tiny-gpt2",
    "versions": {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    },
    "seed": SEED,
    "noise": f"trainable_tokens_delta += {NOISE_SCALE} * randn(generator seeded {SEED + 1})",
    "lora_config": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn"],
        "fan_in_fan_out": True,
        "init_lora_weights": False,
        "trainable_token_indices": TOKEN_INDICES,
    },
    "adapter_tensors": {k: list(v.shape) for k, v in sorted(adapter.items())},
    "input_ids": INPUT_IDS,
    "golden": {
        "file": "golden.safetensors",
        "input_ids": "int64 [1, 8]",
        "logits": "float32 [1, 8, vocab] from the PEFT model (eval mode)",
        "merged_logits": "float32 [1, 8, vocab] from merge_and_unload() of it",
    },
    "max_abs_diff": {
        "logits_vs_merged_logits": diff_merged,
        "logits_vs_reloaded_adapter": diff_reloaded,
        "logits_vs_base_model": diff_base,
        "logits_vs_base_model_other_tokens": diff_base_other,
        "logits_vs_base_model_trainable_tokens": diff_base_tokens,
    },
}
with open(os.path.join(out_dir, "golden.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)
    f.write("\n")

print("adapter tensors:")
for k, v in sorted(adapter.items()):
    print(f"  {k} {list(v.shape)} {v.dtype}")
print("trainable_token_indices:", json.dumps(saved_cfg["trainable_token_indices"]))
print("max |logits - merged_logits|  =", diff_merged)
print("max |logits - reloaded|       =", diff_reloaded)
print("max |logits - base|           =", diff_base)
print("  over tokens < 4090          =", diff_base_other)
print("  over tokens 4090..4095      =", diff_base_tokens)
