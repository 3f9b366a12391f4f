#!/usr/bin/env python3
"""Benchmarks for symb's build engine and tokenizer stage; prints a table.

    python3 bench/run.py [--sentences N] [--runs N]

1. A no-op `symb build` (nothing changed) on a project whose corpus is 100
   files, about 40 MB: median wall time of `--runs` runs of the release binary.
2. Tokenizer training on the same corpus (about 43 MB), vocab 8000,
   byte_level: symb's tokenizer stage (its training and its whole run, which
   also checks every line round-trips) against the Python `tokenizers`
   library training the same model on the same lines, in the same run.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATOR = os.path.join(ROOT, "corpus", "gen_symbiotic.py")

PYTHON_TRAIN = r"""
import sys, time
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
lines = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        lines.extend(l.strip() for l in f if l.strip())
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=8000, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
start = time.perf_counter()
tok.train_from_iterator(lines, trainer)
print(time.perf_counter() - start)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=600_000, help="corpus size (600k sentences is about 43 MB)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    symb = os.path.join(ROOT, "target", "release", "symb")
    work = tempfile.mkdtemp(prefix="symb-bench-")
    try:
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        text = subprocess.run([sys.executable, GENERATOR, "--seed", "7", "--sentences", str(args.sentences)],
                              check=True, capture_output=True, text=True).stdout.splitlines(keepends=True)
        per_file = (len(text) + 99) // 100
        files = []
        for i in range(100):
            path = os.path.join(corpus, f"part{i:03}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(text[i * per_file:(i + 1) * per_file])
            files.append(path)
        size_mb = sum(os.path.getsize(p) for p in files) / 1e6
        with open(os.path.join(work, "symb.toml"), "w") as f:
            f.write('[corpus]\nfiles = ["corpus/*.txt"]\neval_fraction = 0.0\n'
                    '[tokenizer]\nvocab_size = 8000\nmin_frequency = 2\npre_tokenizer = "byte_level"\n')

        def build(*extra):
            out = subprocess.run([symb, "build", "--json", *extra], cwd=work, check=True, capture_output=True, text=True)
            return [json.loads(l) for l in out.stdout.splitlines()]

        build()
        time.sleep(1.1)  # let the stat cache trust the files (racy-clean window)
        build()
        noop = []
        for _ in range(args.runs):
            start = time.perf_counter()
            events = build()
            noop.append(time.perf_counter() - start)
            assert all(e["status"] == "cached" for e in events if e["event"] == "stage"), events

        # Tokenizer: symb's stage, forced, and Python's training, alternated.
        symb_train, symb_stage, python_train = [], [], []
        for _ in range(3):
            build("--force", "tokenizer")
            record_dir = os.path.join(work, "cache", "v1", "actions")
            records = [json.load(open(os.path.join(record_dir, r))) for r in os.listdir(record_dir)]
            latest = max((r for r in records if r["stage"] == "tokenizer"), key=lambda r: os.path.getmtime(
                os.path.join(record_dir, r["key"] + ".json")))
            symb_train.append(latest["metrics"]["train_seconds"])
            symb_stage.append(latest["seconds"])
            out = subprocess.run([sys.executable, "-c", PYTHON_TRAIN, *files], check=True, capture_output=True, text=True)
            python_train.append(float(out.stdout))

        import tokenizers
        print()
        print(f"corpus: 100 files, {size_mb:.1f} MB; {os.cpu_count()} cores")
        print(f"| measurement | symb | reference |")
        print(f"|---|---|---|")
        print(f"| no-op `symb build`, median of {args.runs} | {statistics.median(noop) * 1000:.1f} ms "
              f"(min {min(noop) * 1000:.1f}, max {max(noop) * 1000:.1f}) | DVC 3.67 `dvc repro`: 1.37 s (issue's figure) |")
        print(f"| BPE training, vocab 8000, byte_level (median of 3) | {statistics.median(symb_train):.2f} s "
              f"| Python tokenizers {tokenizers.__version__}: {statistics.median(python_train):.2f} s |")
        print(f"| whole tokenizer stage (read, train, round-trip check, write) | "
              f"{statistics.median(symb_stage):.2f} s | |")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
