"""Renders chat templates as Python transformers does (`apply_chat_template`,
tokenize=False), for tests/tokenizer.rs to compare with symb's rendering.

    python3 render_chat.py CASES.json

CASES: [{"template", "messages", "add_generation_prompt", "bos_token",
"eos_token", "kwargs"}]. Prints a JSON list: {"text"} or {"error"} per case.
"""

import json
import sys

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

out = []
for case in json.load(open(sys.argv[1], encoding="utf-8")):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()),
        bos_token=case["bos_token"],
        eos_token=case["eos_token"],
    )
    tokenizer.chat_template = case["template"]
    try:
        text = tokenizer.apply_chat_template(
            case["messages"],
            tokenize=False,
            add_generation_prompt=case["add_generation_prompt"],
            **case["kwargs"],
        )
        out.append({"text": text})
    except Exception as e:  # the template's own message, as transformers raises it
        out.append({"error": str(e)})
json.dump(out, sys.stdout, ensure_ascii=False)
