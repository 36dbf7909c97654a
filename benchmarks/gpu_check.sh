#!/usr/bin/env bash
# The prepared check for a lent H100/H200 (one command, ≤ 7 minutes on an H100 80GB): one table at the end.
#
#   here (CPU machine, PyPI):   bash benchmarks/gpu_wheels.sh        # the wheels the GPU image lacks → .whl/
#   there (device run, carry .whl):
#       bash benchmarks/gpu_check.sh [--quick] [--json $OUT/gpu_check.json]
#
# The image (Python 3.12, torch 2.11+cu130, triton, transformers, …; no network) lacks megatron-core, HF
# datasets, wandb, tomli-w and their needs: they are installed from the carried wheels only (--no-index),
# into a folder of their own put first on PYTHONPATH; scaletrain itself runs from this tree (PYTHONPATH,
# `python -m scaletrain`), nothing is built. Then benchmarks/gpu_check.py runs the rows.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; this script is for a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
site="${GPU_CHECK_SITE:-/tmp/scaletrain-site}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 3; }
else
  echo "gpu_check: no .whl/ here (run benchmarks/gpu_wheels.sh on the CPU machine and carry .whl)" >&2
fi
export PYTHONPATH="$site:$repo:$repo/kernels${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_check.py "$@"
