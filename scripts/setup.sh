#!/usr/bin/env bash
# Sets up .venv with swarm-node and its pinned dependencies. Safe to run again.
# torch: a CPU build on hosts without an NVIDIA GPU, PyPI's CUDA build on hosts with one.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0  # the version the test suite runs against; pyproject.toml allows a tested range
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "swarm-node needs Python 3.11 or 3.12"'

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
    else
        .venv/bin/python -m pip install -q --retries 1 --timeout 30 "torch==$TORCH_VERSION" \
            --extra-index-url https://download.pytorch.org/whl/cpu
    fi
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
