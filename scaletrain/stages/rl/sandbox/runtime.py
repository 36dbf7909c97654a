"""What the python_tests sandboxes are made of on this machine, found once per process: bubblewrap and its
version, the interpreter they run and the read-only mounts that give it its standard library (and hide
every site-packages), whether this process may give each program its own v1 memory and pids cgroups,
and the uid a root trainer's sandboxes run as. stages/rl/sandbox/runner.py runs the programs.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # nobody: the user a root trainer's sandboxes run as
MIN_BWRAP = (0, 8, 0)  # --disable-userns, --size, --clearenv, --ro-bind-data
INSTALL_HINT = ("install bubblewrap (`apt-get install -y bubblewrap`, `dnf install bubblewrap`), or set "
                "posttrain.sandbox.backend = \"none\" for trusted code only (then nothing is isolated)")


class SandboxUnavailable(RuntimeError):
    """The isolation cannot be had here; the message names the fix."""


@dataclass(frozen=True)
class Runtime:
    bwrap: str  # '' for mode "none"
    bwrap_version: str
    python: str  # the interpreter's real path
    python_version: str
    mounts: tuple[str, ...]  # bwrap arguments for the read-only part of the filesystem
    cgroups: tuple[Path, Path] | None  # v1 memory and pids directories to create per-program cgroups in
    uid: int | None  # the sandboxes' uid, when it is not this process's
    setpriv: tuple[str, ...] = ()  # a root trainer's way to drop to `uid` in an exec (no fork of a big process)


_FACTS = ("import json, sys, sysconfig; g = sysconfig.get_config_var; print(json.dumps({"
          "'path': [p for p in sys.path if p], 'version': sys.version.split()[0], "
          "'lib': (g('LIBDIR') or '') + '/' + (g('INSTSONAME') or '') if g('Py_ENABLE_SHARED') else '', "
          "'packages': sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})}))")


def others_can_read(path: str) -> bool:
    """Whether a user other than the owner (uid 65534) can reach `path` through every directory above it."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        if not os.stat(Path(*parts[:i])).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _interpreter(requested: str, uid: int | None) -> str:
    options, problems = [requested] if requested else [sys.executable, "/usr/bin/python3"], []
    for option in options:
        real = os.path.realpath(option)
        if not os.path.isfile(real):
            problems.append(f"{option} does not exist")
        elif uid is not None and not others_can_read(real):
            problems.append(f"{real} is not readable by other users (a directory above it is closed, e.g. /root)")
        else:
            return real
    raise SandboxUnavailable(
        f"no Python interpreter for the sandbox{f' user (uid {uid})' if uid is not None else ''}: {'; '.join(problems)}. "
        "Set posttrain.sandbox.python to a world-readable python3, e.g. /usr/bin/python3 (`apt-get install -y python3`)")


def _mounts(python: str, facts: dict) -> tuple[str, ...]:
    args: list[str] = []
    bound: list[str] = []

    def under(p: str) -> bool:
        return any(p == b or p.startswith(b + "/") for b in bound)

    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            bound.append(d)
    for p in (python, facts["lib"], *facts["path"]):
        if p and os.path.exists(p) and not under(p):
            args += ["--ro-bind", p, p]
            bound.append(p)
    hidden = set(facts["packages"])  # installed packages are the host's, not the program's
    for pattern in ("/usr/lib*/python3*/*-packages", "/usr/lib/python3/dist-packages"):
        hidden.update(glob.glob(pattern))
    for p in sorted(hidden):
        if os.path.isdir(p) and under(p):
            args += ["--tmpfs", p, "--remount-ro", p]
    return tuple(args)


def _cgroup_bases() -> tuple[Path, Path] | None:
    """This process's own v1 memory and pids cgroups, if it may create cgroups below them (root, usually)."""
    try:
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                own[c] = path
        bases = tuple(Path("/sys/fs/cgroup") / c / own[c].lstrip("/") for c in ("memory", "pids"))
        probe = Cgroup((bases[0], bases[1]), 64 << 20, 8)
        probe.close()
        sweep_cgroups((bases[0], bases[1]))
        return bases[0], bases[1]
    except (OSError, KeyError, ValueError):
        return None


def sweep_cgroups(bases: tuple[Path, Path]) -> None:
    """Remove the empty program cgroups that trainers which died (no cleanup ran) left behind."""
    for base in bases:
        for d in base.glob("scaletrain-sandbox-*-*"):
            try:
                os.kill(int(d.name.split("-")[2]), 0)
            except ProcessLookupError:
                try:
                    d.rmdir()  # fails while any process is still in it
                except OSError:
                    pass
            except (ValueError, OSError):
                pass


@functools.cache
def runtime(mode: str, python: str) -> Runtime:
    """What the sandboxes are made of here (found once per process); SandboxUnavailable if they cannot be."""
    if mode == "none":
        return Runtime("", "", os.path.realpath(python or sys.executable), "", (), None, None)
    bwrap = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")
    if bwrap is None:
        raise SandboxUnavailable(f"`bwrap` (bubblewrap) is not installed: {INSTALL_HINT}")
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    version = tuple(int(x) for x in found.groups()) if found else (0, 0, 0)
    if version < MIN_BWRAP:
        raise SandboxUnavailable(f"{bwrap} is bubblewrap {'.'.join(map(str, version))}; the sandbox needs "
                                 f"{'.'.join(map(str, MIN_BWRAP))} or newer: {INSTALL_HINT}")
    uid = SANDBOX_UID if os.geteuid() == 0 else None
    real = _interpreter(python, uid)
    probe = subprocess.run([real, "-I", "-S", "-c", _FACTS], capture_output=True, text=True, timeout=60, env={})
    if probe.returncode:
        raise SandboxUnavailable(f"the sandbox's interpreter {real} does not run: {probe.stderr.strip()[-500:]}")
    facts = json.loads(probe.stdout)
    setpriv = shutil.which("setpriv") if uid is not None else None
    drop = (setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--") if setpriv else ()
    return Runtime(bwrap, ".".join(map(str, version)), real, facts["version"], _mounts(real, facts),
                   _cgroup_bases(), uid, drop)


class Cgroup:
    """One program's v1 memory and pids cgroups: its sandboxes' processes together, not each process."""

    _names = itertools.count()

    def __init__(self, bases: tuple[Path, Path], memory_bytes: int, processes: int) -> None:
        name = f"scaletrain-sandbox-{os.getpid()}-{next(self._names)}"
        self.dirs: list[Path] = []
        try:
            for base in bases:
                (base / name).mkdir()
                self.dirs.append(base / name)
            memory, pids = self.dirs
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # swap counts too, where it is accounted
                (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (pids / "pids.max").write_text(str(processes))
        except OSError:
            self.close()
            raise

    def add(self, pids: list[int]) -> None:
        for d in self.dirs:
            for pid in pids:
                (d / "cgroup.procs").write_text(str(pid))

    def close(self, wait_s: float = 5.0) -> None:
        """Remove the cgroups once their processes are gone (the kernel is tearing their namespaces down)."""
        deadline = time.monotonic() + wait_s
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"warning: sandbox cgroup {d} still busy after {wait_s:g} s; left behind",
                              file=sys.stderr)
                        break
                    time.sleep(0.005)
        self.dirs = []
