#!/usr/bin/env python3
"""symb's 4-bit files against onnxruntime's own 4-bit quantizers with and without
calibration (RTN, GPTQ, HQQ) on a real model, SmolLM2-135M-Instruct as symb
exports it: one table of each file's size, quantization time and quality
against symb's fp32 file.

    python3 bench/quant_calibrated.py --dist DIR \\
        --symb symb-rtn=DIR/onnx/model_q4.onnx --symb-time symb-rtn=12 \\
        --symb symb-gptq=OTHER/onnx/model_q4.onnx --symb-time symb-gptq=95 --json rows.json
    python3 bench/quant_calibrated.py --dist DIR --only ort-rtn,ort-hqq --lines 10   # no calibration needed
    python3 bench/quant_calibrated.py --dist DIR --work /tmp/q --threads 1 --quant-threads 1 \\
        --calib-windows 8 --calib-len 64 --lines 8                                  # a quick try

--dist is a folder symb built (its onnx/model.onnx, fp32, is the reference and
the input of onnxruntime's quantizers; its tokenizer.json tokenizes the text;
its config.json gives the KV cache's shape where the graph leaves it symbolic).
The fp32 graph is transformers.js's decoder layout: inputs input_ids,
attention_mask, position_ids (Llama) and past_key_values.N.key/value, outputs
logits and present.N.key/value.

Files (all 4 bits, block 32, made here from symb's fp32 file with onnxruntime's
MatMulNBitsQuantizer; the quantization seconds are those of the quantizer's
construction and process(), the model already loaded and not yet saved, GPTQ's
calibration forward passes included; --quant-threads bounds their threads):
  ort-rtn        algo DEFAULT (round to nearest), is_symmetric=True,
                 accuracy_level=4: no zero points (MatMulNBits' implicit 8).
  ort-rtn-asym   the same with is_symmetric=False: a 4-bit zero point per
                 block (uint8, two per byte), 1/40 larger.   [not by default]
  ort-gptq       algo GPTQ, GPTQWeightOnlyQuantConfig(calibration_data_reader,
                 percdamp=0.01, block_size=128 (GPTQ's column block, not the
                 group), actorder=False, mse=False, perchannel=True), with
                 MatMulNBitsQuantizer(block_size=32, is_symmetric=True,
                 accuracy_level=4): the group size, the scheme and the
                 accuracy level come from the quantizer's arguments, not from
                 the config (its block_size is GPTQ's own column block).
  ort-gptq-asym  the same with is_symmetric=False: a 4-bit zero point per
                 block (uint8, two per byte), 1/40 larger.   [not by default]
  ort-gptq-fixed ort-gptq-asym with gptq()'s two Hinv indexings as in the GPTQ
                 paper: NOT onnxruntime as shipped (see below).  [not by default]
  ort-hqq        algo HQQ, HQQWeightOnlyQuantConfig(block_size=32, bits=4):
                 asymmetric, unsigned 4-bit with a float32 zero point and a
                 float32 scale per block, found by HQQ's half-quadratic solver
                 (lp 0.7, up to 20 iterations, stopping at the first that does
                 not lower the mean |error|); no calibration; needs torch. Its
                 files carry float zero points, so its quantized matrices are
                 1.2x the others' (24 bytes per 32 weights against 20), and
                 its MatMulNBits nodes have no accuracy_level (fp32 compute):
                 --hqq-accuracy-level 4 sets it as the others have it (on the
                 CPU, onnxruntime 1.32 gave the same logits bit for bit: float
                 zero points keep the fp32 path).
GPTQ in onnxruntime 1.32 (onnxruntime/quantization/neural_compressor/
weight_only.py, Intel Neural Compressor's code vendored: the neural-compressor
package is not needed, torch is: its calibration inputs pass through a
to_numpy that imports torch) is round-to-nearest in effect: gptq() spreads each
column's error with Hinv[i:, i] and Hinv[i2:, i1:i2], the column and the lower
block of the upper-triangular Cholesky factor of H^-1, which are zero below the
diagonal, so no weight is ever corrected (the paper and its PyTorch code use
the rows Hinv[i, i:] and Hinv[i1:i2, i2:]); the fake-quantized weights equal
RTN's on gptq()'s grid (min/max per 32 rows and column, zero included in the
range); two files made from 4 and from 16 windows had every initializer
equal and the same logits. Its symmetric files are then worse than RTN: gptq()'s output is
quantized again by quant_tensor() on a grid taken from that output's own
min/max (7 or 8 steps instead of 7.5), which moves most weights to another
level; asymmetric, the second pass is exact there (each block's extremes sit
on levels 0 and 15). ort-gptq-fixed shows what the calibration would give with
the two indexings corrected (its corrected weights go through the same second
pass, which need not be exact for them). Its calibration also
runs the whole fp32 model once per window for every distinct MatMul input
(q/k/v share one, gate/up one: about 4 per layer, so 120 x --calib-windows
forward passes on SmolLM2), and each layer's Hessian comes from the fp32
model's activations, not from the already-quantized layers'.

Calibration data for GPTQ: --calib-windows windows of --calib-len tokens,
consecutive, cut from the calibration text tokenized as one stream (lines
joined by newlines) with tokenizer.json; each window is one feed: input_ids
[1, L], attention_mask ones [1, L], position_ids 0..L-1 [1, L] where the graph
has it, and every past_key_values.N.key/value empty, [1, kv_heads, 0,
head_dim] (the graph's inputs must all be fed; with an empty cache the window
attends within itself). Default texts, disjoint by construction: calibration is
src/stages/english.txt's first half then corpus/symbiotic.txt's first half (from
its start, as many lines as the windows need); evaluation is english.txt's
second half and lines spread over symbiotic.txt's second half, --lines in all
(half english.txt, as many as it has). With --calibration FILE or --eval FILE,
the file's non-empty lines are used instead (the eval lines spread over it);
eval lines equal to a calibration line are dropped either way.

Quality, as bench/real_model.py measures it (its functions are imported): mean
KL(fp32 || file) per position, top-1 agreement with fp32 and the ratio of
perplexities, native onnxruntime on the CPU, full-sequence logits without the
KV cache, --threads intra-op threads, each eval line cut to --max-line-tokens.
`uptime` is printed before and after.

symb's files (--symb NAME=PATH, repeatable; --symb-time NAME=SECONDS for their
quantization times, which are printed as given): onnxruntime's quantizers leave
the tied head, MatMul(x, Transpose(embedding)) in symb's export, in fp32 (they
take MatMuls against initializers only), so compare against symb files built
with `head_bits = 16` in [export] (a float head); the table's `head` column
says what each file's head computes with, and a note is printed for a symb file
whose head is quantized.

Needs (a venv; PyPI's default torch wheel, CPU use is fine; the
neural-compressor package is not needed by onnxruntime 1.32):
    pip install onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0 tokenizers==0.23.2 numpy torch==2.15.0
"""
import argparse
import contextlib
import gc
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time


def _early_threads():
    """--quant-threads N bounds numpy's BLAS too, which reads its variables when numpy loads."""
    for i, a in enumerate(sys.argv):
        value = a.split("=", 1)[1] if a.startswith("--quant-threads=") else (sys.argv[i + 1] if a == "--quant-threads" and i + 1 < len(sys.argv) else None)
        if value and value.isdigit() and int(value) > 0:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, value)


_early_threads()

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_model import describe, full_logits, quality, uptime  # noqa: E402

BITS, BLOCK, ACCURACY_LEVEL = 4, 32, 4

# name -> (algorithm column, description)
ORT_VARIANTS = {
    "ort-rtn": ("RTN sym", "MatMulNBitsQuantizer default algo (RTN), block 32, is_symmetric=True, accuracy_level=4"),
    "ort-rtn-asym": ("RTN asym", "as ort-rtn with is_symmetric=False (4-bit zero points)"),
    "ort-gptq": ("GPTQ sym", "MatMulNBitsQuantizer + GPTQWeightOnlyQuantConfig(percdamp 0.01, block_size 128, actorder False), block 32, "
                             "is_symmetric=True, accuracy_level=4, calibrated"),
    "ort-gptq-asym": ("GPTQ asym", "as ort-gptq with is_symmetric=False (4-bit zero points)"),
    "ort-gptq-fixed": ("GPTQ asym, Hinv rows", "as ort-gptq-asym with gptq()'s Hinv[i:, i] -> Hinv[i, i:] and Hinv[i2:, i1:i2] -> "
                                               "Hinv[i1:i2, i2:].T (not onnxruntime as shipped)"),
    "ort-hqq": ("HQQ asym", "MatMulNBitsQuantizer + HQQWeightOnlyQuantConfig(block_size=32, bits=4): float zero points, no calibration"),
}
DEFAULT = ["ort-rtn", "ort-gptq", "ort-hqq"]


# ---------------------------------------------------------------- texts

def nonempty(path):
    with open(path, encoding="utf-8") as f:
        return [l.strip() for l in f if l.strip()]


def spread(lines, n):
    step = max(1, len(lines) // max(n, 1))
    return lines[::step][:n]


def texts(args):
    """(calibration lines, eval lines, a sentence saying where they come from)."""
    english = nonempty(os.path.join(ROOT, "src", "stages", "english.txt"))
    symbiotic = nonempty(os.path.join(ROOT, "corpus", "symbiotic.txt"))
    e_half, s_half = len(english) // 2, len(symbiotic) // 2
    if args.calibration:
        calib, calib_from = nonempty(args.calibration), args.calibration
    else:
        calib = english[:e_half] + symbiotic[:s_half]
        calib_from = f"english.txt lines 1-{e_half} then symbiotic.txt from line 1"
    if args.eval:
        ev = spread(nonempty(args.eval), args.lines)
        eval_from = f"{len(ev)} lines spread over {args.eval}"
    else:
        eng = english[e_half:][:args.lines // 2]
        sym = spread(symbiotic[s_half:], args.lines - len(eng))
        ev = eng + sym
        eval_from = f"{len(eng)} english.txt lines (its second half), {len(sym)} spread over symbiotic.txt's second half"
    seen = set(calib)
    dropped = sum(l in seen for l in ev)
    ev = [l for l in ev if l not in seen]
    if dropped:
        eval_from += f" ({dropped} equal to a calibration line dropped)"
    return calib, ev, calib_from, eval_from


def windows(tokenizer, lines, count, length):
    """`count` consecutive windows of `length` tokens from the lines as one newline-joined stream."""
    ids, used = [], 0
    for line in lines:  # tokenized line by line (with its newline) so that a long file is not encoded whole
        ids += tokenizer.encode(line + "\n").ids
        used += 1
        if len(ids) >= count * length:
            break
    got = len(ids) // length
    if got < count:
        print(f"note: the calibration text gives {got} windows of {length} tokens, not {count}", file=sys.stderr)
    return [ids[i * length:(i + 1) * length] for i in range(min(got, count))], used


# ---------------------------------------------------------------- the graph

def kv_shape(fp32, dist):
    """(layers, kv_heads, head_dim, past type, input names) from the graph, config.json where it is symbolic."""
    import onnx
    model = onnx.load(fp32, load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    past = sorted((n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")), key=lambda n: int(n.split(".")[1]))
    cfg = {}
    with contextlib.suppress(OSError):
        with open(os.path.join(dist, "config.json")) as f:
            cfg = json.load(f)
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", cfg.get("n_embd", 0)) // heads if heads else None)
    elem = onnx.TensorProto.FLOAT
    if past:
        t = inputs[past[0]].type.tensor_type
        elem = t.elem_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) == 4:
            kv_heads = dims[1] or kv_heads
            head_dim = dims[3] or head_dim
    past_type = onnx.helper.tensor_dtype_to_np_dtype(elem).name.replace("float", "fp")
    return {"layers": len(past), "kv_heads": kv_heads, "head_dim": head_dim}, past_type, list(inputs)


def window_feeds(ids, cfg, past_type, names):
    f = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    if "position_ids" in names:
        f["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    dtype = np.dtype(past_type.replace("fp", "float"))
    for layer in range(cfg["layers"]):
        for kind in ("key", "value"):
            f[f"past_key_values.{layer}.{kind}"] = np.zeros((1, cfg["kv_heads"], 0, cfg["head_dim"]), dtype)
    missing = [n for n in names if n not in f]
    assert not missing, f"the graph has inputs a calibration feed does not fill: {missing}"
    return f


# ---------------------------------------------------------------- onnxruntime's files

class Windows:
    """onnxruntime's CalibrationDataReader over prepared feeds (MatMulNBitsQuantizer deep-copies it and iterates it once)."""

    def __init__(self, feeds):
        self.feeds, self.at = feeds, 0

    def get_next(self):
        if self.at >= len(self.feeds):
            return None
        self.at += 1
        return self.feeds[self.at - 1]

    def __iter__(self):
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r


@contextlib.contextmanager
def bounded(threads):
    """onnxruntime's GPTQ makes its session with default options (every core) and HQQ uses torch's threads:
    bound both to `threads` for the duration (0: leave them)."""
    from onnxruntime.quantization.neural_compressor import weight_only
    original = weight_only.prepare_inputs

    def prepare_inputs(*a, **k):
        inputs, so = original(*a, **k)
        so.log_severity_level = 3  # not the fp32 file's unused initializer's warning on every run
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        return inputs, so

    torch_threads = None
    weight_only.prepare_inputs = prepare_inputs
    if threads:
        with contextlib.suppress(ImportError):
            import torch
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
    try:
        yield
    finally:
        weight_only.prepare_inputs = original
        if torch_threads:
            import torch
            torch.set_num_threads(torch_threads)


@contextlib.contextmanager
def rows_fixed_gptq():
    """weight_only.gptq with the GPTQ paper's Hinv rows in place of its columns (two lines)."""
    from onnxruntime.quantization.neural_compressor import weight_only
    src = inspect.getsource(weight_only.gptq)
    fixes = [("np.expand_dims(Hinv1[i:, i], axis=1)", "np.expand_dims(Hinv1[i, i:], axis=1)"),
             ("np.matmul(Hinv[i2:, i1:i2], Err1)", "np.matmul(Hinv[i1:i2, i2:].T, Err1)")]
    for old, new in fixes:
        assert src.count(old) == 1, f"onnxruntime's gptq() has changed: {old!r} not found once"
        src = src.replace(old, new)
    scope = dict(weight_only.__dict__)
    exec(compile(src, weight_only.__file__ + " (rows fixed)", "exec"), scope)
    original = weight_only.gptq
    weight_only.gptq = scope["gptq"]
    try:
        yield
    finally:
        weight_only.gptq = original


def set_accuracy_level(model, level):
    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            if level:
                import onnx
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
            n += 1
    return n


def make_variant(name, fp32, path, feeds, args):
    """Quantize symb's fp32 file into `path`; the quantizer's seconds."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    model = onnx.load(fp32)
    gptq = name.startswith("ort-gptq")
    symmetric = name in ("ort-rtn", "ort-gptq")
    with bounded(args.quant_threads), (rows_fixed_gptq() if name == "ort-gptq-fixed" else contextlib.nullcontext()), \
            contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        if name == "ort-hqq":
            q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=BITS))
        elif gptq:
            config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Windows(feeds), percdamp=0.01, block_size=128,
                                               actorder=False, mse=False, perchannel=True)
            q = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=symmetric,
                                     accuracy_level=ACCURACY_LEVEL, algo_config=config)
        else:
            q = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=name == "ort-rtn",
                                     accuracy_level=ACCURACY_LEVEL)
        q.process()
        seconds = time.perf_counter() - start
        if gptq:
            print(file=sys.stderr)  # after its progress bar
    out = q.model.model
    if name == "ort-hqq" and args.hqq_accuracy_level is not None:
        set_accuracy_level(out, args.hqq_accuracy_level)
    nbits = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    assert nbits, f"{name}: no MatMulNBits in onnxruntime's output"
    onnx.save(out, path)
    with open(path + ".json", "w") as f:
        json.dump({"seconds": seconds, "matmulnbits": nbits}, f)
    return seconds


def blocks(path):
    """What the file's MatMulNBits nodes hold: (count, bits/blocks, zero points' kind, accuracy levels)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = lambda n: {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
    kinds, zps, levels = set(), set(), set()
    for n in nodes:
        a = attrs(n)
        kinds.add(f"{a.get('bits', 4)}b{a.get('block_size')}")
        levels.add(a.get("accuracy_level", 0))
        zp = n.input[3] if len(n.input) > 3 and n.input[3] else None
        zps.add("none" if zp is None else
                ("uint8" if inits[zp].data_type == onnx.TensorProto.UINT8 else
                 onnx.helper.tensor_dtype_to_np_dtype(inits[zp].data_type).name) if zp in inits else "input")
    # symb's affine blocks: the offsets ride on a float MatMul beside the MatMulNBits (`<weight>_offsets`).
    if any(n.op_type == "MatMul" and len(n.input) > 1 and n.input[1].endswith("_offsets") for n in model.graph.node):
        zps = {"float offsets (MatMul)" if z == "none" else z for z in zps}
    return len(nodes), ",".join(sorted(kinds)) or "-", ",".join(sorted(zps)) or "-", ",".join(map(str, sorted(levels))) or "-"


def size(path):
    folder, base = os.path.dirname(path), os.path.basename(path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f == base or f.startswith(base + "_data"))


# ---------------------------------------------------------------- main

def pairs(values, what, ap, number=False):
    out = {}
    for v in values or []:
        if "=" not in v:
            ap.error(f"{what} {v!r}: NAME=VALUE")
        k, val = v.split("=", 1)
        try:
            out[k] = float(val) if number else os.path.abspath(val)
        except ValueError:
            ap.error(f"{what} {v!r}: seconds as a number")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dist", required=True, help="symb's output folder: onnx/model.onnx (fp32), tokenizer.json, config.json")
    ap.add_argument("--symb", action="append", metavar="NAME=PATH", help="a symb-made 4-bit file to measure (repeatable)")
    ap.add_argument("--symb-time", action="append", metavar="NAME=SECONDS", help="its quantization time, printed as given")
    ap.add_argument("--only", help="comma-separated onnxruntime files to make and measure (default: "
                                   + ",".join(DEFAULT) + "; also " + ", ".join(n for n in ORT_VARIANTS if n not in DEFAULT)
                                   + "; empty: symb's files only)")
    ap.add_argument("--work", help="keep onnxruntime's files (and their times) here and reuse those already there "
                                   "(default: a temporary folder; a cached GPTQ file was made from the calibration of its first run)")
    ap.add_argument("--calibration", help="calibration text, one document per line (default: see above)")
    ap.add_argument("--eval", help="evaluation text, one document per line (default: see above)")
    ap.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    ap.add_argument("--lines", type=int, default=40, help="eval lines (default 40)")
    ap.add_argument("--max-line-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the quality sessions (default 2)")
    ap.add_argument("--quant-threads", type=int, default=0,
                    help="bound the quantizers' threads: GPTQ's onnxruntime session, torch (HQQ) and numpy's BLAS (default 0: theirs)")
    ap.add_argument("--hqq-accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                    help="set this accuracy_level on HQQ's MatMulNBits nodes (default: as onnxruntime makes them, none)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    args.dist = os.path.abspath(args.dist)
    symb = pairs(args.symb, "--symb", ap)
    symb_time = pairs(args.symb_time, "--symb-time", ap, number=True)
    unknown = [n for n in symb_time if n not in symb]
    if unknown:
        ap.error(f"--symb-time for {', '.join(unknown)}, which no --symb names")
    ort_names = DEFAULT if args.only is None else [n for n in args.only.split(",") if n]
    bad = [n for n in ort_names if n not in ORT_VARIANTS]
    if bad:
        ap.error(f"unknown file {', '.join(bad)}: choose from {', '.join(ORT_VARIANTS)}")
    clash = [n for n in symb if n in ORT_VARIANTS or n == "symb-fp32"]
    if clash:
        ap.error(f"--symb names {', '.join(clash)} are taken")
    for n, p in symb.items():
        if not os.path.isfile(p):
            ap.error(f"--symb {n}: {p} is missing")
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)

    fp32 = os.path.join(args.dist, "onnx", "model.onnx")
    if not os.path.isfile(fp32):
        sys.exit(f"{fp32} is missing: --dist a folder symb built with the fp32 target")
    cfg, past_type, input_names = kv_shape(fp32, args.dist)
    if not cfg["layers"] or not cfg["kv_heads"] or not cfg["head_dim"]:
        sys.exit(f"cannot tell the KV cache's shape from {fp32} and config.json: {cfg}")

    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(args.dist, "tokenizer.json"))
    calib_lines, eval_lines, calib_from, eval_from = texts(args)
    seqs = [tokenizer.encode(t).ids[:args.max_line_tokens] for t in eval_lines]
    seqs = [s for s in seqs if len(s) >= 2]
    feeds, calib_used = [], 0
    if any(n.startswith("ort-gptq") for n in ort_names):
        wins, calib_used = windows(tokenizer, calib_lines, args.calib_windows, args.calib_len)
        feeds = [window_feeds(w, cfg, past_type, input_names) for w in wins]
        calib_from += f", {calib_used} lines"
        if not feeds:
            sys.exit("no calibration window: give more calibration text or a smaller --calib-len")

    work = args.work or tempfile.mkdtemp(prefix="symb-quant-calibrated-")
    os.makedirs(work, exist_ok=True)
    before = after = None
    try:
        paths, seconds, reused = {"symb-fp32": fp32}, {}, []
        for name in ort_names:
            path = os.path.join(work, name + ".onnx")
            if os.path.isfile(path) and os.path.isfile(path + ".json"):
                with open(path + ".json") as f:
                    seconds[name] = json.load(f)["seconds"]
                reused.append(name)
            else:
                print(f"making {name} ({ORT_VARIANTS[name][1]})", file=sys.stderr)
                seconds[name] = make_variant(name, fp32, path, feeds, args)
                print(f"  {seconds[name]:.1f} s", file=sys.stderr)
                gc.collect()
            paths[name] = path
        for name, path in symb.items():
            paths[name] = path
            seconds[name] = symb_time.get(name)
        names = list(paths)
        info = {n: describe(p) for n, p in paths.items()}
        kinds = {n: blocks(p) for n, p in paths.items()}
        sizes = {n: size(p) for n, p in paths.items()}

        before = uptime()
        print(f"uptime before: {before}", file=sys.stderr)
        print(f"quality: {len(seqs)} lines, {sum(map(len, seqs))} tokens", file=sys.stderr)
        rows = []
        ref = full_logits(fp32, seqs, cfg, past_type, args.threads)
        for name in names:
            lps = ref if name == "symb-fp32" else full_logits(paths[name], seqs, cfg, info[name][1], args.threads)
            kl, top1, ppl = quality(ref, lps, seqs)
            count, kind, zp, levels = kinds[name]
            algo = "reference" if name == "symb-fp32" else ORT_VARIANTS[name][0] if name in ORT_VARIANTS else "symb"
            rows.append({"name": name, "algorithm": algo, "head": info[name][0], "matmulnbits": count, "blocks": kind,
                         "zero_points": zp, "accuracy_level": levels, "bytes": sizes[name], "mb": sizes[name] / 1e6,
                         "x_fp32": sizes[name] / sizes["symb-fp32"], "kl": kl, "top1": top1, "ppl_ratio": ppl,
                         "quant_s": seconds.get(name), "quant_s_from": "given" if name in symb else "timed here" if name in seconds else None,
                         "path": paths[name]})
            print(f"  {name}: KL {kl:.4f}", file=sys.stderr)
            del lps
            gc.collect()
        del ref
        after = uptime()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    import onnxruntime
    print(f"\nuptime before: {before}\nuptime after:  {after}\n")
    print(f"model: {args.dist}; onnxruntime {onnxruntime.__version__}, quality sessions with {args.threads} intra-op threads; "
          f"quantizers' threads: {args.quant_threads or 'their defaults'}")
    if feeds:
        print(f"calibration: {len(feeds)} windows x {args.calib_len} tokens from {calib_from}")
    print(f"eval: {len(seqs)} lines, {sum(map(len, seqs))} tokens ({eval_from}); KL(fp32 || file) per position, full-sequence logits")
    print()
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    head = "| file | algorithm | head | 4-bit nodes | zero points | acc. level | MB | x fp32 | KL | top-1 | ppl ratio | quant s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        q = fmt(r["quant_s"], ".1f") + (" (given)" if r["quant_s_from"] == "given" and r["quant_s"] is not None else "")
        print("| " + " | ".join([r["name"], r["algorithm"], r["head"], f"{r['matmulnbits']} {r['blocks']}" if r["matmulnbits"] else "-",
                                 r["zero_points"], r["accuracy_level"], f"{r['mb']:.2f}", f"{r['x_fp32']:.3f}", fmt(r["kl"], ".2e"),
                                 fmt(r["top1"], ".3f"), fmt(r["ppl_ratio"], ".4f"), q]) + " |")
    print()
    for name in names:
        if name in ORT_VARIANTS:
            print(f"{name}: {ORT_VARIANTS[name][1]}" + (" (file reused from --work)" if name in reused else ""))
    for name in symb:
        head_kind = info[name][0]
        if not head_kind.startswith("fp"):
            print(f"note: {name}'s head is {head_kind}, onnxruntime's are fp32: build it with head_bits = 16 to compare like with like")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dist": args.dist, "onnxruntime": onnxruntime.__version__, "calibration": {
                "windows": len(feeds), "tokens": args.calib_len, "from": calib_from} if feeds else None,
                "eval": {"lines": len(seqs), "tokens": int(sum(map(len, seqs))), "from": eval_from},
                "threads": args.threads, "quant_threads": args.quant_threads,
                "uptime_before": before, "uptime_after": after, "rows": rows}, f, indent=1)
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
