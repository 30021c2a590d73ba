"""Run an untrusted Python program, and a row's test cases against it, in a fresh sandboxed process.

Every run starts `stages/shared/sandbox_init.py` under the configured interpreter, in a new session, with an empty
environment. That first process enters new mount, network and PID namespaces (a user namespace too when not run as
root), remounts every mount read-only, puts fresh size-limited tmpfs mounts on /tmp, /var/tmp, /dev/shm and the
working directory, hides the user's home and the project, and starts the program as PID 1 of the new PID namespace:
as a fresh unprivileged uid when run as root, without capabilities otherwise; with rlimits on CPU time, address
space, processes, file size and open files; with no new privileges (setuid binaries do not elevate). This process
reads stdout and stderr up to a size limit and kills the session at the wall-clock limit; the kernel then kills every
process of the PID namespace, and the tmpfs working directory disappears with the mount namespace.

Where the kernel refuses the namespaces (a container without the capability, user namespaces switched off), the
sandbox refuses to start unless `allow_without_namespaces` is set; then programs run with the rlimits, a temporary
directory and an empty environment only, which is no protection against a program that means harm. It is not a VM
in either mode: the kernel is shared, and a kernel bug is an escape. The README says the same.

Test cases (a row's `tests`): a list of
    {"type": "stdin_stdout", "input": "1 2\\n", "output": "3\\n"}     the program reads stdin, its stdout must match
    {"type": "function_call", "fn_name": "f", "input": "[1, 2]", "output": "[3]"}   f(1, 2) must return 3
    {"type": "assert", "code": "assert f(1, 2) == 3"}                 the statement must run without an exception
or open-r1's `verification_info` ({"language": "python", "test_cases": [...]}, also as a JSON string). Outputs match
line by line after stripping trailing whitespace and trailing blank lines. Function calls and asserts of one program
run in one process (a harness that loads the solution once); each stdin/stdout case runs in its own process.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.shared.errors import UserError

logger = logging.getLogger(__name__)

INIT_SCRIPT = Path(__file__).with_name("sandbox_init.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SETUP_FAILED = 125  # sandbox_init's exit status when it could not set the sandbox up
SANDBOX_UID_BASE = 10_000_000  # root mode: uids far above any real account's; one per run
TEST_TYPES = ("stdin_stdout", "function_call", "assert")
STOP_GRACE_S = 5.0  # how long the first process may take to end the program's namespace before it is killed too


@dataclass(frozen=True)
class Sandbox:
    """The sandbox's settings (conf/sandbox/default.yaml documents each)."""

    python: str
    cpu_s: float
    wall_s: float
    memory_mb: int
    processes: int
    file_mb: int
    open_files: int
    output_bytes: int
    allow_without_namespaces: bool

    def limits(self) -> dict:
        return {"cpu_s": self.cpu_s, "memory_mb": self.memory_mb, "processes": self.processes,
                "file_mb": self.file_mb, "open_files": self.open_files}


def sandbox_from_config(node: Any) -> Sandbox:
    """A `sandbox` config node (a mapping with exactly the fields of :class:`Sandbox`) -> Sandbox."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    fields = set(Sandbox.__dataclass_fields__)
    if not isinstance(node, dict) or set(node) != fields:
        got = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise UserError(f"sandbox config must have exactly the keys {sorted(fields)} (conf/sandbox/default.yaml); "
                        f"got {got}")
    for key in ("cpu_s", "wall_s", "memory_mb", "processes", "file_mb", "open_files", "output_bytes"):
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"sandbox.{key} must be a positive number, got {value!r}")
    return Sandbox(**node)


def default_sandbox() -> Sandbox:
    """conf/sandbox/default.yaml, for callers without a composed config (a reward function called on its own)."""
    import yaml

    node = yaml.safe_load((PROJECT_ROOT / "conf" / "sandbox" / "default.yaml").read_text())
    del node["defaults"]  # Hydra's defaults list (the schema), not a setting
    return sandbox_from_config(node)


@dataclass
class RunResult:
    """status: ok (exit 0) | error (non-zero exit, a signal, the memory limit) | timeout (wall clock or CPU time) |
    output_limit (stdout or stderr passed `output_bytes`) | setup_failed (the sandbox itself did not start)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# --------------------------------------------------------------------------------------------------------------------
# Isolation: which mode this machine gives, checked once per process
# --------------------------------------------------------------------------------------------------------------------

_MODES: dict[tuple, tuple[str, list[str]]] = {}
_MODES_LOCK = threading.Lock()
_UIDS = itertools.count()


def interpreter(sandbox: Sandbox) -> str:
    """The configured interpreter as an absolute path (a bare name is looked up on the system PATH)."""
    found = shutil.which(sandbox.python, path="/usr/local/bin:/usr/bin:/bin") if os.sep not in sandbox.python \
        else sandbox.python
    if not found or not os.access(found, os.X_OK):
        raise UserError(f"sandbox.python: interpreter {sandbox.python!r} not found; set sandbox.python to a Python "
                        f"3.8+ that every user can run, e.g. /usr/bin/python3")
    return os.path.abspath(found)


def hidden_paths(python: str) -> list[str]:
    """The user's home and the project, unless the interpreter lives inside one of them (it must stay visible)."""
    try:
        prefix = subprocess.run([python, "-S", "-s", "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                                text=True, timeout=30, env={}).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        prefix = ""
    needed = [os.path.realpath(python)] + ([os.path.realpath(prefix)] if prefix else [])
    out = []
    for path in (os.path.expanduser("~"), str(PROJECT_ROOT)):
        real = os.path.realpath(path)
        if real != "/" and not any(n == real or n.startswith(real + os.sep) for n in needed) and real not in out:
            out.append(real)
    return out


def isolation(sandbox: Sandbox) -> tuple[str, list[str]]:
    """(mode, hidden paths): "root" or "userns" when the namespaces work here, else "none" if the config allows it.

    Checked once per process and interpreter by running a trivial program; raises UserError when the sandbox cannot
    start at all, or cannot isolate and the config does not accept that.
    """
    python = interpreter(sandbox)
    key = (python, sandbox.allow_without_namespaces)
    with _MODES_LOCK:
        if key in _MODES:
            return _MODES[key]
        hide = hidden_paths(python)
        mode = "root" if os.geteuid() == 0 else "userns"
        probe = _run(sandbox, python, mode, hide, {"probe.py": "print('ok')"}, ["probe.py"], "")
        if probe.status != "ok" or probe.stdout.strip() != "ok":
            why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.status
            if not sandbox.allow_without_namespaces:
                raise UserError(
                    f"sandbox: cannot isolate test programs on this machine ({mode} mode: {why}). Run where the "
                    f"kernel allows new network/mount/PID namespaces (as root, or with unprivileged user namespaces "
                    f"enabled), or set sandbox.allow_without_namespaces=true to run generated code with rlimits only "
                    f"(no protection against hostile programs)")
            logger.warning("sandbox: no namespaces here (%s); running generated code with rlimits, a temporary "
                           "directory and an empty environment only (sandbox.allow_without_namespaces=true)", why)
            mode = "none"
            probe = _run(sandbox, python, mode, hide, {"probe.py": "print('ok')"}, ["probe.py"], "")
            if probe.status != "ok" or probe.stdout.strip() != "ok":
                raise UserError(f"sandbox: the interpreter {python} cannot run a program even without namespaces "
                                f"({probe.stderr.strip()[-300:] or probe.status}); set sandbox.python to a Python "
                                f"3.8+ that every user can run, e.g. /usr/bin/python3")
        _MODES[key] = (mode, hide)
        return _MODES[key]


# --------------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------------


def run_program(sandbox: Sandbox, files: dict[str, str], argv: list[str], stdin: str = "") -> RunResult:
    """Run `python argv...` in a fresh sandbox whose working directory holds `files` (name -> text)."""
    mode, hide = isolation(sandbox)
    return _run(sandbox, interpreter(sandbox), mode, hide, files, argv, stdin)


def run_python(sandbox: Sandbox, source: str, stdin: str = "") -> RunResult:
    """Run one Python program (as `solution.py`) with `stdin`."""
    return run_program(sandbox, {"solution.py": source}, ["solution.py"], stdin)


def _run(sandbox: Sandbox, python: str, mode: str, hide: list[str], files: dict[str, str], argv: list[str],
         stdin: str) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="r1flow-sandbox-") if mode == "none" else None
    spec = {"mode": mode, "python": python, "argv": argv, "files": files, "stdin": stdin, "hide": hide,
            "limits": sandbox.limits(), "workdir": workdir,
            "uid": SANDBOX_UID_BASE + (os.getpid() % 100_000) * 100 + next(_UIDS) % 100}
    start = time.monotonic()
    proc = subprocess.Popen([python, "-S", "-s", str(INIT_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env={}, close_fds=True)
    try:
        try:
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, err, status = _collect(proc, sandbox.output_bytes, start + sandbox.wall_s)
    finally:
        if proc.poll() is None:  # the first process kills the program and, with it, its PID namespace, then exits
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        try:  # the whole session: in "none" mode it holds whatever the program started
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    code = proc.returncode
    if status is None:
        if code == 0:
            status = "ok"
        elif code == SETUP_FAILED and b"r1flow-sandbox:" in err:
            status = "setup_failed"
        elif code == 128 + signal.SIGXCPU:
            status = "timeout"
        else:
            status = "error"
    return RunResult(status, code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                     time.monotonic() - start)


def _collect(proc: subprocess.Popen, limit: int, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close: (stdout, stderr, None), or stop at the deadline ("timeout") or when
    either passes `limit` bytes ("output_limit")."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    status = None
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                buf += chunk
                if len(buf) > limit:
                    del buf[limit:]
                    status = "output_limit"
            if status:
                break
    finally:
        sel.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), status


# --------------------------------------------------------------------------------------------------------------------
# Test cases
# --------------------------------------------------------------------------------------------------------------------


def parse_tests(value: Any, where: str) -> list[dict] | None:
    """A row's `tests` value -> normalised test dicts; None when the row has no tests.

    `where` names the file and row for the error message (e.g. `data/code/rl_train.jsonl:12 (id code-0011)`).
    Normalised: {"type": "stdin_stdout", "input", "output"} | {"type": "call", "fn_name", "args", "expected"} |
    {"type": "assert", "code"}.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: `tests` is a string but not JSON ({e})") from None
    if isinstance(value, dict):  # open-r1 / PrimeIntellect verification_info
        if "test_cases" not in value:
            raise UserError(f"{where}: `tests` is a mapping without `test_cases` (expected a list of test cases or "
                            f"{{language: python, test_cases: [...]}})")
        language = value.get("language", "python")
        if language != "python":
            raise UserError(f"{where}: tests for language {language!r}; the sandbox runs Python only")
        value = value["test_cases"]
        if isinstance(value, str):
            value = json.loads(value)
    if not isinstance(value, list):
        raise UserError(f"{where}: `tests` must be a list of test cases, got {type(value).__name__}")
    if not value:
        return None
    return [_parse_test(t, f"{where}: test {i}") for i, t in enumerate(value)]


def _parse_test(test: Any, where: str) -> dict:
    if not isinstance(test, dict):
        raise UserError(f"{where}: a test case must be an object, got {type(test).__name__}")
    kind = test.get("type")
    if kind not in TEST_TYPES:
        raise UserError(f"{where}: `type` must be one of {list(TEST_TYPES)}, got {kind!r}")

    def text(field: str) -> str:
        v = test.get(field)
        if not isinstance(v, str):
            raise UserError(f"{where}: `{field}` must be a string for a {kind} test, got {type(v).__name__}")
        return v

    if kind == "stdin_stdout":
        return {"type": kind, "input": text("input"), "output": text("output")}
    if kind == "assert":
        code = text("code")
        try:
            compile(code, "test", "exec")
        except SyntaxError as e:
            raise UserError(f"{where}: `code` is not valid Python ({e.msg}, line {e.lineno})") from None
        return {"type": kind, "code": code}
    fn_name = text("fn_name")
    if not fn_name.isidentifier():
        raise UserError(f"{where}: `fn_name` must be a Python identifier, got {fn_name!r}")
    args, expected = test.get("input"), test.get("output")
    try:
        args = json.loads(args) if isinstance(args, str) else args
        expected = json.loads(expected) if isinstance(expected, str) else expected
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: `input`/`output` of a function_call test must be JSON ({e})") from None
    if not isinstance(args, list):
        raise UserError(f"{where}: `input` of a function_call test must be a JSON list of arguments, got {args!r}")
    if isinstance(expected, list) and len(expected) == 1:  # APPS convention: the return value wrapped in a list
        expected = expected[0]
    return {"type": "call", "fn_name": fn_name, "args": args, "expected": expected}


def outputs_match(got: str, expected: str) -> bool:
    """Line by line, trailing whitespace of each line and trailing blank lines ignored."""
    def norm(s: str) -> list[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(expected)


# The harness loads the solution once and runs every call/assert test in its own try block. It reports on a copy of
# stdout made before the solution runs (whose own fd 1 then goes to /dev/null), each line tagged with a nonce that
# arrives on argv; a test with no report line failed (the solution exited or crashed the process).
HARNESS = r'''
import json, os, sys
nonce = sys.argv[1]
del sys.argv[1:]
with open("tests.json") as f:
    tests = json.load(f)
os.unlink("tests.json")
report = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
def same(a, b):
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except Exception:
        return False
scope = {"__name__": "solution"}
try:
    with open("solution.py") as f:
        exec(compile(f.read(), "solution.py", "exec"), scope)
    loaded = True
except BaseException:
    loaded = False
for i, t in enumerate(tests):
    ok = False
    if loaded:
        try:
            if t["type"] == "assert":
                exec(compile(t["code"], "test_%d" % i, "exec"), scope)
                ok = True
            else:
                ok = same(scope[t["fn_name"]](*t["args"]), t["expected"])
        except BaseException:
            ok = False
    report.write("%s %d %d\n" % (nonce, i, int(ok)))
    report.flush()
'''


def run_tests(sandbox: Sandbox, source: str, tests: list[dict]) -> list[bool]:
    """Whether `source` passes each of the (parsed) `tests`, in order."""
    results = [False] * len(tests)
    calls = [i for i, t in enumerate(tests) if t["type"] != "stdin_stdout"]
    for i, t in enumerate(tests):
        if t["type"] == "stdin_stdout":
            r = run_python(sandbox, source, t["input"])
            results[i] = r.status == "ok" and outputs_match(r.stdout, t["output"])
    if calls:
        nonce = secrets.token_hex(16)
        files = {"solution.py": source, "harness.py": HARNESS, "tests.json": json.dumps([tests[i] for i in calls])}
        r = run_program(sandbox, files, ["harness.py", nonce])
        if r.status in ("ok", "error"):  # a solution that kills the harness still leaves the lines it reported
            for line in r.stdout.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and int(parts[1]) < len(calls):
                    results[calls[int(parts[1])]] = parts[2] == "1"
    return results


def score(passed: list[bool], mode: str) -> float:
    """`share`: the fraction of tests passed; `all`: 1.0 only if every test passed."""
    if mode == "share":
        return sum(passed) / len(passed)
    if mode == "all":
        return float(all(passed))
    raise UserError(f"code test scoring must be `share` or `all`, got {mode!r}")
