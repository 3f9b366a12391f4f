"""Encodes each line of a file with a tokenizer.json through the Python
`tokenizers` library; prints one JSON list of ids per line.

    encode.py TOKENIZER_JSON LINES_FILE
"""
import json
import sys

from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        print(json.dumps(tokenizer.encode(line.rstrip("\n"), add_special_tokens=False).ids))
