"""An independent PyTorch reference for a chat training loss that trains only
the assistant turns.

    python3 chat_loss.py MODEL_DIR CONVERSATIONS.jsonl [--template chatml|FILE.jinja] [--text]

MODEL_DIR is a transformers folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). Each line of CONVERSATIONS.jsonl is
{"messages": [{"role": ..., "content": ...}, ...]}.

The trained tokens come from transformers' own mechanism, not from symb:
`apply_chat_template(..., return_assistant_tokens_mask=True)` with a template
that wraps each assistant message's content and its end-of-turn token in
`{% generation %}...{% endgeneration %}`. `--template chatml` (the default) is
the plain ChatML template with that marking, so an assistant message's trained
span is its content through its `<|im_end|>`: not the `<|im_start|>assistant\\n`
header, not the newline after `<|im_end|>`. A FILE.jinja must carry its own
generation blocks.

Each conversation runs alone through the model in float32 with eager attention.
The loss is the causal-LM one: the logits at position i predict token i + 1, and
token i + 1 counts when its mask bit is 1 (labels are input_ids with -100 where
the mask is 0, shifted as transformers does). The cross-entropy is summed in
float64 from the float32 logits and checked against transformers' own
`model(input_ids, labels=labels).loss`.

Prints one JSON object:
    {"conversations": [{"ids": [...], "mask": [...], "loss_sum": float, "tokens": int}, ...],
     "mean_loss": total loss_sum / total tokens}
With --text each conversation also has "text" (the rendered conversation) and
"trained" (the decoded text of each run of consecutive mask-1 tokens).
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same template without the generation marking, as ChatML is usually written: the
# marked one must render the same text.
CHATML_PLAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def runs(ids, mask, tokenizer):
    """The decoded text of each run of consecutive mask-1 tokens."""
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append(tokenizer.decode(cur)); cur = []
    if cur:
        out.append(tokenizer.decode(cur))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("conversations")
    ap.add_argument("--template", default="chatml", help="chatml, or a .jinja file with {% generation %} blocks")
    ap.add_argument("--text", action="store_true", help="add the rendered text and the trained spans")
    a = ap.parse_args()

    if a.template == "chatml":
        template, plain = CHATML, CHATML_PLAIN
    else:
        template, plain = open(a.template, encoding="utf-8").read(), None
        if "generation" not in template:
            sys.exit(f"{a.template}: the template has no {{% generation %}} block, so no token would train")

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    max_pos = getattr(model.config, "max_position_embeddings", None)

    convs = []
    with open(a.conversations, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                convs.append((n, json.loads(line)["messages"]))

    results, total_sum, total_tokens = [], 0.0, 0
    for n, messages in convs:
        enc = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        if plain is not None:
            assert text == tokenizer.apply_chat_template(messages, chat_template=plain, tokenize=False), (
                f"line {n}: the marked template renders differently from plain ChatML"
            )
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], f"line {n}: ids differ from encoding the text"
        assert len(ids) == len(mask)
        if max_pos is not None and len(ids) > max_pos:
            sys.exit(f"line {n}: {len(ids)} tokens, more than the model's {max_pos} positions")

        input_ids = torch.tensor([ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=labels)
        logits = out.logits[0, :-1].double()  # position i predicts token i + 1
        targets = labels[0, 1:]
        keep = targets != -100
        tokens = int(keep.sum())
        logp = torch.log_softmax(logits[keep], dim=-1)
        loss_sum = float(-logp.gather(1, targets[keep].unsqueeze(1)).sum()) if tokens else 0.0
        if tokens:  # transformers' own loss is the mean over the same targets
            ref = float(out.loss) * tokens
            assert abs(ref - loss_sum) <= 1e-4 * max(1.0, abs(loss_sum)), (
                f"line {n}: loss sum {loss_sum} but transformers' loss gives {ref}"
            )
        total_sum += loss_sum
        total_tokens += tokens
        r = {"ids": ids, "mask": mask, "loss_sum": loss_sum, "tokens": tokens}
        if a.text:
            r["text"] = text
            r["trained"] = runs(ids, mask, tokenizer)
        results.append(r)

    mean = total_sum / total_tokens if total_tokens else None
    json.dump({"conversations": results, "mean_loss": mean}, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
