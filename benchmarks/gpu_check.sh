#!/usr/bin/env bash
# The prepared check for a lent H100/H200 (≤ 8 minutes): run from the repository root on the GPU machine.
#
#   bash benchmarks/gpu_check.sh            # prints one table at the end; record it in BENCHMARKS.md
#
# It installs nothing from the network beyond the package registries, builds its data from the bundled
# corpus, and fails loudly (non-zero, with the reason) where a part cannot run — a missing GPU, or
# Transformer Engine not importable (its tests then skip and the check reports it as a failure).
# Needs a CUDA build of torch and, for the te rows, `pip install -e '.[gpu]'` (transformer-engine[pytorch]).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; this script is for a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python benchmarks/gpu_check.py "$@"
