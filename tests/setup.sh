#!/usr/bin/env bash
# What the tests need besides cargo: Python's tokenizers and onnxruntime
# (independent references), and transformers.js for Node (tests/js).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt
# onnxruntime-node's install script would fetch CUDA libraries from outside
# the registries; its CPU library is already inside the package.
(cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
