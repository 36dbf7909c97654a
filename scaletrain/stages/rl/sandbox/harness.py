"""The python_tests harness. It runs inside the sandboxes that scaletrain/stages/rl/sandbox/runner.py starts, as
`python -I -S -B -X utf8 harness.py ROLE JOB RFD WFD VERDICT_FD MEMORY PROCESSES CPU_S FILE_BYTES`:
standard library only, no scaletrain import.

Two roles, each in its own sandbox (own PID, network, mount and user namespaces), joined by two pipes that
carry data only:
- candidate: sets its limits, says `boot`, executes the completion's code (JOB) as `__main__`, says
  `hello` with a handle on that module, then answers requests on the objects it holds. Whatever the
  code does — exit with any status, exit hooks, exception hooks, monkeypatched builtins, writing to
  its own pipe — it can only answer requests, with values.
- runner: executes the row's tests (JOB) with every name they use that the candidate defines (and that
  is not a builtin) bound to a proxy. Calling a proxy, reading its attributes, iterating it, taking
  its length, truth or text are requests to the candidate; the answer comes back as a value built
  here — None, bool, int, float, complex, str, bytes, bytearray and lists, tuples, dicts, sets and
  frozensets of those — or as another proxy, which compares by identity only (so an object that
  claims to equal everything cannot pass an assert, and `==` never shows the expected value to the
  candidate). The asserts run here. Only the runner holds the verdict pipe; it reports `passed` only
  when the tests ran to their end (or called sys.exit(0) themselves, as unittest.main does) and the
  candidate answered every request.

Wire format: a 4-byte big-endian length, then JSON. A value is a JSON null, bool, number or string, or a
one-key object: L/T/S/F (list, tuple, set, frozenset: a JSON array of values), D (dict: array of
[key, value] pairs), B/Y (bytes/bytearray: hex), C (complex: [real, imag]), H (a handle on an object of
the sender) or R (a handle the receiver gave out earlier: its own object). Requests are
{"op", "h", "a", "k"}; answers {"ok": value} (a call's also "out": the list, dict, set and bytearray
arguments as the call left them, copied back into the caller's) or {"err": [exception name, message]}. Either side may send a
request while it waits for an answer (a callback the tests passed to the candidate).
"""

import ast
import builtins
import json
import os
import resource
import struct
import sys
import types
from typing import NoReturn

MAX_FRAME = 64 << 20
# Builtin exception classes a candidate's error may be re-raised as in the runner (never SystemExit &c.).
EXCEPTIONS = {n: c for n, c in vars(builtins).items() if isinstance(c, type) and issubclass(c, Exception)}
MUTABLE = (list, dict, set, bytearray)  # arguments whose in-place changes by a call travel back
CANDIDATE_OPS = frozenset({"call", "getattr", "setattr", "getitem", "setitem", "iter", "next", "len", "bool",
                           "str", "repr"})
RUNNER_OPS = frozenset({"call", "getattr", "getitem", "iter", "next", "len", "bool", "str", "repr"})
# Never handed to the candidate by the runner, even when a test passes one as an argument: each would let
# the candidate run code of its choosing in the runner, where the verdict pipe is.
UNSAFE = [vars(builtins)[n] for n in ("eval", "exec", "compile", "open", "__import__", "getattr", "setattr",
                                      "delattr", "globals", "locals", "vars", "breakpoint", "input", "help", "exit",
                                      "quit") if n in vars(builtins)]  # (help, exit, quit: only with site)


class Gone(BaseException):
    """The other side died or broke the protocol (a BaseException: a test's `except Exception` cannot hide it)."""


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin Exception; re-raised here under this name."""


class Remote:
    """An object of the other side. Identity comparison and hashing only (no __eq__ is forwarded)."""

    __slots__ = ("_bridge", "_handle")

    def __init__(self, bridge: "Bridge", handle: int) -> None:
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_handle", handle)

    def _ask(self, op, *args, **kw):
        return self._bridge.request(op, self._handle, args, kw)

    def __call__(self, *args, **kw):
        return self._ask("call", *args, **kw)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):  # protocol probes (copy, pickle, ...) stay local
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __setattr__(self, name, value):
        self._ask("setattr", name, value)

    def __getitem__(self, key):
        return self._ask("getitem", key)

    def __setitem__(self, key, value):
        self._ask("setitem", key, value)

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __len__(self):
        return self._ask("len")

    def __bool__(self):
        return self._ask("bool")

    def __str__(self):
        return self._ask("str")

    def __repr__(self):
        return self._ask("repr")


class RemoteTuple(tuple):
    """A tuple subclass of the other side (a namedtuple): its items here — compared as a tuple, here — and
    its attributes asked for there; sent back, it is the other side's own object again."""

    def __getattr__(self, name):
        if name.startswith("__") or "_handle" not in self.__dict__:
            raise AttributeError(name)
        return self._bridge.request("getattr", self._handle, (name,), {})


class Bridge:
    """One side of the pipe pair: framing, the value codec and the handle tables."""

    def __init__(self, rfd: int, wfd: int, ops: frozenset) -> None:
        self.rfd, self.wfd, self.ops = rfd, wfd, ops
        self.objects: dict = {}  # handle → an object of this side the other side holds
        self.handles: dict = {}  # id(object) → its handle (the same object keeps one handle)
        self.proxies: dict = {}  # the other side's handle → its Remote here (identity is stable)
        self.broken = ""  # why the other side is gone; once set, the verdict is a failure

    def fail(self, why: str) -> Gone:
        self.broken = self.broken or why
        return Gone(why)

    def send(self, msg) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        data = struct.pack(">I", len(data)) + data
        try:
            while data:
                data = data[os.write(self.wfd, data):]
        except OSError as e:
            raise self.fail(f"the other side closed its pipe ({e.strerror})") from None

    def _read(self, n: int) -> bytes:
        chunks = []
        while n:
            try:
                chunk = os.read(self.rfd, min(n, 1 << 20))
            except OSError as e:
                raise self.fail(f"reading the pipe failed ({e.strerror})") from None
            if not chunk:
                raise self.fail("the other side ended")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> dict:
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_FRAME:
            raise self.fail(f"a message of {n} bytes (the limit is {MAX_FRAME})")
        try:
            msg = json.loads(self._read(n))
        except (ValueError, RecursionError, MemoryError) as e:
            raise self.fail(f"an unreadable message ({type(e).__name__})") from None
        if type(msg) is not dict:
            raise self.fail("a message that is not an object")
        return msg

    def export(self, obj) -> int:
        if self.ops is RUNNER_OPS and (isinstance(obj, types.ModuleType) or any(obj is u for u in UNSAFE)):
            raise TypeError(f"the tests may not hand {obj!r} to the candidate")
        key = id(obj)
        if key not in self.handles:
            self.handles[key] = len(self.objects)
            self.objects[len(self.objects)] = obj
        return self.handles[key]

    def encode(self, v):
        if v is None or type(v) in (bool, int, float, str):
            return v
        if isinstance(v, Remote) and v._bridge is self:
            return {"R": v._handle}
        if isinstance(v, RemoteTuple) and v.__dict__.get("_bridge") is self:
            return {"R": v.__dict__["_handle"]}
        if isinstance(v, bool):
            return bool(v)
        if isinstance(v, (int, float, str)):  # subclasses (IntEnum, ...) travel as their plain value
            return int(v) if isinstance(v, int) else float(v) if isinstance(v, float) else str.__str__(v)
        if isinstance(v, complex):
            return {"C": [v.real, v.imag]}
        if isinstance(v, (bytes, bytearray)):
            return {"B" if isinstance(v, bytes) else "Y": bytes(v).hex()}
        if isinstance(v, tuple) and type(v) is not tuple:  # a namedtuple: its items and a handle on it
            return {"N": [self.export(v), [self.encode(x) for x in v]]}
        if isinstance(v, dict):
            return {"D": [[self.encode(k), self.encode(x)] for k, x in v.items()]}
        for tag, kind in (("L", list), ("T", tuple), ("S", set), ("F", frozenset)):
            if isinstance(v, kind):
                return {tag: [self.encode(x) for x in v]}
        return {"H": self.export(v)}

    def decode(self, w):
        """A value built here from the other side's data: nothing it sends can run code on this side."""
        if w is None or type(w) in (bool, int, float, str):
            return w
        if type(w) is not dict or len(w) != 1:
            raise self.fail("a malformed value")
        ((tag, x),) = w.items()
        try:
            if tag in ("L", "T", "S", "F"):
                if type(x) is not list:
                    raise TypeError
                items = [self.decode(y) for y in x]
                return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](items)
            if tag == "D":
                return {self.decode(k): self.decode(y) for k, y in x}
            if tag in ("B", "Y") and type(x) is str:
                return (bytes if tag == "B" else bytearray).fromhex(x)
            if tag == "C" and type(x) is list and all(type(y) in (int, float) for y in x):
                return complex(*x)
            if tag == "N" and type(x) is list and type(x[0]) is int and type(x[1]) is list:
                shadow = RemoteTuple(self.decode(y) for y in x[1])
                shadow._bridge, shadow._handle = self, x[0]
                return shadow
            if tag == "H" and type(x) is int:
                if x not in self.proxies:
                    self.proxies[x] = Remote(self, x)
                return self.proxies[x]
            if tag == "R" and type(x) is int:
                return self.objects[x]
        except Gone:
            raise
        except (TypeError, ValueError, KeyError, RecursionError, MemoryError):
            pass
        raise self.fail(f"a malformed value (tag {tag!r})")

    def error(self, err) -> BaseException:
        """The exception an error answer raises here: a builtin Exception by name, else CandidateError."""
        if type(err) is not list or len(err) != 2 or not all(type(e) is str for e in err):
            return self.fail("a malformed error")
        name, message = err
        try:
            return EXCEPTIONS[name](message)
        except Exception:
            return CandidateError(f"{name}: {message}")

    def request(self, op: str, handle: int, args: tuple, kw: dict):
        """Ask the other side to apply `op` to its object `handle`; serve its requests meanwhile."""
        if self.broken:
            raise Gone(self.broken)
        self.send({"op": op, "h": handle, "a": [self.encode(a) for a in args],
                   "k": [[k, self.encode(v)] for k, v in kw.items()]})
        while True:
            msg = self.recv()
            if "op" in msg:
                self.serve(msg)
            elif "ok" in msg:
                for key, value in msg.get("out", []):  # the callee changed these arguments in place
                    self.restore(args[key] if type(key) is int and key < len(args) else kw.get(key), value)
                return self.decode(msg["ok"])
            elif "err" in msg:
                raise self.error(msg["err"])
            else:
                raise self.fail("an unexpected message")

    def serve(self, msg: dict) -> None:
        try:
            op, obj = msg["op"], self.objects[msg["h"]]
            args = [self.decode(a) for a in msg["a"]]
            kw = {k: self.decode(v) for k, v in msg["k"]}
            if op not in self.ops or not all(type(k) is str for k in kw):
                raise ValueError
        except Gone:
            raise
        except (KeyError, TypeError, ValueError):
            raise self.fail("a malformed request") from None
        try:
            reply = {"ok": self.encode(self.apply(op, obj, args, kw))}
            if op == "call":  # in-place changes to list/dict/set/bytearray arguments go back (copy-restore)
                reply["out"] = [[k, self.encode(v)] for k, v in [*enumerate(args), *kw.items()]
                                if type(v) in MUTABLE]
        except Gone:
            raise
        except BaseException as e:  # the object raised (SystemExit included): an error answer
            reply = {"err": [type(e).__name__, str(e)[:2000]]}
        self.send(reply)

    def restore(self, original, value) -> None:
        """Give a mutable argument the contents the other side's call left in its copy."""
        new = self.decode(value)
        if type(original) is not type(new) or type(new) not in MUTABLE:
            return  # (a subclass went as its base type's copy: its changes stay there)
        if isinstance(original, (list, bytearray)):
            original[:] = new
        else:
            original.clear()
            original.update(new)

    def apply(self, op: str, obj, args: list, kw: dict):
        if op == "call":
            return obj(*args, **kw)
        if op in ("getattr", "setattr"):
            if type(args[0]) is not str or (self.ops is RUNNER_OPS and args[0].startswith("_")):
                raise AttributeError("only public attributes")  # the runner's objects: no way to __globals__
            return getattr(obj, args[0]) if op == "getattr" else setattr(obj, args[0], args[1])
        if op == "getitem":
            return obj[args[0]]
        if op == "setitem":
            obj[args[0]] = args[1]
            return None
        unary: dict = {"iter": iter, "next": next, "len": len, "bool": bool, "str": str, "repr": repr}
        return unary[op](obj)

    def serve_forever(self) -> None:
        while True:
            msg = self.recv()
            if "op" not in msg:
                raise self.fail("an answer nobody asked for")
            self.serve(msg)


def used_names(tree: ast.AST) -> list[str]:
    """Names the tests read that are neither builtins nor dunders: the candidate's, if it defines them."""
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return sorted(n for n in names if not hasattr(builtins, n) and not n.startswith("__"))


def run_runner(job: str, bridge: Bridge, verdict_fd: int) -> None:
    def finish(passed: bool, detail: str = "", error: str = "") -> NoReturn:
        line = json.dumps({"passed": passed and not bridge.broken, "detail": (detail or bridge.broken)[:2000],
                           "error": error[:2000]}) + "\n"
        os.write(verdict_fd, line.encode())
        os._exit(0)  # no exit hooks of the tests

    os.write(verdict_fd, b'{"ready": true}\n')
    source = open(job, encoding="utf-8", errors="replace").read()
    try:
        tree = ast.parse(source, "tests.py")
        code = compile(tree, "tests.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        finish(False, error=f"the row's tests do not compile: {type(e).__name__}: {e}")
    try:
        if "boot" not in bridge.recv():
            raise bridge.fail("no boot message")
    except Gone as e:
        finish(False, error=f"the candidate's sandbox did not start ({e})")
    try:
        hello = bridge.recv()
    except Gone:
        finish(False, "the candidate's process ended before its code finished")
    if "failed" in hello:
        finish(False, f"the candidate's code raised {str(hello['failed'])[:1000]}")
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["tests.py"]  # what unittest.main() parses
    try:
        module = bridge.decode(hello.get("hello"))
        if not isinstance(module, Remote):
            raise bridge.fail("no module handle")
        for name in used_names(tree):
            try:
                main.__dict__[name] = getattr(module, name)
            except AttributeError:
                pass
        exec(code, main.__dict__)
        finish(True)
    except SystemExit as e:  # the tests' own sys.exit (unittest.main); candidate errors never arrive as this
        finish(e.code in (None, 0, False), f"the tests exited with {e.code!r}")
    except BaseException as e:
        finish(False, f"{type(e).__name__}: {e}")


def run_candidate(job: str, bridge: Bridge) -> None:
    bridge.send({"boot": 1})  # before any of the completion's code runs
    main = types.ModuleType("__main__")
    main.__file__ = "solution.py"
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    try:
        source = open(job, encoding="utf-8", errors="replace").read()
        exec(compile(source, "solution.py", "exec"), main.__dict__)
    except BaseException as e:
        bridge.send({"failed": f"{type(e).__name__}: {e}"[:1000]})
        os._exit(0)
    bridge.send({"hello": bridge.encode(main)})
    bridge.serve_forever()


def limit(memory: int, processes: int, cpu_s: int, file_bytes: int) -> None:
    """Per-process limits, set before any untrusted byte is read (a sandbox without cgroups relies on them:
    RLIMIT_NPROC counts the processes of this sandbox's user namespace only)."""
    for what, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, processes),
                        (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, file_bytes),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        if value or what == resource.RLIMIT_CORE:  # 0: left as it is (no process limit unsandboxed)
            resource.setrlimit(what, (value, value))


def main(argv: list[str]) -> None:
    role, job, rfd, wfd, verdict_fd, *limits = argv
    limit(*(int(x) for x in limits))
    sys.set_int_max_str_digits(0)  # big integers are values like any other
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # prints go nowhere: the pipes are the only way out
        os.dup2(null, fd)
    os.close(null)
    bridge = Bridge(int(rfd), int(wfd), RUNNER_OPS if role == "runner" else CANDIDATE_OPS)
    try:
        if role == "runner":
            run_runner(job, bridge, int(verdict_fd))
        else:
            run_candidate(job, bridge)
    except Gone:
        pass
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
