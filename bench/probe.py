#!/usr/bin/env python3
"""The adversarial probe of issue 31, as numbers: each case it found, tried
again, and a fuzz of manifests.

    python3 bench/probe.py [SYMB_BINARY] [--fuzz N]

Prints a table: case, tried, clean. "Clean" is what the case must do now:
a clear exit (2 for the user's input, 1 for a failed write, 128+N for a
signal), no panic, no abort, nothing half-written. The shared-cache cases
(a remote blob corrupted with its size kept, `cache push` of a corrupt
local blob, records a build did not upload) run against a real SeaweedFS in
`tests/remote.rs`; this script covers the rest. The binary defaults to
target/release/symb (build it first).
"""
import json, os, random, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
args = [a for a in sys.argv[1:] if not a.startswith("--")]
BIN = os.path.abspath(args[0]) if args else os.path.join(ROOT, "target", "release", "symb")
FUZZ = int(sys.argv[sys.argv.index("--fuzz") + 1]) if "--fuzz" in sys.argv else 200
DEMO = open(os.path.join(ROOT, "corpus", "symbiotic.txt")).read().splitlines()

TOKENIZER = '[project]\nname = "t"\noutput = "dist"\n\n[corpus]\nfiles = ["corpus/*.txt"]\neval_fraction = 0.1\n\n[tokenizer]\nvocab_size = 400\n'
TRAINING = TOKENIZER + '\n[base]\nmodel = "scratch"\nn_layer = 1\nn_head = 2\nn_embd = 32\nn_positions = 64\n\n[finetune]\nmethod = "full"\nbatch_size = 4\nblock_size = 32\nmax_steps = 2\neval_every = 1\n'
rows = []


def project(manifest=TOKENIZER, lines=100, build=True):
    root = tempfile.mkdtemp()
    os.makedirs(f"{root}/corpus")
    for i, n in enumerate("abc"):
        open(f"{root}/corpus/{n}.txt", "w").write("\n".join(DEMO[i * lines:(i + 1) * lines]) + "\n")
    open(f"{root}/symb.toml", "w").write(manifest)
    if build:
        r = run(root, "build")
        assert r.returncode == 0, r.stderr
    return root


def run(root, *argv, timeout=600):
    return subprocess.run([BIN, *argv], cwd=root, capture_output=True, text=True, timeout=timeout)


def no_crash(r):
    return r.returncode in (0, 1, 2, 3) and "panicked" not in r.stderr and "memory allocation" not in r.stderr


def row(case, results):
    rows.append((case, len(results), sum(results)))


# D1: sizes past any model, and one within bounds but past the machine.
sizes = []
for setting in ["n_embd = 65536", "n_positions = 4294967296", "n_layer = 100000", "n_head = 1000", "n_layer = 200\nn_embd = 16384\nn_head = 16"]:
    root = project(TOKENIZER + f'\n[base]\nmodel = "scratch"\n{setting}\n', build=False)
    r = run(root, "build")
    sizes.append(r.returncode == 2 and no_crash(r) and ("at most" in r.stderr or "GB of memory" in r.stderr))
root = project(TRAINING.replace("batch_size = 4", "batch_size = 1000000"), lines=40, build=False)
r = run(root, "build")
sizes.append(r.returncode == 2 and no_crash(r) and "GB of memory" in r.stderr)
row("D1 model or batch too large: exit 2, no abort", sizes)

# D5: status sees the output folder.
status = []
root = project()
shutil.rmtree(f"{root}/dist")
status.append(run(root, "status", "--exit-code").returncode == 1)
run(root, "build")
open(f"{root}/dist/tokenizer.json", "a").write(" ")
status.append(run(root, "status", "--exit-code").returncode == 1)
run(root, "build")
old = tempfile.mkdtemp()
shutil.copytree(f"{root}/dist", f"{old}/dist")
t = open(f"{root}/symb.toml").read().replace("vocab_size = 400", "vocab_size = 420")
open(f"{root}/symb.toml", "w").write(t)
run(root, "build")
shutil.rmtree(f"{root}/dist")
shutil.copytree(f"{old}/dist", f"{root}/dist")
status.append(run(root, "status", "--exit-code").returncode == 1)
run(root, "build")
status.append(run(root, "status", "--exit-code").returncode == 0)
row("D5 status: output gone, edited, stale; then current", status)

# D9: signals during training.
signals = []
long_training = TRAINING.replace("max_steps = 2", "max_steps = 100000").replace("eval_every = 1", "eval_every = 100000")
for sig in [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]:
    root = project(long_training, lines=40, build=False)
    p = subprocess.Popen([BIN, "build", "--json"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        e = json.loads(line)
        if e.get("event") == "progress" and e.get("stage") == "finetune" and e.get("step", 0) >= 3:
            break
    p.send_signal(sig)
    rest = p.stdout.read().splitlines()
    p.wait(timeout=60)
    signals.append(p.returncode == 128 + sig and bool(rest) and json.loads(rest[-1])["event"] == "interrupted")
row("D9 SIGTERM, SIGHUP, SIGINT: interrupted event, 128+N", signals)

# D8: a killed finetune resumes to the same metrics.json.
resumed = []
for _ in range(2):
    manifest = TRAINING.replace("max_steps = 2", "max_steps = 60").replace("eval_every = 1", "eval_every = 10\ncheckpoint_every = 5")
    reference = project(manifest, lines=100)
    root = project(manifest, lines=100, build=False)
    p = subprocess.Popen([BIN, "build"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(os.path.isfile(f"{root}/cache/v1/checkpoints/{d}/state.json") for d in (os.listdir(f"{root}/cache/v1/checkpoints") if os.path.isdir(f"{root}/cache/v1/checkpoints") else [])):
        time.sleep(0.005)
    p.kill()
    p.wait()
    run(root, "build")

    def record(r):
        for f in os.listdir(f"{r}/cache/v1/actions"):
            rec = json.load(open(f"{r}/cache/v1/actions/{f}"))
            if rec["stage"] == "finetune":
                return rec
    resumed.append(record(root)["outputs"] == record(reference)["outputs"] and record(root)["metrics"].get("resumed_from_step", 0) > 0)
row("D8 killed finetune resumed: same artifacts", resumed)

# D10 and the corpus: BOM, CR, CRLF; an eval split emptied; a short vocabulary.
corpus = []
root = project(build=False)
for n in "abc":
    os.remove(f"{root}/corpus/{n}.txt")
open(f"{root}/corpus/bom.txt", "w").write("\ufeff" + "\n".join(DEMO[:50]) + "\n")
open(f"{root}/corpus/mac.txt", "w").write("\r".join(DEMO[50:100]))
open(f"{root}/corpus/dos.txt", "w").write("\r\n".join(DEMO[100:150]) + "\r\n")
r = run(root, "build", "--json")
docs = [json.loads(l) for l in r.stdout.splitlines() if '"stage":"corpus"' in l and '"event":"stage"' in l]
rec = [json.load(open(f"{root}/cache/v1/actions/{f}")) for f in os.listdir(f"{root}/cache/v1/actions")]
metrics = next(x["metrics"] for x in rec if x["stage"] == "corpus")
corpus.append(r.returncode == 0 and metrics["documents"] == 150)
fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2")
root = project(f'[project]\nname = "t"\n\n[corpus]\nfiles = ["corpus/*.txt"]\n\n[base]\nmodel = "path:{fixture}"\n\n[export]\ntargets = ["fp32"]\n', build=False)
for n in "abc":
    open(f"{root}/corpus/{n}.txt", "w").write("Kan-ka vo aestel .\n" * 50)
r = run(root, "build")
corpus.append(r.returncode == 2 and "the eval split is empty" in r.stderr)
root = project(TOKENIZER.replace("vocab_size = 400", "vocab_size = 100000"), lines=20, build=False)
r = run(root, "build")
corpus.append(r.returncode == 0 and "of the 100000 that `tokenizer.vocab_size` asks for" in r.stderr)
row("D10 BOM/CR/CRLF, empty eval split, short vocabulary", corpus)

# A read-only cache (a read-only bind mount in a user namespace).
read_only = []
root = project()


def ro(*argv):
    script = 'mount --bind cache cache && mount -o remount,ro,bind cache && exec "$0" "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, BIN, *argv], cwd=root, capture_output=True, text=True)


read_only.append(ro("build").returncode == 0)
read_only.append(ro("status", "--exit-code").returncode == 0)
read_only.append(ro("cache", "verify").returncode == 0)
t = open(f"{root}/symb.toml").read().replace("vocab_size = 400", "vocab_size = 430")
open(f"{root}/symb.toml", "w").write(t)
r = ro("build")
read_only.append(r.returncode == 1 and "cannot write `" in r.stderr)
root = project(build=False)
t = open(f"{root}/symb.toml").read().replace('output = "dist"', 'output = "dist"\ncache = "' + "c" * 5000 + '"')
open(f"{root}/symb.toml", "w").write(t)
r = run(root, "build")
read_only.append(r.returncode == 2 and "symb.toml:4:" in r.stderr)
row("read-only cache: no-op build, status, verify; a write; a 5,000-character cache path", read_only)

# D6/D7: symb serve.
http = []
root = project(f'[project]\nname = "t"\n\n[corpus]\nfiles = ["corpus/*.txt"]\n\n[base]\nmodel = "path:{fixture}"\n\n[export]\ntargets = ["fp32"]\n', lines=30)
server = subprocess.Popen([BIN, "serve", "dist", "--port", "0"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = server.stdout.readline().strip()
port = int(url.rstrip("/").rsplit(":", 1)[1])


def exchange(head):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(head.encode())
    data = b""
    while chunk := s.recv(1 << 16):
        data += chunk
    s.close()
    return data


def get(path, headers=""):
    return exchange(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")


first = get("/onnx/model.onnx").split(b"\r\n\r\n")[0].decode()
tag = next(l.split(": ", 1)[1] for l in first.split("\r\n") if l.startswith("ETag:"))
http.append(get("/onnx/model.onnx", f"If-None-Match: {tag}\r\n").startswith(b"HTTP/1.1 304"))
http.append(get("/onnx/model.onnx", f"Range: bytes=0-99\r\nIf-Range: {tag}\r\n").startswith(b"HTTP/1.1 206"))
t = open(f"{root}/symb.toml").read().replace('targets = ["fp32"]', 'targets = ["fp32"]\nopset = 18')
open(f"{root}/symb.toml", "w").write(t)
run(root, "build")
http.append(get("/onnx/model.onnx", f"Range: bytes=0-99\r\nIf-Range: {tag}\r\n").startswith(b"HTTP/1.1 200"))
for bad in ["Content-Length: 5\r\nContent-Length: 6\r\n", "Content-Length: +5\r\n"]:
    http.append(get("/", bad).startswith(b"HTTP/1.1 400"))
http.append(get("/onnx/model.onnx", "Range: bytes=0-18446744073709551616\r\n").startswith(b"HTTP/1.1 206"))
server.kill()
row("D6/D7 serve: 304, If-Range across a rebuild, two or signed Content-Length, a huge range", http)

# Fuzzed manifests: values of the wrong kind, size or sign in every setting.
rng = random.Random(31)
VALUES = ["0", "-1", "1", "2", "65536", "4294967296", "18446744073709551616", "1e308", "-0.5", "0.99", "nan", "inf", '""', '"x"', '"' + "y" * 3000 + '"', "true", "[]", "{}", '["c_attn"]', '"scratch"', '"llama"']
lines = TRAINING.splitlines()
settable = [i for i, l in enumerate(lines) if " = " in l]
fuzz, long_runs = [], 0
for _ in range(FUZZ):
    mutated = list(lines)
    for i in rng.sample(settable, rng.randint(1, 3)):
        key = mutated[i].split(" = ")[0]
        mutated[i] = f"{key} = {rng.choice(VALUES)}"
    root = project("\n".join(mutated) + "\n", lines=40, build=False)
    try:
        r = run(root, "build", timeout=120)
        fuzz.append(no_crash(r) and (r.returncode == 0 or r.stderr.strip() != ""))
    except subprocess.TimeoutExpired:
        # A valid setting that trains for long (`max_steps` = 2^32): stopped here.
        long_runs += 1
        fuzz.append(True)
    shutil.rmtree(root, ignore_errors=True)
row(f"fuzzed manifests (seed 31): exit 0-3 with a message, no panic ({long_runs} still training at 120 s, stopped)", fuzz)

print(f"| case | tried | clean |\n|---|---|---|")
for case, tried, clean in rows:
    print(f"| {case} | {tried} | {clean} |")
