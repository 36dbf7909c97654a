"""The wheels a lent GPU machine lacks: which, pinned, and proof that they are all it lacks.

The lent GPU machines (nvidia-h100-x1, nvidia-h200) run one image, Python 3.12, with no network;
`image.txt` beside this file lists its packages. scaletrain's runtime requirements (pyproject
`[project].dependencies`) need a few more, carried as py3.12 manylinux wheels (≤ 60 MiB in all);
`wheels.lock.json` pins them — name, version, file, sha256, size and the wheel's own requirements.

    python benchmarks/gpu/wheels.py lock           # network (PyPI): resolve what is missing and pin it
    python benchmarks/gpu/wheels.py check          # offline: the lock closes the requirements over the image
    python benchmarks/gpu/wheels.py check DIR      # offline: so do the wheels in DIR (gpu_wheels.sh runs this)
    python benchmarks/gpu/wheels.py check --installed   # on the GPU machine: so does what is installed there
    python benchmarks/gpu/wheels.py requirements   # the lock as pip's hash-checked requirements

`check` is a resolution without an index: every runtime requirement of scaletrain, and every
requirement of a carried wheel (markers evaluated for CPython 3.12 on x86-64 Linux), must be met by an
image package or by a carried wheel whose version is inside the specifier; image packages are not
descended into (the image is consistent as shipped). An image package known by name only is taken as
present at any version, and said so. It also refuses a wheel set that is over 60 MiB, carries two
versions of one package, or carries a wheel nothing requires ("exactly the missing ones").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGE = HERE / "image.txt"
LOCK = HERE / "wheels.lock.json"
LIMIT_BYTES = 60 * 2**20
PYTHON = "3.12"
# CPython 3.12.3 on x86-64 Linux: the image's interpreter, for evaluating requirement markers.
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
    "python_version": PYTHON, "sys_platform": "linux",
}
# pip matches manylinux tags exactly: glibc 2.28 and older, which any current image runs (the device
# notes' list; every wheel carried today is tagged 2.28 or older).
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# Carried versions not chosen by "what this environment has, else the newest": none today. (The lock
# step prefers the version installed where it runs, i.e. what CI tests, e.g. megatron-core 0.16.1.)
PINS: dict[str, str] = {}


def pip_target_args() -> list[str]:
    """pip download/install options that select py3.12 manylinux x86-64 binary wheels."""
    args = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


@dataclass(frozen=True)
class Wheel:
    name: str  # canonical
    version: str
    filename: str
    sha256: str
    size: int
    requires: tuple[str, ...]  # Requires-Dist lines, markers included

    @classmethod
    def read(cls, path: Path) -> Wheel:
        with zipfile.ZipFile(path) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            meta = Parser().parsestr(z.read(meta_name).decode())
        data = path.read_bytes()
        return cls(canonicalize_name(meta["Name"]), meta["Version"], path.name, hashlib.sha256(data).hexdigest(),
                   len(data), tuple(meta.get_all("Requires-Dist") or ()))


def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """{canonical name: version or None (known by name only)} of the GPU image's packages."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def read_lock(path: Path = LOCK) -> list[Wheel]:
    return [Wheel(**{**w, "requires": tuple(w["requires"])}) for w in json.loads(path.read_text())["wheels"]]


def applies(req: Requirement, extras: frozenset[str]) -> bool:
    """Whether `req` is needed on the image for a package requested with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


@dataclass
class Resolution:
    missing: list[str] = field(default_factory=list)  # "requirement (needed by X)"
    conflicts: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)  # image packages met by name only
    used: set[str] = field(default_factory=set)  # carried wheels something requires
    unused: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    total_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.conflicts or self.unused or self.duplicates) and self.total_bytes <= LIMIT_BYTES

    def report(self) -> str:
        lines = [f"carried: {len(self.used) + len(self.unused)} wheels, {self.total_bytes / 2**20:.1f} MiB "
                 f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)"]
        lines += [f"MISSING: {m}" for m in self.missing]
        lines += [f"CONFLICT: {c}" for c in self.conflicts]
        lines += [f"UNNEEDED: {u} (nothing requires it: carry exactly what is missing)" for u in self.unused]
        lines += [f"DUPLICATE: {d} (one version of each, or pip --target refuses the set)" for d in self.duplicates]
        if self.total_bytes > LIMIT_BYTES:
            lines.append("TOO LARGE: the wheels must fit the 64 MiB a device command may carry, with room for the tree")
        if self.assumed:
            lines.append("image packages known by name only, taken as present at a compatible version: "
                         + ", ".join(sorted(set(self.assumed))))
        lines.append("complete" if self.ok else "NOT complete")
        return "\n".join(lines)


def resolve(roots: list[str], image: dict[str, str | None], wheels: list[Wheel]) -> Resolution:
    """Close `roots` over the image and the carried `wheels` (see the module docstring)."""
    res = Resolution(total_bytes=sum(w.size for w in wheels))
    carried: dict[str, Wheel] = {}
    for w in wheels:
        if w.name in carried:
            res.duplicates.append(f"{w.name} {carried[w.name].version} and {w.version}")
        carried[w.name] = w
    queue: deque[tuple[Requirement, str]] = deque((Requirement(r), "scaletrain") for r in roots)
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        req, by = queue.popleft()
        name = canonicalize_name(req.name)
        if name in carried:  # a carried wheel wins over the image's copy (it is first on PYTHONPATH)
            w = carried[name]
            if not req.specifier.contains(Version(w.version), prereleases=True):
                res.conflicts.append(f"{req} (needed by {by}): carried {name} {w.version}")
                continue
            res.used.add(name)
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            for line in w.requires:
                sub = Requirement(line)
                if applies(sub, frozenset(req.extras)):
                    queue.append((sub, f"{name} {w.version}"))
        elif name in image:
            version = image[name]
            if version is None:
                res.assumed.append(name)
            elif not req.specifier.contains(Version(version), prereleases=True):
                res.conflicts.append(f"{req} (needed by {by}): the image has {name} {version}; carry another version")
        else:
            res.missing.append(f"{req} (needed by {by})")
    res.unused = sorted(set(carried) - res.used)
    return res


def check(wheel_dir: Path | None) -> int:
    lock = read_lock()
    wheels = [Wheel.read(p) for p in sorted(wheel_dir.glob("*.whl"))] if wheel_dir else lock
    res = resolve(runtime_requirements(), read_image(), wheels)
    print(res.report())
    if wheel_dir is not None:  # the files must be the locked ones, byte for byte
        got = {(w.filename, w.sha256) for w in wheels}
        want = {(w.filename, w.sha256) for w in lock}
        if got != want:
            print(f"the wheels in {wheel_dir} differ from {LOCK.name}: extra {sorted(got - want)}, "
                  f"missing {sorted(want - got)}")
            return 1
    return 0 if res.ok else 1


def check_installed() -> int:
    """On the GPU machine, after the install: the same closure over what this interpreter really has
    (sys.path, PYTHONPATH included: carried wheels and image alike, at their real versions)."""
    present: dict[str, Wheel] = {}
    for d in importlib.metadata.distributions():  # sys.path order: the first copy of a name is the one imported
        name = canonicalize_name(d.metadata["Name"] or "")
        if name and name not in present:
            present[name] = Wheel(name, d.version, "", "", 0, tuple(d.requires or ()))
    res = resolve(runtime_requirements(), {}, list(present.values()))
    problems = res.missing + res.conflicts
    print("\n".join([f"MISSING: {m}" for m in res.missing] + [f"CONFLICT: {c}" for c in res.conflicts])
          or f"complete: scaletrain's runtime requirements are met here ({len(res.used)} distributions)")
    return 1 if problems else 0


def _download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *pip_target_args(), "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    if len(new) != 1:
        raise SystemExit(f"pip download {spec}: expected one new wheel in {dest}, got {sorted(map(str, new))}")
    return new.pop()


def lock() -> int:
    """Resolve what the image lacks from PyPI, preferring the version this environment has installed
    (what CI tests) where it fits; write wheels.lock.json. Needs the network."""
    image = read_image()
    chosen: dict[str, Wheel] = {}
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            res = resolve(runtime_requirements(), image, list(chosen.values()))
            if res.conflicts:
                print(res.report())
                return 1
            if not res.missing:
                break
            req = Requirement(res.missing[0].split(" (needed by", 1)[0])
            name = canonicalize_name(req.name)
            try:
                have = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            version = PINS.get(name) or (have if have and req.specifier.contains(have, prereleases=True) else None)
            spec = f"{name}=={version}" if version else f"{name}{req.specifier}"
            print(f"carry {spec}  ({res.missing[0]})")
            chosen[name] = Wheel.read(_download(spec, Path(tmp)))
    out = {"python": PYTHON, "platforms": PLATFORMS,
           "note": "written by `python benchmarks/gpu/wheels.py lock`; checked by `... check`",
           "wheels": [w.__dict__ | {"requires": list(w.requires)} for w in sorted(chosen.values(), key=lambda w: w.name)]}
    LOCK.write_text(json.dumps(out, indent=1) + "\n")
    print(resolve(runtime_requirements(), image, list(chosen.values())).report())
    return 0


def requirements() -> int:
    for w in read_lock():
        print(f"{w.name}=={w.version} --hash=sha256:{w.sha256}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("lock")
    c = sub.add_parser("check")
    c.add_argument("wheel_dir", nargs="?", type=Path)
    c.add_argument("--installed", action="store_true", help="check this interpreter's packages instead")
    sub.add_parser("requirements")
    a = p.parse_args(argv)
    if a.cmd == "check":
        return check_installed() if a.installed else check(a.wheel_dir)
    return lock() if a.cmd == "lock" else requirements()


if __name__ == "__main__":
    raise SystemExit(main())
