#!/usr/bin/env python3
"""Tokens/s of an output folder in transformers.js: Node (onnxruntime-node,
CPU) and a headless Chromium (onnxruntime-web, WebAssembly, through the
playground page that `symb serve` serves), per dtype, with each dtype's size.

    python3 bench/web.py [FOLDER] [--prompt TEXT] [--tokens N]

FOLDER defaults to dist/ (build the example first: `symb build -m
symb.toml.example`). Needs `bash tests/setup.sh` and Debian's chromium.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS = os.path.join(ROOT, "tests", "js")
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "q8": "model_quantized.onnx", "int8": "model_int8.onnx",
         "uint8": "model_uint8.onnx", "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default=os.path.join(ROOT, "dist"))
    ap.add_argument("--prompt", default="Kan-ka")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    folder = os.path.abspath(args.folder)
    onnx = os.path.join(folder, "onnx")
    dtypes = [d for d, f in FILES.items() if os.path.exists(os.path.join(onnx, f))]
    sizes = {}
    for d in dtypes:
        f = FILES[d]
        sizes[d] = sum(os.path.getsize(os.path.join(onnx, n)) for n in os.listdir(onnx) if n == f or n.startswith(f + "_data"))
    symb = os.path.join(ROOT, "target", "release", "symb")
    if not os.path.exists(symb):
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        request = os.path.join(tmp, "request.json")
        # Node: one warm-up generation per dtype is folded in by timing the second prompt.
        with open(request, "w") as f:
            json.dump({"dtypes": dtypes, "prompts": [args.prompt, args.prompt], "max_new_tokens": args.tokens, "min_new_tokens": args.tokens}, f)
        out = subprocess.run(["node", os.path.join(JS, "generate.mjs"), folder, request], cwd=JS, check=True, capture_output=True, text=True)
        node, generated = {}, {}
        for d, cases in json.loads(out.stdout)["generations"].items():
            case = cases[-1]
            node[d] = len(case["generated_ids"]) / case["seconds"]
            generated[d] = len(case["generated_ids"])
        server = subprocess.Popen([symb, "serve", "--port", "0", "--transformers-js", os.path.join(JS, "node_modules"), folder],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = server.stdout.readline().strip()
            browser = {}
            for d in dtypes:
                with open(request, "w") as f:
                    json.dump({"prompt": args.prompt, "dtype": d, "max_new_tokens": args.tokens, "runs": 2}, f)
                out = subprocess.run(["node", os.path.join(JS, "browser.mjs"), url + f"?min_new_tokens={args.tokens}", request, os.path.join(tmp, f"{d}.png")],
                                     cwd=JS, check=True, capture_output=True, text=True)
                result = json.loads(out.stdout)
                match = re.search(r"([0-9.]+) tokens/s", result.get("status") or "")
                browser[d] = float(match.group(1)) if match else float("nan")
        finally:
            server.kill()
    print(f"\nprompt {args.prompt!r}, {args.tokens} new tokens (past the end of text), greedy; the second of two runs on each side\n")
    print("| dtype | MB | tokens generated | Node tokens/s | Chromium (WebAssembly) tokens/s |")
    print("|---|---|---|---|---|")
    for d in dtypes:
        print(f"| {d} | {sizes[d] / 1e6:.1f} | {generated[d]} | {node[d]:.1f} | {browser[d]:.1f} |")


if __name__ == "__main__":
    main()
