"""The python_tests sandbox (stages/rl/sandbox/runner.py, harness.py), issue 21 §1: one test per attack
class that beat the old `python -I` child process, each asserting reward 0 and no effect outside the
sandbox; honest solutions in the usual test styles still score 1; a program that cannot be judged is an
error (counted, logged), never 1.0. Needs bubblewrap: skipped without it unless SCALETRAIN_REQUIRE_SANDBOX
is set (CI sets it, so there a missing sandbox fails)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import scaletrain
from scaletrain.cli import main
from scaletrain.stages.rl.rewards import PythonTests, score_rewards
from scaletrain.stages.rl.sandbox import runner as sandbox
from scaletrain.stages.rl.sandbox import runtime as sandbox_runtime
from scaletrain.stages.rl.sandbox.runner import SandboxSettings, run_programs

from conftest import TINY, read_metrics, tiny_overrides

pytestmark = pytest.mark.e2e

FAST = SandboxSettings(timeout_s=4.0, memory_mb=256, processes=16, disk_mb=16, workers=2)
WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.fixture(scope="module", autouse=True)
def sandbox_works():
    problem = sandbox.sandbox_problem(FAST)
    if problem and not os.environ.get("SCALETRAIN_REQUIRE_SANDBOX"):
        pytest.skip(f"no sandbox here: {problem}")
    assert problem is None, problem


def rewards(programs: list[tuple[str, str]], settings: SandboxSettings = FAST) -> list[float]:
    """The python_tests reward of each (code, tests), the code given as a completion would give it."""
    values, errors = PythonTests(settings).score_batch([f"Sure:\n```python\n{c}```\n" for c, _ in programs],
                                                       [{"tests": t} for _, t in programs])
    assert errors == [""] * len(programs), errors  # judged, not errors: a failure here must be the verdict
    return values


def processes_with(marker: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.fixture
def outside():
    """A world-writable host directory (a sandbox that could see it could write there, whatever its uid),
    and, after the test: no sandbox cgroup, fd or temporary directory of this process is left behind."""
    fds = len(os.listdir("/proc/self/fd"))
    d = Path(tempfile.mkdtemp(prefix="scaletrain-outside-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    rt = sandbox.runtime("bwrap", "")
    for base in rt.cgroups or ():
        assert not list(base.glob(f"scaletrain-sandbox-{os.getpid()}-*")), "a program's cgroup was left behind"
    assert len(os.listdir("/proc/self/fd")) <= fds, "file descriptors leaked"


# ------------------------------------------------------------------ the verdict cannot be forged

FORGERIES = {
    "sys.exit(0) before the tests": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0) before the tests": WRONG + "import os\nos._exit(0)\n",
    "raise SystemExit": WRONG + "raise SystemExit(0)\n",
    "a BaseException subclass": WRONG + "class Stop(BaseException):\n    pass\nraise Stop()\n",
    "exit 0 from an atexit hook": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "exit 0 from sys.excepthook": WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "exit inside the function under test": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "SystemExit inside the function under test": "def add(a, b):\n    raise SystemExit(0)\n",
    "a thread that exits 0 meanwhile": WRONG + "import os, threading, time\n"
                                               "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()\n",
    "an object equal to everything": "class E:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                                     "    __bool__ = lambda s: True\ndef add(a, b):\n    return E()\n",
    "output that looks like a pass": WRONG + "import os\nprint('PASSED')\nline = b'{\"passed\": true, \"detail\": \"\", "
                                     "\"error\": \"\"}\\n'\nfor fd in range(1, 256):\n    try:\n        os.write(fd, line)\n"
                                     "    except OSError:\n        pass\n",
    "a forged answer on its pipe": WRONG + "import json, os, struct\nfor msg in ({'hello': {'H': 0}}, {'ok': 5}, "
                                   "{'ok': True}):\n    data = json.dumps(msg).encode()\n    for fd in range(3, 64):\n"
                                   "        try:\n            os.write(fd, struct.pack('>I', len(data)) + data)\n"
                                   "        except OSError:\n            pass\n",
}


def test_exits_hooks_markers_and_always_equal_objects_score_zero(outside):
    values = rewards([(code, TESTS) for code in FORGERIES.values()] + [(RIGHT, TESTS)])
    assert {k: v for k, v in zip(FORGERIES, values) if v} == {}, "forged passes"
    assert values[-1] == 1.0  # the same tests, honest code


def test_the_candidate_cannot_reach_into_the_runner():
    """Through what the tests hand it: private attributes, modules and eval-like builtins are refused."""
    code = WRONG + ("def probe(f, mod=None, ev=None):\n    found = []\n    for attempt in (lambda: f.__globals__, "
                    "lambda: f._secret, lambda: mod.path, lambda: ev('1')):\n        try:\n"
                    "            found.append(attempt())\n        except Exception:\n            pass\n    return found\n")
    tests = ("import os\ndef helper(x):\n    return x\nhelper._secret = 1\n"
             "assert probe(helper) == []\ntry:\n    probe(helper, os)\nexcept TypeError:\n    pass\nelse:\n"
             "    assert False\ntry:\n    probe(helper, None, eval)\nexcept TypeError:\n    pass\nelse:\n    assert False\n")
    assert rewards([(code, tests)]) == [1.0]  # the tests pass only if every reach was refused


def test_monkeypatched_builtins_do_not_reach_the_tests():
    patch = "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.round = lambda *a: 5\nabs = builtins.abs\n"
    tests = "assert abs(add(2, 3) - 5) < 1e-9\nassert round(add(2, 3) + 0.1) == 5\n"
    assert rewards([(patch + WRONG, tests), (patch + RIGHT, tests)]) == [0.0, 1.0]


# ------------------------------------------------------------------ nothing outside is written or read

def test_writes_outside_its_own_directory_fail_and_leave_nothing(outside):
    token = uuid.uuid4().hex
    sentinel = outside / "sentinel.txt"
    sentinel.write_text("intact")
    sentinel.chmod(0o666)
    targets = [Path(sysconfig.get_paths()["purelib"]) / f"scaletrain_{token}.pth",  # runs at every interpreter start
               Path(scaletrain.__file__).parent / f"attack_{token}.py", Path.home() / f"attack_{token}",
               Path("/tmp") / f"attack_{token}", outside / f"attack_{token}"]
    code = WRONG + (f"import os\nfor p in {[str(t) for t in targets] + [str(sentinel)]!r}:\n"
                    "    try:\n        with open(p, 'a') as f:\n            f.write('# written by the sandboxed code\\n')\n"
                    "    except OSError:\n        pass\n")
    assert rewards([(code, TESTS)]) == [0.0]
    leaked = [t for t in targets if t.exists()]
    for t in leaked:
        t.unlink()
    assert leaked == []
    assert sentinel.read_text() == "intact"


def test_the_trainers_environment_host_files_and_packages_cannot_be_read(outside, monkeypatch):
    token = uuid.uuid4().hex
    monkeypatch.setenv("SCALETRAIN_TEST_SECRET", token)  # as an API key in the trainer's environment
    secret = outside / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o644)
    leak = (f"import glob, os\ndef leak():\n    found = [os.environ.get('SCALETRAIN_TEST_SECRET', '')]\n"
            f"    for p in ['/proc/%d/environ' % os.getppid(), *glob.glob('/proc/*/environ'), {str(secret)!r}]:\n"
            "        try:\n            found.append(open(p, 'rb').read().decode(errors='replace'))\n"
            "        except OSError:\n            pass\n    return ' '.join(found)\n")
    source = Path(scaletrain.__file__)
    read_source = f"def read():\n    return open({str(source)!r}).read()\n"
    packages = (f"import sys\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n"
                "def imports():\n    import scaletrain\n    return True\n")
    assert rewards([(leak, f"assert {token!r} in leak()\n"), (read_source, "assert 'scaletrain' in read()\n"),
                    (packages, "assert imports()\n")]) == [0.0, 0.0, 0.0]
    # What it sees instead: its own empty directory, its own processes, the standard library.
    honest = ("import os, json\ndef view():\n    return sorted(os.listdir('/')), os.getcwd(), os.listdir('.'), "
              "len([p for p in os.listdir('/proc') if p.isdigit()]), json.dumps([1]), sorted(os.environ)\n")
    assert rewards([(honest, "root, cwd, files, procs, js, env = view()\n"
                     "assert set(root) <= {'dev', 'job', 'lib', 'lib32', 'lib64', 'proc', 'sandbox', 'tmp', 'usr'}, root\n"
                     "assert cwd == '/sandbox' and files == [] and procs <= 4 and js == '[1]'\n"
                     "assert env == ['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR'], env\n")]) == [1.0]


# ------------------------------------------------------------------ no network, no signals, no leftovers

def test_no_network_not_even_the_hosts_loopback(outside):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port, got, stop = server.getsockname()[1], [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                got.append(conn.recv(64))
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        code = (f"import socket\ndef connect():\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'udp', "
                f"('127.0.0.1', {port}))\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    s.sendall(b'tcp')\n    return 'connected'\n")
        interfaces = "import socket\ndef interfaces():\n    return [name for _, name in socket.if_nameindex()]\n"
        assert rewards([(code, "assert connect() == 'connected'\n"),
                        (interfaces, "assert interfaces() == ['lo']\n")]) == [0.0, 1.0]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
    assert got == []


def test_the_code_cannot_signal_the_trainer_or_its_process_group(outside):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # in the trainer's group
    try:
        code = WRONG + (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {bystander.pid}):\n"
                        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                        f"for group in ({os.getpgid(0)}, 0):\n    try:\n        os.killpg(group, signal.SIGKILL)\n"
                        "    except OSError:\n        pass\nos.kill(-1, signal.SIGKILL)\n")
        assert rewards([(code, TESTS)]) == [0.0]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_no_process_outlives_the_program_not_even_a_setsid_daemon(outside):
    marker = f"scaletrain-leftover-{uuid.uuid4().hex}"
    daemon = ("import os, signal, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
              "    os._exit(0)\n")
    start = time.monotonic()
    assert rewards([(daemon + WRONG, TESTS), (daemon + "while True:\n    pass\n", TESTS)]) == [0.0, 0.0]
    assert time.monotonic() - start < FAST.timeout_s + 10
    deadline, left = time.monotonic() + 5, processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = processes_with(marker)
    for pid in left:  # never leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert left == [], "a process of the program outlived it"


def test_a_trainer_that_dies_takes_its_sandboxes_with_it(outside):
    marker = f"scaletrain-orphan-{uuid.uuid4().hex}"
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    os.execv(sys.executable, [sys.executable, '-c', "
            f"'import time; time.sleep(60)', {marker!r}])\nimport time\ntime.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", "from scaletrain.stages.rl.sandbox.runner import SandboxSettings, "
                                f"run_programs\nrun_programs([({code!r}, 'assert 1')], SandboxSettings(timeout_s=60))"])
    try:
        deadline = time.monotonic() + 20
        while not processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(marker), "the program did not start"
    finally:
        trainer.kill()  # a crash: no cleanup code of the trainer runs
        trainer.wait()
    deadline, left = time.monotonic() + 5, processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = processes_with(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
    bases = sandbox.runtime("bwrap", "").cgroups or ()
    if bases:  # its emptied cgroup goes at the next start of any trainer here
        sandbox.sweep_cgroups(bases)
        assert not [d for base in bases for d in base.glob(f"scaletrain-sandbox-{trainer.pid}-*")]


# ------------------------------------------------------------------ limits for the whole sandbox

FORKS = ("import os, time\ndef forks():\n    pids = []\n    try:\n        for _ in range(100):\n"
         "            pid = os.fork()\n            if pid == 0:\n                time.sleep(1)\n                os._exit(0)\n"
         "            pids.append(pid)\n    except OSError:\n        pass\n    for p in pids:\n        os.waitpid(p, 0)\n"
         "    return len(pids)\n")


def test_memory_processes_and_disk_are_limited_for_the_whole_sandbox(outside):
    hogs = ("import os, time\ndef hogs():\n    kids = []\n    for _ in range(4):\n        pid = os.fork()\n"
            "        if pid == 0:\n            try:\n                b = bytearray(100 << 20)\n"
            "                for i in range(0, len(b), 4096):\n                    b[i] = 1\n"
            "                time.sleep(0.5)\n                os._exit(0)\n            except MemoryError:\n"
            "                os._exit(1)\n        kids.append(pid)\n"
            "    return sum(os.waitpid(k, 0)[1] == 0 for k in kids)\n")  # each child is under the 256 MiB of FAST
    fill = ("def fill():\n    n = 0\n    try:\n        for i in range(40):\n            with open(f'f{i}', 'wb') as f:\n"
            "                f.write(b'x' * (1 << 20))\n            n += 1\n    except OSError:\n        pass\n    return n\n")
    programs = [(FORKS, "assert forks() >= 50\n"), (fill, "assert fill() == 40\n")]
    if sandbox.runtime("bwrap", "").cgroups is not None:  # without cgroups memory is limited per process only
        programs.append((hogs, "assert hogs() == 4\n"))
    assert rewards(programs) == [0.0] * len(programs)
    assert rewards([(FORKS, "assert 8 <= forks() < 16\n"), (fill, "assert 10 <= fill() <= 16\n")]) == [1.0, 1.0]


def test_without_cgroups_each_sandbox_counts_its_own_processes(outside):
    """RLIMIT_NPROC counts per user namespace: two sandboxes forking at once each get their own share
    (run as a root trainer, the sandboxes' uid 65534 is what makes the kernel enforce it at all)."""
    rt = dataclasses.replace(sandbox.runtime("bwrap", ""), cgroups=None)
    tests = "n = forks()\nassert 8 <= n < 16, n\n"
    verdicts = []
    threads = [threading.Thread(target=lambda: verdicts.append(sandbox.Program(FORKS, tests, FAST, rt).judge()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [v.passed for v in verdicts] == [True, True], verdicts


def test_a_non_root_trainer_gets_the_same_verdicts_with_rlimits_only():
    """The trainer as an unprivileged user (uid 65534 here): no setpriv, no cgroups; the namespaces, the
    harness and the per-user-namespace process limit still hold."""
    repo, python = Path(scaletrain.__file__).parents[1], "/usr/bin/python3"
    readable = os.path.exists(python) and sandbox_runtime.others_can_read(str(repo / "scaletrain" / "__init__.py"))
    if os.geteuid() != 0 or not readable:
        pytest.skip("needs root (to become uid 65534), /usr/bin/python3 and a checkout other users can read")
    script = ("import os\nfrom scaletrain.stages.rl.sandbox.runner import SandboxSettings, describe, run_programs\n"
              "s = SandboxSettings(timeout_s=4.0, memory_mb=256, processes=16)\n"
              f"print(os.getuid(), describe(s))\nprint([v.passed for v in run_programs({[(RIGHT, TESTS), (FORGERIES['exit 0 from an atexit hook'], TESTS), (FORKS, 'assert 8 <= forks() < 16')]!r}, s)])\n")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                         capture_output=True, text=True, timeout=120, cwd="/", env={"PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    assert "65534 python_tests sandbox" in out.stdout and "rlimits; no writable cgroups" in out.stdout
    assert out.stdout.strip().endswith("[True, False, True]"), out.stdout


# ------------------------------------------------------------------ honest code still scores 1

HONEST = {
    "HumanEval check(candidate)": ("def incr_list(l: list):\n    return [x + 1 for x in l]\n",
                                   "METADATA = {}\n\ndef check(candidate):\n    assert candidate([]) == []\n"
                                   "    assert candidate([3, 2, 1]) == [4, 3, 2]\n\ncheck(incr_list)\n"),
    "classes and methods": ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
                            "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n",
                            "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and s.items == [1]\n"),
    "generators, iteration, membership": ("def squares(n):\n    for i in range(n):\n        yield i * i\n",
                                          "assert list(squares(4)) == [0, 1, 4, 9]\nassert 9 in squares(4)\n"
                                          "assert sum(squares(3)) == 5\n"),
    "expected exceptions": ("def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n",
                            "try:\n    root(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n"
                            "    assert False\n"),
    "stdlib, big ints, floats, containers": (
        "import math, collections\nfrom fractions import Fraction\nPoint = collections.namedtuple('Point', 'x y')\n"
        "def stats(xs):\n    return {'n': len(xs), 'mean': sum(xs) / len(xs), 'set': set(xs)}\n"
        "def fact(n):\n    return math.factorial(n)\ndef mid(a, b):\n    return Point((a.x + b.x) / 2, (a.y + b.y) / 2)\n"
        "def half():\n    return float(Fraction(1, 2))\n",
        "import math\nassert stats([1, 2, 3]) == {'n': 3, 'mean': 2.0, 'set': {1, 2, 3}}\n"
        "assert fact(2000) == math.factorial(2000)\nm = mid(Point(0, 0), Point(2, 4))\n"
        "assert m == (1.0, 2.0) and m.y == 2.0 and mid(m, m) == m\nassert math.isclose(half(), 0.5)\n"),
    "callbacks, keywords, bytes, None": ("def apply(f, x, *, times=1):\n    for _ in range(times):\n        x = f(x)\n"
                                         "    return x\ndef nothing():\n    print('noise on stdout')\n"
                                         "def enc(s):\n    return s.encode()\n",
                                         "assert apply(lambda v: v * 2, 3, times=2) == 12\nassert nothing() is None\n"
                                         "assert enc('hé') == b'h\\xc3\\xa9'\n"),
    "arguments changed in place": ("def sort_in_place(xs, seen=None):\n    xs.sort()\n    if seen is not None:\n"
                                   "        seen['n'] = len(xs)\n",
                                   "a, seen = [3, 1, 2], {}\nassert sort_in_place(a, seen=seen) is None\n"
                                   "assert a == [1, 2, 3] and seen == {'n': 3}\n"),
    "its own files, recursion": ("import os, sys\nsys.setrecursionlimit(5000)\ndef depth(n):\n"
                                 "    return 0 if n == 0 else 1 + depth(n - 1)\ndef roundtrip(text):\n"
                                 "    with open('scratch.txt', 'w') as f:\n        f.write(text)\n"
                                 "    return open(os.path.join(os.getcwd(), 'scratch.txt')).read()\n",
                                 "assert depth(3000) == 3000\nassert roundtrip('hi') == 'hi'\n"),
    "unittest.main()": (RIGHT, "import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
                               "        self.assertEqual(add(2, 3), 5)\nunittest.main()\n"),
}


def test_honest_solutions_score_one():
    assert dict(zip(HONEST, rewards(list(HONEST.values())))) == dict.fromkeys(HONEST, 1.0)
    assert rewards([(WRONG, HONEST["unittest.main()"][1])]) == [0.0]


# ------------------------------------------------------------------ errors: counted, logged, never 1.0

def test_a_program_that_cannot_be_judged_is_an_error_never_a_pass(monkeypatch):
    broken = dataclasses.replace(sandbox.runtime("bwrap", ""), mounts=("--ro-bind", "/no/such/dir", "/x"))
    verdict = sandbox.Program(RIGHT, TESTS, FAST, broken).judge()
    assert not verdict.passed and "the sandbox did not start" in verdict.error and "/no/such/dir" in verdict.error
    values, errors = PythonTests(FAST).score_batch([RIGHT, RIGHT], [{"tests": "assert (\n"}, {"tests": TESTS}])
    assert values == [0.0, 1.0] and "do not compile" in errors[0] and errors[1] == ""
    monkeypatch.setattr(sandbox_runtime.shutil, "which", lambda *a, **k: None)  # bubblewrap not installed
    sandbox.runtime.cache_clear()
    try:
        (verdict,) = run_programs([(RIGHT, TESTS)], SandboxSettings(timeout_s=1.5))
        assert not verdict.passed and "apt-get install -y bubblewrap" in verdict.error
    finally:
        sandbox.runtime.cache_clear()


def test_a_raising_reward_scores_zero_with_its_cause():
    def boom(completion: str, row: dict) -> float:
        raise RuntimeError("scorer crashed")

    assert score_rewards(boom, ["a", "b"], [{}, {}]) == ([0.0, 0.0], ["RuntimeError: scorer crashed"] * 2)
    assert score_rewards(PythonTests(FAST), ["x"], [{}])[1][0].startswith("KeyError")


def test_unsandboxed_mode_still_lets_only_the_tests_decide():
    none = dataclasses.replace(FAST, mode="none")
    assert rewards([(RIGHT, TESTS), (WRONG, TESTS), (FORGERIES["exit 0 from an atexit hook"], TESTS)], none) \
        == [1.0, 0.0, 0.0]
    assert "UNSANDBOXED" in sandbox.describe(none)


# ------------------------------------------------------------------ in training: validated up front, errors counted

def _grpo_args(run_dir: Path, tokenizer_dir, dataset_prefix, rows: Path, **extra) -> list[str]:
    args = ["grpo", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, dataset_prefix, **{
            "posttrain.chat.train_data": f'["{rows}"]', "train.seq_length": 64, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.steps": 2, "posttrain.grpo.group_size": 4, "posttrain.rollout.max_new_tokens": 6,
            "posttrain.rewards.functions": '["python_tests", "grpo_rewards:digits"]', "posttrain.sandbox.timeout_s": 3.0,
            **extra}):
        args += ["--set", s]
    return args


def test_grpo_counts_reward_errors_logs_their_cause_and_keeps_training(tmp_path, tokenizer_dir, dataset_prefix,
                                                                       capsys):
    rows = tmp_path / "code.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Write add number {i}.", "tests": "assert (\n"}) + "\n"
                            for i in range(4)))  # tests that cannot compile: no completion can be judged
    assert main(_grpo_args(tmp_path / "run", tokenizer_dir, dataset_prefix, rows)) == 0
    metrics = [m for m in read_metrics(tmp_path / "run") if "reward_errors" in m]
    assert [m["reward_errors"] for m in metrics] == [8.0, 8.0]  # every completion of both steps, counted
    assert all(m["reward_python_tests"] == 0.0 for m in metrics)
    out = capsys.readouterr()
    assert "python_tests sandbox: bubblewrap" in out.out
    assert "8 of 8 completions could not be scored" in out.err and "do not compile" in out.err


@pytest.mark.parametrize("extra,message", [
    ({"posttrain.sandbox.backend": "docker"}, "posttrain.sandbox.backend = 'docker' is not one of bwrap, none"),
    ({"posttrain.sandbox.memory_mb": 0}, "posttrain.sandbox.memory_mb = 0 must be positive"),
    ({"posttrain.sandbox.processes": 2}, "give at least 4"),
    ({"posttrain.sandbox.python": "/no/such/python3"}, "/no/such/python3 does not exist. Set posttrain.sandbox.python"),
])
def test_bad_sandbox_settings_fail_before_training(tmp_path, tokenizer_dir, dataset_prefix, capsys, extra, message):
    rows = tmp_path / "code.jsonl"
    rows.write_text(json.dumps({"prompt": "Write add.", "tests": TESTS}) + "\n")
    assert main(_grpo_args(tmp_path / "run", tokenizer_dir, dataset_prefix, rows, **extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_without_bubblewrap_the_run_stops_with_the_fix(tmp_path, tokenizer_dir, dataset_prefix, capsys, monkeypatch):
    rows = tmp_path / "code.jsonl"
    rows.write_text(json.dumps({"prompt": "Write add.", "tests": TESTS}) + "\n")
    monkeypatch.setattr(sandbox_runtime.shutil, "which", lambda *a, **k: None)  # bubblewrap not installed
    sandbox.runtime.cache_clear()
    sandbox.sandbox_problem.cache_clear()
    try:
        assert main(_grpo_args(tmp_path / "run", tokenizer_dir, dataset_prefix, rows)) == 2
    finally:
        sandbox.runtime.cache_clear()
        sandbox.sandbox_problem.cache_clear()
    err = capsys.readouterr().err
    assert "`bwrap` (bubblewrap) is not installed" in err and "apt-get install -y bubblewrap" in err
    assert 'posttrain.sandbox.backend = "none" for trusted code only' in err
