"""The wheel set carried to the lent GPU machines (benchmarks/gpu/wheels.lock.json) is complete: with the GPU
image's packages (benchmarks/gpu/image.txt) it meets every runtime requirement of scaletrain for Python 3.12,
within 60 MiB, one version each and nothing unneeded — checked offline from the lock (gpu_wheels.sh checks
the downloaded files against it byte for byte, and CI downloads them: .ci/run)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO

pytestmark = pytest.mark.unit

spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "benchmarks" / "gpu" / "wheels.py")
wheels = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = wheels  # dataclasses look their module up
spec.loader.exec_module(wheels)


@pytest.fixture(scope="module")
def lock():
    return wheels.read_lock()


def test_the_locked_wheels_close_the_runtime_requirements_over_the_image(lock):
    res = wheels.resolve(wheels.runtime_requirements(), wheels.read_image(), lock)
    assert res.ok, res.report()
    assert res.total_bytes <= 60 * 2**20
    names = {w.name for w in lock}
    # What the image lacks and scaletrain needs (megatron.core's datasets, HF datasets, wandb, tomli-w) is carried;
    # what the image has (torch, numpy, sentencepiece, …) is not.
    assert {"megatron-core", "datasets", "wandb", "tomli-w", "datasketch", "torchao"} <= names
    assert not names & set(wheels.read_image()), names & set(wheels.read_image())
    # cp312 wheels, pure-Python ones, or stable-ABI ones (torchao: cp310-abi3, which CPython 3.12 loads).
    assert all(w.filename.endswith(("-none-any.whl", "_x86_64.whl"))
               and ("cp312" in w.filename or "py3" in w.filename or "-abi3-" in w.filename)
               for w in lock), [w.filename for w in lock]


def test_the_image_runs_the_supported_torch():
    torch_req = next(Requirement(r) for r in wheels.runtime_requirements() if r.startswith("torch"))
    assert torch_req.specifier.contains(wheels.read_image()["torch"])  # 2.11.0: the oldest supported


def test_a_dropped_or_stray_or_oversized_wheel_is_refused(lock):
    roots, image = wheels.runtime_requirements(), wheels.read_image()
    no_dill = [w for w in lock if w.name != "dill"]
    res = wheels.resolve(roots, image, no_dill)
    assert not res.ok and any(m.startswith("dill") and "datasets" in m for m in res.missing), res.report()
    stray = dataclasses.replace(lock[0], name="left-pad", version="1.0", filename="left_pad-1.0-py3-none-any.whl")
    assert wheels.resolve(roots, image, [*lock, stray]).unused == ["left-pad"]
    old = dataclasses.replace(next(w for w in lock if w.name == "megatron-core"), version="0.1.0")
    res = wheels.resolve(roots, image, [*no_dill, old])
    assert any("megatron-core>=" in c for c in res.conflicts), res.report()
    big = dataclasses.replace(lock[0], size=61 * 2**20)
    assert not wheels.resolve(roots, image, [*lock[1:], big]).ok


def test_an_image_package_at_a_version_too_old_must_be_carried(lock):
    image = {**wheels.read_image(), "huggingface-hub": "0.20.0"}  # datasets 5 needs >= 1.31
    res = wheels.resolve(wheels.runtime_requirements(), image, lock)
    assert any(c.startswith("huggingface-hub") and "carry another version" in c for c in res.conflicts), res.report()
