#!/usr/bin/env python3
"""symb's ONNX dtypes against onnxruntime's own quantizers on the real
SmolLM2-135M-Instruct (the GGUF file tests/setup.sh fetches): one table of
each file's size, its quality against symb's fp32 file, and its greedy
decoding speed in native ONNX Runtime and in a headless Chromium
(onnxruntime-web, WebAssembly).

    python3 bench/real_model.py --build                 # build the folder first (cached), then measure
    python3 bench/real_model.py --dist DIR              # a folder symb built with fp32, fp16, q8 and q4
    python3 bench/real_model.py --only symb-q8,ort-q8dyn --no-web --lines 10

Files: symb's fp32, fp16, q8 (model_quantized.onnx) and q4, and made here from
symb's fp32 file with onnxruntime's tools: quantize_dynamic (QInt8,
per-tensor: how optimum makes transformers.js's q8 files) and
MatMulNBitsQuantizer at 4 and 8 bits (block 32, symmetric, accuracy_level 4).
symb's export computes the tied head as MatMul(x, Transpose(embedding)), which
onnxruntime's quantizers do not quantize as a MatMul (they take MatMuls against
initializers only): MatMulNBitsQuantizer leaves the head fp32, and
quantize_dynamic quantizes the embedding for its Gather (uint8, per-tensor),
which the head then reads through a DequantizeLinear. The `-head` variants
materialise the transposed embedding as an initializer first, so that the head
is quantized as a MatMul (the Gather keeps its own copy of the embedding, so
those files are larger). The table's `head` column says what each file's head
computes with.

Quality (native ONNX Runtime, CPU, full-sequence logits without the KV cache):
mean KL(fp32 || file) per position, top-1 agreement with fp32 and the ratio of
perplexities, on --lines lines (half from src/stages/english.txt, as many as it
has, the rest spread over corpus/symbiotic.txt), tokenized with the folder's
tokenizer.json. Speed: greedy decoding with the KV cache, --steps single-token
steps after a --prompt-tokens prompt (the prefill is not timed), in native ONNX
Runtime (--threads intra-op threads) and in Debian's Chromium, headless, with
onnxruntime-web from tests/js/node_modules (--wasm-threads WebAssembly threads;
the page is served from 127.0.0.1 with COOP/COEP headers so threads are
allowed). Each side runs --runs times, alternating file by file; `uptime` is
printed before and after.

Needs: pip install onnx onnxruntime==1.32.0 tokenizers numpy; `bash
tests/setup.sh` (the GGUF file and tests/js/node_modules); Debian's chromium
(or --node-wasm: onnxruntime-web in Node instead of the browser).
"""
import argparse
import gc
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS = os.path.join(ROOT, "tests", "js")
ORT_WEB = os.path.join(JS, "node_modules", "onnxruntime-web")

SYMB_FILES = {"symb-fp32": "model.onnx", "symb-fp16": "model_fp16.onnx", "symb-q8": "model_quantized.onnx", "symb-q4": "model_q4.onnx"}
# name -> (how, head materialised first)
ORT_VARIANTS = {
    "ort-q8dyn": ("quantize_dynamic QInt8 per-tensor (optimum's q8)", False),
    "ort-q4": ("MatMulNBitsQuantizer bits=4 block 32 symmetric accuracy_level 4", False),
    "ort-q8": ("MatMulNBitsQuantizer bits=8 block 32 symmetric accuracy_level 4", False),
    "ort-q8dyn-head": ("ort-q8dyn after materialising the head", True),
    "ort-q4-head": ("ort-q4 after materialising the head", True),
    "ort-q8-head": ("ort-q8 after materialising the head", True),
}
ALL = list(SYMB_FILES) + list(ORT_VARIANTS)


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


# ---------------------------------------------------------------- the folder

MANIFEST = """[project]
name = "smollm2-real-model-bench"
output = {output}

[base]
model = {model}

[export]
targets = ["fp32", "fp16", "q8", "q4"]

[verify]
prompts = 2
max_new_tokens = 4
"""


def build(args):
    """symb build of a base-only project from the GGUF file (its cache makes a rebuild instant)."""
    os.makedirs(args.project, exist_ok=True)
    manifest = MANIFEST.format(output=json.dumps(args.dist), model=json.dumps("gguf:" + args.gguf))
    with open(os.path.join(args.project, "symb.toml"), "w") as f:
        f.write(manifest)
    print(f"symb build in {args.project} -> {args.dist}", file=sys.stderr)
    start = time.time()
    subprocess.run([args.symb, "build", "-q"], cwd=args.project, check=True)
    print(f"built in {time.time() - start:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- onnxruntime's variants

def materialise_head(model):
    """Transpose(2-D initializer) feeding a MatMul -> an initializer holding the transposed weights."""
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done = 0
    for n in list(g.node):
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 \
                and all(c.op_type == "MatMul" for c in consumers.get(n.output[0], [])):
            w = numpy_helper.to_array(inits[n.input[0]])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), n.output[0]))
            g.node.remove(n)
            done += 1
    assert done == 1, f"{done} Transpose(initializer) -> MatMul found, expected the tied head's one"
    return model


def make_variant(name, fp32, path):
    import onnx
    _, head = ORT_VARIANTS[name]
    base = name.removesuffix("-head")
    model = onnx.load(fp32)
    if head:
        model = materialise_head(model)
    if base == "ort-q8dyn":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # quantize_dynamic takes a path; MatMulConstBOnly (its default) skips MatMuls against computed tensors.
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            src = os.path.join(tmp, "src.onnx")
            onnx.save(model, src)
            del model
            quantize_dynamic(src, path, weight_type=QuantType.QInt8, per_channel=False)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        bits = 4 if base == "ort-q4" else 8
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        onnx.save(q.model.model, path)


# ---------------------------------------------------------------- what a file is

def describe(path):
    """(head's weight format, past_key_values element type) from the graph."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    types = {i.name: i.type.tensor_type.elem_type for i in g.input}
    past = next((t for n, t in types.items() if n.startswith("past_key_values.")), onnx.TensorProto.FLOAT)
    name = lambda t: onnx.helper.tensor_dtype_to_np_dtype(t).name.replace("float", "fp")
    passthrough = {"Cast", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"}

    def weight(t):
        while t in producer and producer[t].op_type in passthrough:
            t = producer[t].input[0]
        if t in inits:
            return name(inits[t].data_type)
        if t in producer and producer[t].op_type == "DequantizeLinear":
            return weight(producer[t].input[0]) + " DQ"
        if t in producer and producer[t].op_type == "Mul":  # symb's q8: Cast(int8) -> blocks * scales
            kinds = [weight(i) for i in producer[t].input]
            quantized = [k for k in kinds if "int" in k]
            return quantized[0] + " blocks" if quantized else "Mul"
        return producer[t].op_type if t in producer else "input"

    def matmul(t, depth=0):
        """The MatMul-like node that computes `t`, through casts, reshapes, biases and scales."""
        node = producer.get(t)
        if node is None or depth > 4:
            return None
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            return node
        if node.op_type in passthrough | {"Add", "Mul"}:
            return next((m for m in (matmul(i, depth + 1) for i in node.input) if m is not None), None)
        return None

    node = matmul("logits")
    if node is None:
        head = "?"
    elif node.op_type == "MatMulNBits":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        head = f"{bits}-bit b{block}"
    elif node.op_type in ("MatMul", "Gemm"):
        head = weight(node.input[1])
    else:  # dynamically quantized activations
        head = weight(node.input[1]) + " dyn"
    return head, name(past)


# ---------------------------------------------------------------- quality

def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def session(path, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not symb's unused initializer's warning
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(sess, ids, past, past_len, cfg, past_type):
    names = {i.name for i in sess.get_inputs()}
    total = past_len + len(ids)
    f = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
    if "position_ids" in names:
        f["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None]
    for layer in range(cfg["layers"]):
        for kind in ("key", "value"):
            k = f"past_key_values.{layer}.{kind}"
            f[k] = past[k] if past else np.zeros((1, cfg["kv_heads"], 0, cfg["head_dim"]), np.dtype(past_type.replace("fp", "float")))
    return f


def full_logits(path, seqs, cfg, past_type, threads):
    sess = session(path, threads)
    out = [log_softmax(sess.run(["logits"], feeds(sess, s, None, 0, cfg, past_type))[0][0].astype(np.float32)) for s in seqs]
    del sess
    return out


def quality(ref, lps, seqs):
    kl = np.concatenate([(np.exp(a) * (a - b)).sum(-1) for a, b in zip(ref, lps)])
    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, lps)])

    def nll(lp):
        return -sum(l[np.arange(len(s) - 1), s[1:]].sum() for l, s in zip(lp, seqs)) / sum(len(s) - 1 for s in seqs)
    return float(kl.mean()), float(top1.mean()), float(np.exp(nll(lps) - nll(ref)))


# ---------------------------------------------------------------- native decoding speed

def native_decode(path, prompt, steps, cfg, past_type, threads):
    sess = session(path, threads)
    outputs = [o.name for o in sess.get_outputs()]
    result = sess.run(outputs, feeds(sess, prompt, None, 0, cfg, past_type))
    tokens = [int(np.argmax(result[0][0, -1]))]
    past_len = len(prompt)
    start = time.perf_counter()
    for _ in range(steps):
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(outputs, result) if n.startswith("present.")}
        result = sess.run(outputs, feeds(sess, [tokens[-1]], past, past_len, cfg, past_type))
        past_len += 1
        tokens.append(int(np.argmax(result[0][0, -1])))
    seconds = time.perf_counter() - start
    del sess
    return steps / seconds, tokens


# ---------------------------------------------------------------- onnxruntime-web decoding speed

# Shared by the Chromium page and the Node fallback: load, prefill, `steps` timed single-token steps.
DECODE_JS = r"""
async function decode(ort, bytes, cfg) {
  const r = {};
  ort.env.wasm.numThreads = cfg.threads;
  const t0 = performance.now();
  const sess = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  r.load_s = (performance.now() - t0) / 1000;
  r.threads = ort.env.wasm.numThreads;
  const big = a => BigInt64Array.from(a, x => BigInt(x));
  const kv = sess.inputNames.filter(n => n.startsWith('past_key_values.'));
  const hasPos = sess.inputNames.includes('position_ids');
  const empty = () => new ort.Tensor(cfg.past_type, cfg.past_type === 'float16' ? new Uint16Array(0) : new Float32Array(0), [1, cfg.kv_heads, 0, cfg.head_dim]);
  const feeds = (ids, past, n) => {
    const s = ids.length, f = {
      input_ids: new ort.Tensor('int64', big(ids), [1, s]),
      attention_mask: new ort.Tensor('int64', big(Array(n + s).fill(1)), [1, n + s]),
    };
    if (hasPos) f.position_ids = new ort.Tensor('int64', big(ids.map((_, i) => n + i)), [1, s]);
    for (const k of kv) f[k] = past ? past[k] : empty();
    return f;
  };
  const h2f = h => { const e = (h >> 10) & 31, m = h & 1023, v = e === 0 ? m * 2 ** -24 : e === 31 ? (m ? NaN : Infinity) : (1 + m / 1024) * 2 ** (e - 15); return h >> 15 ? -v : v; };
  const argmaxLast = t => {
    const d = t.data, V = t.dims[t.dims.length - 1], n = d.length;
    const raw16 = t.type === 'float16' && d instanceof Uint16Array;
    let best = -Infinity, b = 0;
    for (let i = n - V; i < n; i++) { const x = raw16 ? h2f(d[i]) : Number(d[i]); if (x > best) { best = x; b = i - (n - V); } }
    return b;
  };
  let out = await sess.run(feeds(cfg.prompt, null, 0));
  let n = cfg.prompt.length;
  const tokens = [argmaxLast(out.logits)];
  const t1 = performance.now();
  for (let step = 0; step < cfg.steps; step++) {
    const past = {};
    for (const k of kv) past[k] = out[k.replace('past_key_values.', 'present.')];
    out = await sess.run(feeds([tokens[tokens.length - 1]], past, n));
    n += 1;
    tokens.push(argmaxLast(out.logits));
  }
  r.tok_s = cfg.steps / ((performance.now() - t1) / 1000);
  r.tokens = tokens;
  await sess.release();
  return r;
}
"""

PAGE = """<!doctype html><meta charset="utf-8"><title>symb real_model bench</title>
<script>
function report(r) { if (window.reported) return; window.reported = true; fetch('/result/%(key)s', {method: 'POST', body: JSON.stringify(r)}); }
addEventListener('error', e => report({error: 'page error: ' + e.message}));
addEventListener('unhandledrejection', e => report({error: 'unhandled rejection: ' + String(e.reason && e.reason.message || e.reason)}));
</script>
<script type="module">
import * as ort from '/ort/ort.wasm.min.mjs';
%(decode)s
const cfg = %(cfg)s;
ort.env.wasm.wasmPaths = '/ort/';
let r = {};
try {
  const bytes = new Uint8Array(await (await fetch('/model/%(key)s')).arrayBuffer());
  r = await decode(ort, bytes, cfg);
} catch (e) { r.error = String(e && e.message || e); }
r.cross_origin_isolated = self.crossOriginIsolated;
r.user_agent = navigator.userAgent;
report(r);
</script>
"""

NODE = """import * as ort from 'onnxruntime-web';
import fs from 'fs';
%(decode)s
const cfg = JSON.parse(process.argv[1]);
let r = {};
try { r = await decode(ort, new Uint8Array(fs.readFileSync(cfg.path)), cfg); } catch (e) { r.error = String(e && e.message || e); }
console.log(JSON.stringify(r));
process.exit(0);
"""


class Web:
    """A local server for the page, onnxruntime-web and the model files; one Chromium per measurement."""

    def __init__(self, chromium, timeout):
        self.chromium, self.timeout = chromium, timeout
        self.jobs, self.results = {}, {}
        self.done = threading.Condition()
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def headers_out(self, status, length, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length))
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()

            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/", 1)
                path = None
                if len(parts) == 2 and parts[0] == "page" and parts[1] in web.jobs:
                    key = parts[1]
                    cfg = dict(web.jobs[key]["cfg"])
                    body = (PAGE % {"key": key, "decode": DECODE_JS, "cfg": json.dumps(cfg)}).encode()
                    self.headers_out(200, len(body), "text/html; charset=utf-8")
                    self.wfile.write(body)
                    return
                if len(parts) == 2 and parts[0] == "model" and parts[1] in web.jobs:
                    path = web.jobs[parts[1]]["path"]
                elif len(parts) == 2 and parts[0] == "ort" and "/" not in parts[1] and ".." not in parts[1]:
                    path = os.path.join(ORT_WEB, "dist", parts[1])
                if not path or not os.path.isfile(path):
                    self.headers_out(404, 0, "text/plain")
                    return
                kind = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}.get(os.path.splitext(path)[1], "application/octet-stream")
                self.headers_out(200, os.path.getsize(path), kind)
                with open(path, "rb") as f:
                    try:
                        shutil.copyfileobj(f, self.wfile, 1 << 20)
                    except (BrokenPipeError, ConnectionResetError):
                        pass

            def do_POST(self):
                key = self.path.strip("/").split("/", 1)[-1]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.headers_out(204, 0, "text/plain")
                with web.done:
                    web.results[key] = json.loads(body or b"{}")
                    web.done.notify_all()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run(self, key, path, cfg):
        self.jobs[key] = {"path": path, "cfg": cfg}
        profile = tempfile.mkdtemp(prefix="symb-bench-chromium-")
        log = open(os.path.join(profile, "chromium.log"), "w")
        proc = subprocess.Popen([self.chromium, "--headless", "--no-sandbox", f"--user-data-dir={profile}", "--no-first-run",
                                 "--no-default-browser-check", "--disable-extensions", f"{self.url}/page/{key}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + self.timeout
            with self.done:
                while key not in self.results and time.time() < deadline and proc.poll() is None:
                    self.done.wait(1)
            result = self.results.get(key)
            if result is None:
                exited = proc.poll()
                result = {"error": f"Chromium exited ({exited}) without a result" if exited is not None else f"no result in {self.timeout} s"}
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            log.close()
            shutil.rmtree(profile, ignore_errors=True)
            del self.jobs[key]
        return result

    def close(self):
        self.server.shutdown()


def node_run(path, cfg, timeout):
    script = NODE % {"decode": DECODE_JS}
    try:
        r = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(dict(cfg, path=path))], cwd=JS,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout} s"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}


# ---------------------------------------------------------------- main

def texts(n):
    english = [l.strip() for l in open(os.path.join(ROOT, "src", "stages", "english.txt"), encoding="utf-8") if l.strip()]
    english = english[:min(n // 2, len(english))]
    symbiotic = [l.strip() for l in open(os.path.join(ROOT, "corpus", "symbiotic.txt"), encoding="utf-8") if l.strip()]
    rest = n - len(english)
    step = max(1, len(symbiotic) // max(rest, 1))
    return english, symbiotic[::step][:rest]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dist", help="symb's output folder with fp32, fp16, q8 and q4 (default: PROJECT/dist)")
    ap.add_argument("--build", action="store_true", help="build --dist first from --gguf (a project in --project)")
    ap.add_argument("--project", default=os.path.join(ROOT, "target", "real_model"), help="--build's project folder, kept for its cache (default: target/real_model)")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "tests", ".models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--symb", default=os.path.join(ROOT, "target", "release", "symb"))
    ap.add_argument("--work", help="keep onnxruntime's variants in this folder and reuse those already there (default: a temporary folder)")
    ap.add_argument("--only", help="comma-separated files to measure (symb-fp32 is always measured: it is the reference): " + ", ".join(ALL))
    ap.add_argument("--no-native", action="store_true", help="skip native decoding speed")
    ap.add_argument("--no-web", action="store_true", help="skip the browser's decoding speed")
    ap.add_argument("--no-quality", action="store_true", help="skip KL, top-1 and perplexity")
    ap.add_argument("--lines", type=int, default=40, help="lines for quality (default 40)")
    ap.add_argument("--max-line-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=31, help="timed single-token decoding steps (default 31)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="native intra-op threads (default 2)")
    ap.add_argument("--wasm-threads", type=int, default=1, help="onnxruntime-web WebAssembly threads (default 1)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "chromium",
                    help="the browser (default: $CHROMIUM, else chromium on the PATH)")
    ap.add_argument("--node-wasm", action="store_true", help="onnxruntime-web in Node instead of Chromium (a fallback)")
    ap.add_argument("--web-timeout", type=float, default=900, help="seconds per file in the browser")
    args = ap.parse_args()
    args.project = os.path.abspath(args.project)
    args.dist = os.path.abspath(args.dist or os.path.join(args.project, "dist"))
    args.gguf, args.symb = os.path.abspath(args.gguf), os.path.abspath(args.symb)
    names = ALL if not args.only else ["symb-fp32"] + [n for n in args.only.split(",") if n and n != "symb-fp32"]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown file {', '.join(unknown)}: choose from {', '.join(ALL)}")

    if not args.no_web and not os.path.isdir(ORT_WEB):
        sys.exit(f"{ORT_WEB} is missing: run `bash tests/setup.sh` (or pass --no-web)")
    if not args.no_web and not args.node_wasm and not shutil.which(args.chromium):
        sys.exit(f"no browser at {args.chromium!r}: pass --chromium PATH, --node-wasm (onnxruntime-web in Node) or --no-web")
    if args.build:
        build(args)
    onnx_dir = os.path.join(args.dist, "onnx")
    fp32 = os.path.join(onnx_dir, SYMB_FILES["symb-fp32"])
    if not os.path.isfile(fp32):
        sys.exit(f"{fp32} is missing: pass --build, or --dist a folder symb built with targets fp32, fp16, q8, q4")
    with open(os.path.join(args.dist, "config.json")) as f:
        config = json.load(f)
    cfg = {"layers": config["num_hidden_layers"], "kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
           "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]}

    work = args.work or tempfile.mkdtemp(prefix="symb-real-model-")
    os.makedirs(work, exist_ok=True)
    try:
        paths = {}
        for name in names:
            if name in SYMB_FILES:
                path = os.path.join(onnx_dir, SYMB_FILES[name])
                if not os.path.isfile(path):
                    sys.exit(f"{path} is missing: build the folder with targets fp32, fp16, q8, q4")
            else:
                path = os.path.join(work, name + ".onnx")
                if not os.path.isfile(path):
                    start = time.time()
                    print(f"making {name} ({ORT_VARIANTS[name][0]})", file=sys.stderr)
                    make_variant(name, fp32, path)
                    print(f"  {time.time() - start:.0f} s", file=sys.stderr)
            paths[name] = path
        sizes = {n: sum(os.path.getsize(os.path.join(os.path.dirname(p), f)) for f in os.listdir(os.path.dirname(p))
                        if f == os.path.basename(p) or f.startswith(os.path.basename(p) + "_data")) for n, p in paths.items()}
        info = {n: describe(p) for n, p in paths.items()}

        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(os.path.join(args.dist, "tokenizer.json"))
        english, symbiotic = texts(args.lines)
        seqs = [tokenizer.encode(t).ids[:args.max_line_tokens] for t in english + symbiotic]
        seqs = [s for s in seqs if len(s) >= 2]
        prompt = []
        for line in english or symbiotic:
            prompt += tokenizer.encode(line).ids
            if len(prompt) >= args.prompt_tokens:
                break
        prompt = prompt[:args.prompt_tokens]

        before = uptime()
        print(f"uptime before: {before}", file=sys.stderr)
        rows = {n: {} for n in names}
        if not args.no_quality:
            print(f"quality: {len(seqs)} lines, {sum(map(len, seqs))} tokens", file=sys.stderr)
            ref = full_logits(paths["symb-fp32"], seqs, cfg, info["symb-fp32"][1], args.threads)
            for name in names:
                lps = ref if name == "symb-fp32" else full_logits(paths[name], seqs, cfg, info[name][1], args.threads)
                rows[name]["kl"], rows[name]["top1"], rows[name]["ppl"] = quality(ref, lps, seqs)
                print(f"  {name}: KL {rows[name]['kl']:.4f}", file=sys.stderr)
                del lps
                gc.collect()
            del ref
            gc.collect()

        web = None
        if not args.no_web and not args.node_wasm:
            web = Web(args.chromium, args.web_timeout)
        web_side = "Node wasm" if args.node_wasm else "Chromium wasm"
        notes, threads_seen, agents = [], set(), set()
        for run in range(args.runs):
            for name in names:
                past_type = info[name][1]
                if not args.no_native:
                    tok_s, tokens = native_decode(paths[name], prompt, args.steps, cfg, past_type, args.threads)
                    rows[name].setdefault("native", []).append(tok_s)
                    rows[name].setdefault("native_tokens", tokens)
                    print(f"  run {run + 1} {name} native {tok_s:.1f} tok/s", file=sys.stderr)
                    gc.collect()
                if not args.no_web:
                    job = dict(cfg, prompt=prompt, steps=args.steps, threads=args.wasm_threads, past_type=past_type.replace("fp", "float"))
                    r = node_run(paths[name], job, args.web_timeout) if args.node_wasm else web.run(f"{name}-{run}", paths[name], job)
                    if "error" in r:
                        rows[name].setdefault("web", []).append(None)
                        notes.append(f"{name} run {run + 1} in {web_side}: {r['error']}")
                        print(f"  run {run + 1} {name} {web_side}: error {r['error']}", file=sys.stderr)
                        continue
                    rows[name].setdefault("web", []).append(r["tok_s"])
                    threads_seen.add((r.get("threads"), r.get("cross_origin_isolated")))
                    agents.add(r.get("user_agent"))
                    print(f"  run {run + 1} {name} {web_side} {r['tok_s']:.1f} tok/s (load {r['load_s']:.1f} s)", file=sys.stderr)
                    native_tokens = rows[name].get("native_tokens")
                    if native_tokens and r["tokens"] != native_tokens and run == 0:
                        same = next((i for i, (a, b) in enumerate(zip(native_tokens, r["tokens"])) if a != b), len(native_tokens))
                        notes.append(f"{name}: {web_side}'s greedy tokens leave native's at token {same} of {len(native_tokens)}")
        if web:
            web.close()
        after = uptime()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    import onnxruntime
    with open(os.path.join(ORT_WEB, "package.json")) as f:
        ort_web = json.load(f)["version"]
    print(f"\nuptime before: {before}\nuptime after:  {after}\n")
    print(f"SmolLM2-135M-Instruct from {os.path.relpath(args.dist, ROOT) if args.dist.startswith(ROOT) else args.dist}; "
          f"onnxruntime {onnxruntime.__version__} (native, {args.threads} intra-op threads), onnxruntime-web {ort_web}")
    if not args.no_quality:
        print(f"quality vs symb-fp32: {len(seqs)} lines ({len(english)} english.txt, {len(symbiotic)} symbiotic.txt), "
              f"{sum(map(len, seqs))} tokens, full-sequence logits in native onnxruntime")
    print(f"speed: greedy, {len(prompt)}-token prompt, {args.steps} timed single-token steps with the KV cache, runs per side: {args.runs}")
    if not args.no_web:
        if args.node_wasm:
            print(f"web side: onnxruntime-web in Node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}, "
                  f"WebAssembly threads {sorted(t for t, _ in threads_seen)} (asked {args.wasm_threads})")
        else:
            print(f"web side: headless Chromium ({'; '.join(sorted(a or '?' for a in agents))}), WebAssembly threads in use "
                  f"{sorted(t for t, _ in threads_seen)} (asked {args.wasm_threads}), crossOriginIsolated {sorted({c for _, c in threads_seen})}")
    print()
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    runs = lambda v: [fmt(x, ".1f") if x is not None else "error" for x in (v or [])] + ["-"] * (args.runs - len(v or []))
    head = f"| file | head | MB | x fp32 | KL | top-1 | ppl ratio | " + " | ".join(f"native tok/s {i + 1}" for i in range(args.runs)) + " | " \
        + " | ".join(f"{web_side} tok/s {i + 1}" for i in range(args.runs)) + " |"
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for name in names:
        r = rows[name]
        cells = [name, info[name][0], f"{sizes[name] / 1e6:.1f}", f"{sizes[name] / sizes['symb-fp32']:.3f}",
                 fmt(r.get("kl"), ".2e"), fmt(r.get("top1"), ".3f"), fmt(r.get("ppl"), ".4f")] + runs(r.get("native")) + runs(r.get("web"))
        print("| " + " | ".join(cells) + " |")
    print()
    for name in names:
        if name in ORT_VARIANTS:
            print(f"{name}: {ORT_VARIANTS[name][0]}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
