"""Judging model-written code: a completion's code against a data row's tests, in two bubblewrap sandboxes
per program, from which nothing reaches the trainer but the verdict.

Per program (posttrain.sandbox.backend = "bwrap", the default) two sandboxes run harness.py: the
*candidate* executes the completion's code, the *runner* the row's tests, calling into the candidate over
two pipes that carry data only (harness.py has the protocol). Only the runner holds the pipe the
verdict comes back on, and it reports a pass only when the tests ran to their end; the exit status of
either process means nothing. Each sandbox has:
- new user, PID, network (loopback only), IPC, UTS, mount and cgroup namespaces, no capabilities, no
  nested user namespaces, a new session; it dies with the process that started it, and killing its
  bwrap kills every process in its PID namespace. A root trainer's sandboxes run as uid/gid 65534, so
  that the kernel's process limit applies to them;
- a filesystem of read-only system libraries (/usr/lib*, /lib*), the interpreter and its standard library
  with every site-packages/dist-packages below them hidden, a /proc of its own PID namespace,
  /dev/{null,zero,random,urandom}, its input files read-only under /job, and one writable tmpfs
  /sandbox of posttrain.sandbox.disk_mb (also /tmp and /dev/shm) — nothing else of the host;
- the environment HOME, TMPDIR, PATH, LANG (and PWD), nothing inherited;
- limits: posttrain.sandbox.timeout_s of wall clock, then both sandboxes are killed; per process an address
  space of posttrain.sandbox.memory_mb, CPU time, file size and no core file; the processes of the
  sandbox's own user namespace at most posttrain.sandbox.processes; and, where this process may create
  cgroups (v1 memory and pids, typically as root), the whole program held to sandbox_memory_mb and
  sandbox_processes together, below this process's own cgroups.
posttrain.sandbox.backend = "none" runs the same two processes without any of this (trusted code only).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scaletrain.stages.rl.sandbox.runtime import Cgroup, Runtime, SandboxUnavailable, runtime, sweep_cgroups

__all__ = ["SANDBOX_MODES", "SandboxSettings", "SandboxUnavailable", "Verdict", "describe", "run_programs",
           "runtime", "sandbox_problem", "sweep_cgroups"]

HARNESS = Path(__file__).with_name("harness.py")
SANDBOX_MODES = ("bwrap", "none")
START_TIMEOUT_S = 30.0  # bwrap's namespace set-up; a start that takes longer is an error, not a verdict


@dataclass(frozen=True)
class SandboxSettings:
    """How programs are judged (the posttrain.sandbox.backend* keys)."""

    mode: str = "bwrap"
    timeout_s: float = 5.0
    memory_mb: int = 1024
    processes: int = 32
    disk_mb: int = 64
    workers: int = 0  # programs at a time; 0: two per CPU this process may use, at most 16
    python: str = ""  # the interpreter inside; '': this one, or /usr/bin/python3 where uid 65534 cannot read it

    def worker_count(self) -> int:
        # Two per CPU: a program's wall time is half waiting (namespace set-up, pipes, process start).
        return self.workers or min(16, 2 * len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    error: str = ""  # the program could not be judged (sandbox did not start, tests do not compile, ...)
    detail: str = ""  # why the tests failed


def _poll_read(fd: int, deadline: float) -> bytes | None:
    """Bytes from `fd` (b'' at end of file), or None at the deadline."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if poller.poll(left * 1000):
            return os.read(fd, 65536)


def _child_pid(info_fd: int, deadline: float) -> int | None:
    """The sandbox's first process (host pid), from bwrap's --info-fd; None if bwrap ended first."""
    data = b""
    while not (m := re.search(rb'"child-pid":\s*(\d+)\D', data)):
        chunk = _poll_read(info_fd, deadline)
        if not chunk:
            return None
        data += chunk
    return int(m.group(1))


def _said(proc: subprocess.Popen) -> str:
    """What a process said on stderr, once it is dead (bwrap's own errors: the programs write to /dev/null)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""


class Program:
    """One program's two processes, pipes and cgroup; `judge` returns the verdict and leaves nothing behind."""

    def __init__(self, code: str, tests: str, settings: SandboxSettings, rt: Runtime) -> None:
        self.code, self.tests, self.s, self.rt = code, tests, settings, rt
        self.fds: set[int] = set()
        self.procs: list[subprocess.Popen] = []
        self.cgroup: Cgroup | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds.update((r, w))
        return r, w

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self.fds:
                self.fds.discard(fd)
                os.close(fd)

    def _data(self, name: str, text: str) -> int:
        fd = os.memfd_create(name)
        self.fds.add(fd)
        data = text.encode("utf-8", errors="replace")
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _limits(self) -> list[str]:
        s, sandboxed = self.s, bool(self.rt.bwrap)
        return [str(s.memory_mb << 20), str(s.processes if sandboxed else 0), str(math.ceil(s.timeout_s) + 1),
                str(s.disk_mb << 20)]

    def _spawn(self, role: str, source: str, rfd: int, wfd: int, vfd: int) -> tuple[int | None, int | None]:
        """Start one side; returns bwrap's (info read end, block write end), or (None, None) without bwrap."""
        python = [self.rt.python, "-I", "-S", "-B", "-X", "utf8"]
        keep = [rfd, wfd] + ([vfd] if vfd >= 0 else [])
        tail = [role, "/job/input.py", str(rfd), str(wfd), str(vfd), *self._limits()]
        if not self.rt.bwrap:  # posttrain.sandbox.backend = "none": plain processes in a temporary directory
            assert self.tmp is not None
            job = Path(self.tmp.name) / role
            job.mkdir()
            (job / "input.py").write_text(source, errors="replace")
            tail[1] = str(job / "input.py")
            self.procs.append(subprocess.Popen(python + [str(HARNESS), *tail], cwd=job, env={}, pass_fds=keep,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, start_new_session=True))
            return None, None
        harness, job_fd = self._data("harness", _harness_source()), self._data("input", source)
        info_r, info_w = self._pipe()
        block_r, block_w = self._pipe()
        s = self.s
        argv = [self.rt.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox", *self.rt.mounts,
                "--proc", "/proc", "--dir", "/dev",
                *(a for dev in ("null", "zero", "random", "urandom") for a in ("--dev-bind", f"/dev/{dev}", f"/dev/{dev}")),
                "--size", str(s.disk_mb << 20), "--tmpfs", "/sandbox", "--symlink", "/sandbox", "/tmp",
                "--symlink", "/sandbox", "/dev/shm", "--dir", "/job",
                "--ro-bind-data", str(harness), "/job/harness.py", "--ro-bind-data", str(job_fd), "/job/input.py",
                "--remount-ro", "/", "--chdir", "/sandbox",
                "--setenv", "HOME", "/sandbox", "--setenv", "TMPDIR", "/sandbox", "--setenv", "PATH", "/usr/bin:/bin",
                "--setenv", "LANG", "C.UTF-8", "--info-fd", str(info_w), "--block-fd", str(block_r),
                "--", *python, "/job/harness.py", *tail]
        # Dropping root: setpriv execs bwrap (the trainer is not forked, however large); without it, Popen's
        # user= does it in a forked child.
        ids = {} if self.rt.uid is None or self.rt.setpriv else \
            {"user": self.rt.uid, "group": self.rt.uid, "extra_groups": []}
        self.procs.append(subprocess.Popen([*self.rt.setpriv, *argv], env={}, pass_fds=keep + [harness, job_fd, info_w, block_r],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, start_new_session=True, **ids))  # type: ignore[call-overload]
        self._close(harness, job_fd, info_w, block_r)
        return info_r, block_w

    def judge(self) -> Verdict:
        try:
            return self._judge()
        except Exception as e:  # the host side failed (fds, cgroups, fork): an error, never a pass
            return Verdict(False, error=f"the sandbox could not run the program: {type(e).__name__}: {e}")
        finally:
            self._cleanup()

    def _judge(self) -> Verdict:
        if not self.rt.bwrap:
            self.tmp = tempfile.TemporaryDirectory(prefix="scaletrain-reward-")
        to_candidate_r, to_candidate_w = self._pipe()
        to_runner_r, to_runner_w = self._pipe()
        verdict_r, verdict_w = self._pipe()
        sides = [self._spawn("candidate", self.code, to_candidate_r, to_runner_w, -1),
                 self._spawn("runner", self.tests, to_runner_r, to_candidate_w, verdict_w)]
        self._close(to_candidate_r, to_candidate_w, to_runner_r, to_runner_w, verdict_w)
        if self.rt.bwrap:  # hold both sandboxes until their processes are in the program's cgroup
            start = time.monotonic() + START_TIMEOUT_S
            pids = []
            for proc, (info_r, _) in zip(self.procs, sides):
                assert info_r is not None
                child = _child_pid(info_r, start)
                if child is None:
                    said = _said(proc)
                    return Verdict(False, error=f"the sandbox did not start: {said or f'exit status {proc.returncode}'}")
                pids += [proc.pid, child]
            if self.rt.cgroups is not None:
                self.cgroup = Cgroup(self.rt.cgroups, self.s.memory_mb << 20, self.s.processes)
                try:
                    self.cgroup.add(pids)
                except ProcessLookupError:  # bwrap failed while setting up (a mount, ...)
                    return Verdict(False, error=f"the sandbox did not start{self._bwrap_said()}")
            for _, block_w in sides:
                assert block_w is not None
                os.write(block_w, b"1")
        return self._await_verdict(verdict_r, time.monotonic() + self.s.timeout_s)

    def _await_verdict(self, fd: int, deadline: float) -> Verdict:
        data, ready = b"", False
        while True:
            chunk = _poll_read(fd, deadline)
            if chunk is None:
                return Verdict(False, detail=f"timed out after {self.s.timeout_s:g} s")
            if not chunk:
                if ready:  # the runner was killed (a limit) or crashed: the program is not judged a pass
                    return Verdict(False, detail="the test runner ended without a verdict")
                return Verdict(False, error=f"the test runner did not start{self._bwrap_said()}")
            data += chunk
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("ready"):
                    ready = True
                    continue
                error = str(msg.get("error") or "")
                if error:
                    error += self._bwrap_said()
                return Verdict(bool(msg.get("passed")) and not error, error, str(msg.get("detail") or ""))

    def _bwrap_said(self) -> str:
        said = "; ".join(t for t in (_said(p) for p in self.procs) if t)
        return f" ({said})" if said else ""

    def _cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                if self.rt.bwrap:
                    proc.kill()  # bwrap: its sandbox dies with it (--die-with-parent), the PID namespace whole
                else:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # unsandboxed: the session; escapees survive
                    except ProcessLookupError:
                        pass
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        self._close(*list(self.fds))
        if self.cgroup is not None:
            self.cgroup.close()
        if self.tmp is not None:
            self.tmp.cleanup()


@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    return HARNESS.read_text()


def run_programs(programs: list[tuple[str, str]], settings: SandboxSettings) -> list[Verdict]:
    """The verdict of each (code, tests) pair, judged `settings.worker_count()` at a time. Never raises
    for a program: whatever goes wrong is a failed verdict, with `error` set when it is not the program's fault."""
    try:
        rt = runtime(settings.mode, settings.python)
    except (SandboxUnavailable, OSError, subprocess.SubprocessError, ValueError) as e:
        return [Verdict(False, error=f"no sandbox: {e}")] * len(programs)
    if len(programs) <= 1:
        return [Program(code, tests, settings, rt).judge() for code, tests in programs]
    with ThreadPoolExecutor(min(settings.worker_count(), len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda p: Program(p[0], p[1], settings, rt).judge(), programs))


@functools.cache
def sandbox_problem(settings: SandboxSettings) -> str | None:
    """Why programs cannot be judged in sandboxes with these settings here (config validation), or None.
    Runs one tiny program through the real path (about 0.1 s; once per process)."""
    try:
        runtime(settings.mode, settings.python)
    except SandboxUnavailable as e:
        return str(e)
    (verdict,) = run_programs([("def f():\n    return 1\n", "assert f() == 1\n")], settings)
    if verdict.passed:
        return None
    why = verdict.error or verdict.detail
    return (f"the python_tests sandbox does not work here ({why}). It needs unprivileged user namespaces: "
            "sysctl user.max_user_namespaces > 0 (Debian ≤ 10: kernel.unprivileged_userns_clone = 1; Ubuntu ≥ "
            "23.10: kernel.apparmor_restrict_unprivileged_userns = 0 or an AppArmor profile for bwrap); or "
            "set posttrain.sandbox.backend = \"none\" for trusted code only")


def describe(settings: SandboxSettings) -> str:
    """One line for the training log: what isolates the programs here and which limits hold how."""
    if settings.mode == "none":
        return ("warning: python_tests: posttrain.sandbox.backend = 'none' — completions run UNSANDBOXED as this user, with the "
                "trainer's filesystem and network (trusted code only)")
    rt = runtime(settings.mode, settings.python)
    whole = "the whole program (cgroup v1)" if rt.cgroups else "each process (rlimits; no writable cgroups here)"
    return (f"python_tests sandbox: bubblewrap {rt.bwrap_version}, new user/pid/net/ipc/uts/mount namespaces, "
            f"{'uid 65534, ' if rt.uid is not None else ''}{rt.python} {rt.python_version} (standard library only); "
            f"per program: {settings.timeout_s:g} s, {settings.memory_mb} MiB memory for {whole}, "
            f"{settings.processes} processes per sandbox{' and program' if rt.cgroups else ''}, "
            f"{settings.disk_mb} MiB disk; {settings.worker_count()} programs at a time")
