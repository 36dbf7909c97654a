#!/usr/bin/env bash
# On the CPU machine (needs PyPI): download exactly the py3.12 manylinux wheels that the lent GPU machines'
# image lacks (benchmarks/gpu/wheels.lock.json, hash-checked) into .whl/ (git-ignored), then prove offline
# that they and the image's packages (benchmarks/gpu/image.txt) meet all of scaletrain's runtime
# requirements, within 60 MiB. Then, on the GPU machine, with .whl carried: bash benchmarks/gpu_check.sh
#
#   bash benchmarks/gpu_wheels.sh [DIR]     # DIR defaults to .whl
#
# Re-pin after a dependency change with `python benchmarks/gpu/wheels.py lock` (also PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
rm -rf "$dir"
mkdir -p "$dir"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
python3 benchmarks/gpu/wheels.py requirements >"$reqs"
args=$(python3 -c 'import sys; sys.path.insert(0, "benchmarks/gpu"); import wheels; print(" ".join(wheels.pip_target_args()))')
# --no-deps: the lock already lists every wheel needed; --require-hashes: the files are the locked ones.
# PIP_CONSTRAINT is emptied: a machine-wide constraints file is about this machine's own installs.
# shellcheck disable=SC2086
PIP_CONSTRAINT="" python3 -m pip download --quiet --no-deps --require-hashes $args -d "$dir" -r "$reqs"
python3 benchmarks/gpu/wheels.py check "$dir"
du -sh "$dir"
