"""Reads a base tokenizer.json and its extension with Python's tokenizers.

usage: check_vocab.py BASE EXTENDED LINES MODE
The new tokens are the extension's ids past the base's (added tokens or
vocabulary entries), special tokens aside.
MODE "same": counts the lines of LINES with no new token's text among
their words that the two encode differently.
MODE "roundtrip": counts lines the extension does not decode back, and how
many tokens of the encodings are new tokens.
Prints one JSON object.
"""
import json
import re
import sys

from tokenizers import Tokenizer

base = Tokenizer.from_file(sys.argv[1])
extended = Tokenizer.from_file(sys.argv[2])
lines = [l for l in open(sys.argv[3], encoding="utf-8").read().split("\n") if l.strip()]
mode = sys.argv[4]
specials = {i for i, t in extended.get_added_tokens_decoder().items() if t.special}
new_ids = {i for i in range(base.get_vocab_size(True), extended.get_vocab_size(True)) if i not in specials}
if mode == "same":
    added = {extended.decode([i]).strip() for i in new_ids}
    plain = [l for l in lines if not any(w in added for w in re.split(r"[^\w]+", l))]
    different = [l for l in plain if base.encode(l, add_special_tokens=False).ids != extended.encode(l, add_special_tokens=False).ids]
    print(json.dumps({"lines": len(lines), "plain": len(plain), "different": len(different), "examples": different[:3]}))
else:
    lossy, hits = [], 0
    for line in lines:
        enc = extended.encode(line, add_special_tokens=False)
        hits += sum(1 for i in enc.ids if i in new_ids)
        back = extended.decode(enc.ids, skip_special_tokens=False)
        if back != line:
            lossy.append((line, back))
    print(json.dumps({"lines": len(lines), "lossy": len(lossy), "examples": lossy[:3], "added_token_hits": hits}))
