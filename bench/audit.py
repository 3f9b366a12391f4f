#!/usr/bin/env python3
"""What symb does with bad input and hostile requests (issue 11), as numbers.

    python3 bench/audit.py [SYMB_BINARY]

Three parts, each ending in a count:
- bad inputs: each one applied to a freshly built project; symb must exit 2
  with an error and leave the project tree (corpus, cache, output) unchanged;
- path traversal and symlinks against `symb serve`: nothing outside the
  served folder may come back;
- slow and oversized requests against `symb serve`: threads held, memory,
  ranges, a negative Content-Length, an idle connection.
The binary defaults to target/release/symb (build it first).
"""
import hashlib, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "symb")
DEMO = open(os.path.join(ROOT, "corpus", "symbiotic.txt")).read().splitlines()
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2")


def bad_inputs():
    MANIFEST = '[project]\nname = "t"\noutput = "dist"\n\n[corpus]\nfiles = ["corpus/*.txt"]\neval_fraction = 0.1\n\n[tokenizer]\nvocab_size = 400\n'

    def tree(root):
        out = {}
        for d, dirs, files in os.walk(root, followlinks=False):
            for f in files:
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)
                if rel.startswith(("cache/v1/tmp", "cache/lock", "cache/v1/stat.json")):
                    continue
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else os.readlink(p) if os.path.islink(p) else "?"
        return out

    def project():
        root = tempfile.mkdtemp()
        os.makedirs(f"{root}/corpus")
        for i, n in enumerate("abc"):
            open(f"{root}/corpus/{n}.txt", "w").write("\n".join(DEMO[i*100:(i+1)*100]) + "\n")
        open(f"{root}/symb.toml", "w").write(MANIFEST)
        r = subprocess.run([BIN, "build"], cwd=root, capture_output=True)
        assert r.returncode == 0, r.stderr
        return root

    def edit(old, new):
        def f(root):
            t = open(f"{root}/symb.toml").read(); assert old in t, old
            open(f"{root}/symb.toml", "w").write(t.replace(old, new, 1))
        return f

    def write(rel, data):
        def f(root):
            os.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
            open(f"{root}/{rel}", "wb").write(data if isinstance(data, bytes) else data.encode())
        return f

    def both(*fs):
        def f(root):
            for g in fs: g(root)
        return f

    def symlink(target, rel):
        def f(root):
            os.symlink(target if not target.startswith("@") else f"{root}/{target[1:]}", f"{root}/{rel}")
        return f

    outside = tempfile.mkdtemp()
    long_line = " ".join(DEMO) * 120  # ~50 MB on one line
    CASES = [
        ("output = the corpus folder", edit('output = "dist"', 'output = "corpus"')),
        ("output through a symlink outside", both(symlink(outside, "lnk"), edit('output = "dist"', 'output = "lnk/dist"'))),
        ("output = a folder of the user's", both(write("docs/index.md", "docs"), edit('output = "dist"', 'output = "docs"'))),
        ("output = the manifest file", edit('output = "dist"', 'output = "symb.toml"')),
        ("output = the project folder", edit('output = "dist"', 'output = "."')),
        ("output = outside, by ..", edit('output = "dist"', 'output = "../elsewhere"')),
        ("output = a symlink to dist", both(symlink("@dist", "dl"), edit('output = "dist"', 'output = "dl"'))),
        ("cache = the corpus folder", edit('output = "dist"', 'output = "dist"\ncache = "corpus"')),
        ("cache = a folder of the user's", both(write("notes/todo.txt", "x"), edit('output = "dist"', 'output = "dist"\ncache = "notes"'))),
        ("cache = the output", edit('output = "dist"', 'output = "dist"\ncache = "dist"')),
        ("cache inside the output", edit('output = "dist"', 'output = "dist"\ncache = "dist/c"')),
        ("cache = the project folder", edit('output = "dist"', 'output = "dist"\ncache = "."')),
        ("a 50 MB corpus on one line", write("corpus/d.txt", long_line)),
        ("a corpus file that is not UTF-8", write("corpus/d.txt", b"abc\xff\xfe\n")),
        ("an empty corpus", both(edit('files = ["corpus/*.txt"]', 'files = ["empty/*.txt"]'), write("empty/e.txt", "\n\n"))),
        ("a glob that matches nothing", edit('files = ["corpus/*.txt"]', 'files = ["nothing/*.txt"]')),
        ("an invalid glob", edit('files = ["corpus/*.txt"]', 'files = ["corpus/[.txt"]')),
        ("a misspelt key", edit("vocab_size = 400", "vocab_sise = 400")),
        ("vocab_size below the alphabet", edit("vocab_size = 400", "vocab_size = 10")),
        ("a JSONL line that is not JSON", both(edit('files = ["corpus/*.txt"]', 'files = ["corpus/*.txt", "data/*.jsonl"]'), write("data/x.jsonl", '{"text": "a"}\n{oops\n'))),
        ("a CSV without the column", both(edit('files = ["corpus/*.txt"]', 'files = ["corpus/*.txt", "data/*.csv"]'), write("data/x.csv", "a,b\n1,2\n"))),
        ("a base folder without config.json", both(write("base/tokenizer.json", "{}"), edit("[tokenizer]", '[base]\nmodel = "path:base"\n\n[tokenizer]'))),
        ("a malformed tokenizer.json in the base folder", None),
        ("a negative eval_fraction", edit("eval_fraction = 0.1", "eval_fraction = -0.1")),
        ("a duplicated special token", edit("vocab_size = 400", 'vocab_size = 400\nspecial_tokens = ["<a>", "<a>"]')),
        ("an export dtype that does not exist", edit("[tokenizer]", '[export]\ntargets = ["q3"]\n\n[tokenizer]')),
        ("[tokenizer] without [corpus]", edit('[corpus]\nfiles = ["corpus/*.txt"]\neval_fraction = 0.1\n', "")),
        ("a TOML syntax error", edit("vocab_size = 400", "vocab_size = = 400")),
        ("a manifest that is not UTF-8", write("symb.toml", b"\xff\xfe[project]\n")),
    ]
    fixture = FIXTURE
    def malformed_tokenizer(root):
        os.makedirs(f"{root}/base")
        for f in ["config.json", "model.safetensors", "generation_config.json"]:
            shutil.copy(f"{fixture}/{f}", f"{root}/base/{f}")
        open(f"{root}/base/tokenizer.json", "w").write('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
        open(f"{root}/symb.toml", "w").write('[project]\nname = "t"\n\n[base]\nmodel = "path:base"\n\n[export]\ntargets = ["fp32"]\n')
    CASES[[c[0] for c in CASES].index("a malformed tokenizer.json in the base folder")] = ("a malformed tokenizer.json in the base folder", malformed_tokenizer)

    ok = 0
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    for name, apply in CASES:
        root = project()
        before = tree(root)
        apply(root)
        touched = tree(root)  # the bad input itself
        r = subprocess.run([BIN, "build"], cwd=root, capture_output=True, env=env, timeout=300)
        after = tree(root)
        unchanged = {k: v for k, v in after.items() if not k.startswith("cache/v1/refs")} == {k: v for k, v in touched.items() if not k.startswith("cache/v1/refs")}
        dist_same = {k: v for k, v in after.items() if k.startswith("dist/")} == {k: v for k, v in before.items() if k.startswith("dist/")}
        err = [l for l in r.stderr.decode(errors="replace").strip().splitlines() if l.startswith("error")]
        good = r.returncode == 2 and err and unchanged and dist_same and not os.listdir(outside)
        ok += good
        print(f"{'ok ' if good else 'BAD'} exit {r.returncode} {name}: {err[0][:150] if err else ''}" + ("" if unchanged else " [tree changed]"))
    print(f"{ok} of {len(CASES)} bad inputs: exit 2, an error, nothing changed")


def traversal():
    root = tempfile.mkdtemp()
    dist = f"{root}/dist"; os.makedirs(f"{dist}/onnx"); os.makedirs(f"{root}/secret")
    open(f"{dist}/index.html", "w").write("<p>page</p>")
    open(f"{root}/secret/passwd", "w").write("SECRET-CONTENT")
    open(f"{root}/secret.txt", "w").write("SECRET-CONTENT")
    os.symlink(f"{root}/secret/passwd", f"{dist}/leak.txt")
    os.symlink(f"{root}/secret", f"{dist}/etcdir")
    os.symlink("../secret.txt", f"{dist}/onnx/rel.onnx")
    os.symlink("/etc", f"{dist}/sys")
    os.symlink(f"{root}/secret/passwd", f"{dist}/index2.html")
    p = subprocess.Popen([BIN, "serve", dist, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = p.stdout.readline().strip(); host, port = url.split("//")[1].strip("/").split(":")
    def get(target):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536): data += chunk
        return data.decode(errors="replace")
    targets = ["/leak.txt", "/etcdir/passwd", "/onnx/rel.onnx", "/sys/passwd", "/sys/hostname", "/index2.html",
        "/../secret.txt", "/../secret/passwd", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/..%2fsecret.txt", "/%2e%2e%2fsecret.txt",
        "/onnx/../../secret.txt", "/onnx/%2e%2e/%2e%2e/secret.txt", "//etc/passwd", "/etc/passwd", f"/{root}/secret.txt", f"{root}/secret.txt",
        "/./../secret.txt", "/etcdir/../../secret.txt", "/..\\secret.txt", "/%00/../secret.txt"]
    refused = 0
    for t in targets:
        r = get(t)
        status = r.split("\r\n", 1)[0]
        leaked = "SECRET-CONTENT" in r or "root:x:0:0" in r
        refused += not leaked
        print(f"{'refused' if not leaked else 'LEAKED '} {status:28} {t}")
    print(f"{refused} of {len(targets)} traversal and symlink requests refused")
    p.kill()


def slow_clients():
    d = tempfile.mkdtemp(); open(f"{d}/index.html", "w").write("x" * 100)
    open(f"{d}/big.onnx", "wb").write(os.urandom(1 << 20))
    p = subprocess.Popen([BIN, "serve", d, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = p.stdout.readline().strip(); host, port = url.split("//")[1].strip("/").split(":"); port = int(port)
    socks = []
    for _ in range(300):
        s = socket.create_connection((host, port)); s.sendall(b"GET / HTTP/1.1\r\nHost:"); socks.append(s)
    time.sleep(1)
    threads = len(os.listdir(f"/proc/{p.pid}/task"))
    print(f"300 half-sent requests: {threads} threads in the server")
    for s in socks: s.close()
    time.sleep(0.5)
    s = socket.create_connection((host, port))
    t0 = time.time(); sent = 0
    try:
        s.sendall(b"GET / HTTP/1.1\r\nX-Long: ")
        chunk = b"a" * (1 << 20)
        for _ in range(64):
            s.sendall(chunk); sent += len(chunk)
    except OSError as e:
        pass
    rss = int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM")][0].split()[1]) // 1024
    resp = b""
    try:
        s.settimeout(2); resp = s.recv(200)
    except Exception: pass
    first = resp.split(bytes([13, 10]))[0].decode()
    print(f"a 64 MB header line: cut after {sent >> 20} MB sent; answer {first!r}; server peak RSS {rss} MB")
    s = socket.create_connection((host, port)); s.sendall(b"GET /big.onnx HTTP/1.1\r\nRange: bytes=1000000-\r\nConnection: close\r\n\r\n")
    data = b""
    while c := s.recv(65536): data += c
    head, body = data.split(b"\r\n\r\n", 1)
    status = head.split(bytes([13, 10]))[0].decode()
    print(f"Range bytes=1000000- of a 1 MiB file: {status}, {len(body)} bytes")
    s = socket.create_connection((host, port)); s.sendall(b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n"); print("Content-Length -5:", s.recv(100).split(b"\r\n")[0].decode())
    s = socket.create_connection((host, port)); t0 = time.time(); s.sendall(b"GET / HTTP/1.1\r\n"); s.settimeout(60)
    r = s.recv(100); print(f"an idle half-sent request is closed after {time.time() - t0:.1f} s")
    p.kill()

if __name__ == "__main__":
    if not os.path.isfile(BIN):
        sys.exit(f"no symb binary at {BIN}: run `cargo build --release` (or pass the binary)")
    bad_inputs()
    traversal()
    slow_clients()
