#!/usr/bin/env python3
"""Single-matmul GFLOP/s at the shapes a LoRA training step runs (GPT-2
small and SmolLM2-135M, 1,024 rows: batch 8 x block 128), 2 threads: candle's
CPU matmul (the `gemm` crate, what symb trains with) beside PyTorch's (MKL)
and OpenBLAS's (numpy's bundled build), in one run; prints a table.

    python3 bench/matmul.py

Needs torch and numpy in the Python that runs it.
"""
import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PYTHON = r"""
import json, sys, time
which, shapes = sys.argv[1], json.loads(sys.argv[2])
def rate(f, m, k, n):
    f()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        f()
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9
out = []
def operand(rows, cols, transposed):
    if which == "torch":
        import torch
        torch.set_num_threads(2)
        return torch.rand(cols, rows).t() if transposed else torch.rand(rows, cols)
    import numpy as np
    return np.random.rand(cols, rows).astype(np.float32).T if transposed else np.random.rand(rows, cols).astype(np.float32)
for m, k, n, lhs_t, rhs_t in shapes:
    a, b = operand(m, k, lhs_t), operand(k, n, rhs_t)
    out.append(rate(lambda: a @ b, m, k, n))
print(json.dumps(out))
"""


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "matmul"], cwd=ROOT, check=True)
    env = dict(os.environ, CANDLE_NUM_THREADS="2", RAYON_NUM_THREADS="2")
    out = subprocess.run([os.path.join(ROOT, "target/release/examples/matmul")], check=True, capture_output=True, text=True, env=env).stdout
    candle = [json.loads(line) for line in out.splitlines()]
    shapes = [[r["m"], r["k"], r["n"], r["lhs_t"], r["rhs_t"]] for r in candle]
    import sys
    torch = json.loads(subprocess.run([sys.executable, "-c", PYTHON, "torch", json.dumps(shapes)], check=True, capture_output=True, text=True).stdout)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    blas = json.loads(subprocess.run([sys.executable, "-c", PYTHON, "numpy", json.dumps(shapes)], check=True, capture_output=True, text=True, env=env).stdout)
    print("| m x k x n (T: a transposed view) | candle (gemm crate) GFLOP/s | PyTorch (MKL) | OpenBLAS (numpy) |")
    print("|---|---|---|---|")
    for row, t, b in zip(candle, torch, blas):
        lhs = f"{row['m']}{'ᵀ' if row['lhs_t'] else ''}"
        print(f"| {lhs} x {row['k']} x {row['n']}{' T' if row['rhs_t'] else ''} | {row['gflops']:.0f} | {t:.0f} | {b:.0f} |")


if __name__ == "__main__":
    main()
