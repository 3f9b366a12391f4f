#!/usr/bin/env python3
"""ONNX export and quantization of a GPT-2 small sized model (124M
parameters, random weights): symb against the reference workflow, in the
same run; prints a table of wall time and peak memory per step.

    python3 bench/export.py [--skip-reference]

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


def timed(command, **kw):
    """Runs a command; returns its wall seconds and its own peak RSS in MB."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, command)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb", "--example", "make_gpt2"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="symb-export-bench-")
    model = os.path.join(work, "gpt2-small")
    subprocess.run([os.path.join(ROOT, "target/release/examples/make_gpt2"), model, "12", "768", "12", "50257", TOKENIZER], check=True)
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
    seconds, peak = timed([symb, "build", "--json"], cwd=project)
    rows.append(("symb: then verify x5 (ONNX Runtime vs candle) + bundle + output folder", seconds, peak))
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
        rows.append(("reference: total", total, max(r[2] for r in rows[1:])))
    if not args.skip_reference:
        print(f"\nexport + quantize: symb {symb_seconds:.1f} s, reference {total:.1f} s ({total / symb_seconds:.1f}x)")
    print()
    print("| step | wall s | peak MB |")
    print("|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.0f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
