#!/usr/bin/env bash
# Downloads into .whl/ the test and benchmark packages that the GPU machine's image lacks
# (expecttest for tests/passes, gguf for the SmolLM2 checkpoint, torchao for quantize_'s handler,
# optimum-quanto for transformers' QuantizedCache baseline), at the versions of this machine's
# .venv (scripts/install.sh test; the newest where it lacks one). scripts/gpu_check.sh installs
# .whl/*.whl on the device when the call carries it: run("...", carry=[".whl"]). .whl/ is
# git-ignored: run this once per checkout. Without it, tests/passes fails to import on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for pkg in expecttest gguf torchao optimum-quanto; do
  version=$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p' || true)
  spec=$pkg${version:+==$version}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec" 2>&1 | grep -v "^WARNING: Location" || true
  ls .whl | grep -qi "^${pkg//-/_}-" || { echo "fetch_device_wheels: no wheel for $spec" >&2; exit 1; }
done
du -sh .whl
