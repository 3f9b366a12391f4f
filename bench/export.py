#!/usr/bin/env python3
"""ONNX export and quantization of a GPT-2 small sized model (124M
parameters, random weights) or a SmolLM2-135M shaped one (30 layers, hidden
576, 9/3 heads, vocab 49,152, tied): symb against the reference workflow, in
the same run; prints a table of wall time and peak memory per step, and
greedy decoding speed in ONNX Runtime (2 threads, 64 new tokens) of each
side's fp32, q8 and q4 files with their sizes.

    python3 bench/export.py [--shape gpt2-small|smollm2] [--skip-reference]

Reference (the transformers.js conversion recipe): optimum-cli export,
onnxslim, fp16 (onnxruntime.transformers.float16), q8 (quantize_dynamic),
q4 (MatMulNBitsQuantizer), q4f16. Needs, in the Python that runs this:
pip install torch transformers optimum-onnx onnxruntime onnxslim onnx-ir.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2", "tokenizer.json")

STEP = r"""
import sys, time, resource
step, src, dst = sys.argv[1:4]
start = time.perf_counter()
if step == "slim":
    import onnxslim
    onnxslim.slim(src, dst)
elif step == "fp16":
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, dst)
elif step == "q8":
    from onnxruntime.quantization import quantize_dynamic, QuantType
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
elif step in ("q4", "q4f16"):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True)
    q.process()
    model = q.model.model
    if step == "q4f16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, dst)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# Greedy decoding with the KV cache in ONNX Runtime: tokens per second.
DECODE = r"""
import sys, time, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
ids = list(range(100, 116))
def feed(ids, total, past):
    f = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
    if "position_ids" in names:
        f["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None]
    f.update(past)
    return f
past = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), np.float16 if "float16" in p.type else np.float32) for p in pasts}
outputs = [o.name for o in session.get_outputs()]
result = session.run(outputs, feed(ids, len(ids), past))
total = len(ids)
start = time.perf_counter()
for _ in range(64):
    token = int(np.argmax(result[0][0, -1]))
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(outputs[1:], result[1:])}
    total += 1
    result = session.run(outputs, feed([token], total, past))
print(64 / (time.perf_counter() - start))
"""

MAKE_LLAMA = r"""
import sys, shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tokenizer = sys.argv[1:3]
torch.manual_seed(0)
config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
shutil.copy(tokenizer, out)
"""


def timed(command, stdout=None, **kw):
    """Runs a command; returns its wall seconds and its own peak RSS in MB.
    `stdout`, a file, receives its standard output."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, command)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--shape", choices=["gpt2-small", "smollm2"], default="gpt2-small")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (both sides' files) and print its path")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb", "--example", "make_gpt2"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="symb-export-bench-")
    model = os.path.join(work, args.shape)
    if args.shape == "gpt2-small":
        subprocess.run([os.path.join(ROOT, "target/release/examples/make_gpt2"), model, "12", "768", "12", "50257", TOKENIZER], check=True)
    else:
        llama_tokenizer = os.path.join(ROOT, "tests", "fixtures", "tiny-llama", "tokenizer.json")
        subprocess.run([sys.executable, "-c", MAKE_LLAMA, model, llama_tokenizer], check=True)
    rows = []
    project = os.path.join(work, "symb")
    os.makedirs(project)
    with open(os.path.join(project, "symb.toml"), "w") as f:
        f.write(f'[project]\nname = "bench"\n\n[base]\nmodel = "path:{model}"\n\n[export]\ntargets = ["fp32", "fp16", "q8", "q4", "q4f16"]\n')
    symb = os.path.join(ROOT, "target/release/symb")
    targets = [a for d in ["fp16", "q8", "q4", "q4f16"] for a in ("--target", f"quantize.{d}")]
    seconds, peak = timed([symb, "build", "--json", *targets], cwd=project)
    rows.append(("symb: export + fp16, q8, q4, q4f16 (one build, base copy included)", seconds, peak))
    symb_seconds = seconds
    # What the reference does not do: every file run in ONNX Runtime against
    # candle, config.json, and the output folder.
    with tempfile.TemporaryFile("w+") as events:
        seconds, peak = timed([symb, "build", "--json"], cwd=project, stdout=events)
        events.seek(0)
        stages = {e["stage"]: e["seconds"] for e in map(json.loads, events) if e.get("event") == "stage" and e.get("status") == "ran"}
    rows.append(("symb: then reference (candle) + verify x5 (ONNX Runtime) + bundle + output folder", seconds, peak))
    rows.append(("  of which the reference stage (candle, once per model)", stages.get("reference", float("nan")), float("nan")))
    for name in sorted(s for s in stages if s.startswith("verify.")):
        rows.append((f"  of which {name} (its own seconds; stages run side by side)", stages[name], float("nan")))
    # The five verify stages alone (the reference cached), as a user waits
    # for them: on `jobs` = cores, the engine's default.
    forced = [a for d in ["fp32", "fp16", "q8", "q4", "q4f16"] for a in ("--force", f"verify.{d}")]
    seconds, peak = timed([symb, "build", "--json", *forced], cwd=project)
    rows.append(("symb: the five verify stages again, wall (reference cached)", seconds, peak))
    if not args.skip_reference:
        out = os.path.join(work, "optimum")
        cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
        seconds, peak = timed([cli, "export", "onnx", "--model", model, "--task", "text-generation-with-past", out])
        rows.append(("reference: optimum-cli export", seconds, peak))
        src = os.path.join(out, "model.onnx")
        total = seconds
        for step, dst in [("slim", "model_slim.onnx"), ("fp16", "model_fp16.onnx"), ("q8", "model_quantized.onnx"), ("q4", "model_q4.onnx"), ("q4f16", "model_q4f16.onnx")]:
            seconds, peak = timed([sys.executable, "-c", STEP, step, src if step != "slim" else src, os.path.join(out, dst)])
            total += seconds
            rows.append((f"reference: {step}", seconds, peak))
        rows.append(("reference: total", total, max(r[2] for r in rows if r[0].startswith("reference"))))
    if not args.skip_reference:
        print(f"\nexport + quantize: symb {symb_seconds:.1f} s, reference {total:.1f} s ({total / symb_seconds:.1f}x)")
    print()
    print("| step | wall s | peak MB |")
    print("|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {'' if peak != peak else f'{peak:.0f}'} |")
    # Decoding speed of each side's files.
    ours = os.path.join(project, "dist", "onnx")
    files = [("symb fp32", os.path.join(ours, "model.onnx")), ("symb q8", os.path.join(ours, "model_quantized.onnx")), ("symb q4", os.path.join(ours, "model_q4.onnx"))]
    if not args.skip_reference:
        files += [("reference fp32", os.path.join(out, "model.onnx")), ("reference q8", os.path.join(out, "model_quantized.onnx")), ("reference q4", os.path.join(out, "model_q4.onnx"))]
    print()
    print("| file | MB | greedy tokens/s (ORT, 2 threads, 64 new) |")
    print("|---|---|---|")
    for name, path in files:
        size = sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path)) if f == os.path.basename(path) or f.startswith(os.path.basename(path) + "_data") or f == os.path.basename(path) + ".data")
        rate = float(subprocess.run([sys.executable, "-c", DECODE, path], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"| {name} | {size / 1e6:.0f} | {rate:.1f} |")
    if args.keep:
        print(f"\nkept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
