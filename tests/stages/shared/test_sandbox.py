"""stages/shared/sandbox.py: running untrusted programs and their test cases.

The hostile programs below each must end within their limit, fail their test, and leave this machine and this test
run as they were: sentinel files untouched, no secret in the output, this process alive, no process left over.
"""
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from stages.shared import sandbox as sb
from stages.shared.sandbox import Sandbox, outputs_match, parse_tests, run_python, run_tests, score

from stages.shared.errors import UserError

LIMITS = dict(python="python3", cpu_s=1, wall_s=2, memory_mb=256, processes=16, file_mb=4, open_files=64,
              output_bytes=64 * 1024, allow_without_namespaces=False)
SLACK = 10  # seconds past the wall-clock limit a killed run may take on a busy shared machine
SUM_TEST = [{"type": "stdin_stdout", "input": "1 2\n", "output": "3\n"}]


@pytest.fixture(scope="module")
def box():
    box = Sandbox(**LIMITS)
    mode, _ = sb.isolation(box)
    assert mode in ("root", "userns"), "these tests need the namespaces the sandbox uses"
    return box


def sandbox_processes() -> list[int]:
    """Processes of a sandbox run still alive: a sandbox uid (root mode) or a sandbox working directory."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = int(Path(f"/proc/{entry}/status").read_text().split("\nUid:")[1].split()[0])
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except (OSError, IndexError):
            continue
        if uid >= sb.SANDBOX_UID_BASE or cwd == "/tmp/sandbox":
            found.append(int(entry))
    return found


@pytest.fixture
def unharmed(box):
    """After the test: this process alive (it runs the check) and no sandbox process left."""
    yield
    assert sandbox_processes() == []


def hostile(box: Sandbox, source: str):
    """Run `source` as a solution of a+b: it must fail the test."""
    assert run_tests(box, source, parse_tests(SUM_TEST, "test")) == [False]
    return run_python(box, source, "1 2\n")


# --------------------------------------------------------------------------------------------------------------------
# Correct, wrong, partial
# --------------------------------------------------------------------------------------------------------------------


def test_stdin_stdout_correct_and_wrong(box):
    tests = parse_tests(SUM_TEST + [{"type": "stdin_stdout", "input": "5 7\n", "output": "12"}], "t")
    assert run_tests(box, "a, b = map(int, input().split())\nprint(a + b)", tests) == [True, True]
    assert run_tests(box, "a, b = map(int, input().split())\nprint(a * b)", tests) == [False, False]
    assert run_tests(box, "print(3)", tests) == [True, False]


def test_function_call_and_assert_tests_partial(box):
    tests = parse_tests([{"type": "assert", "code": "assert double(2) == 4"},
                         {"type": "assert", "code": "assert double(0) == 0"},
                         {"type": "function_call", "fn_name": "double", "input": "[3]", "output": "[6]"},
                         {"type": "function_call", "fn_name": "double", "input": "[2]", "output": "[4]"}], "t")
    assert run_tests(box, "def double(x):\n    return x * 2", tests) == [True] * 4
    assert run_tests(box, "def double(x):\n    return x + 2", tests) == [True, False, False, True]
    assert score([True, False, False, True], "share") == 0.5
    assert score([True, False, False, True], "all") == 0.0
    assert score([True] * 4, "all") == 1.0
    assert run_tests(box, "def double(x) return", tests) == [False] * 4  # syntax error: nothing passes


def test_solution_that_exits_early_fails_its_calls(box):
    tests = parse_tests([{"type": "assert", "code": "assert f() == 1"}], "t")
    assert run_tests(box, "import sys\nsys.exit(0)", tests) == [False]
    assert run_tests(box, "import os\nos._exit(0)", tests) == [False]
    assert run_tests(box, "def f():\n    print('0 0 1')\n    return 1", tests) == [True]
    # an object equal to everything does not pass a function_call test (results compare as JSON)
    calls = parse_tests([{"type": "function_call", "fn_name": "f", "input": "[]", "output": "[1]"}], "t")
    src = "class Any:\n    def __eq__(self, other):\n        return True\ndef f():\n    return Any()"
    assert run_tests(box, src, calls) == [False]


def test_outputs_match_ignores_trailing_whitespace_only():
    assert outputs_match("1 2 \n3\n\n", "1 2\n3")
    assert not outputs_match("1  2\n3", "1 2\n3")
    assert not outputs_match("3\n4", "3")


def test_environment_is_empty_and_directory_fresh(box, monkeypatch):
    monkeypatch.setenv("R1FLOW_TEST_SECRET", "s3cret-env")
    src = "import os, sys\nprint(sorted(os.environ))\nprint(os.listdir('.'))\nprint(os.getcwd())"
    r = run_python(box, src)
    assert r.status == "ok", r.stderr
    assert "R1FLOW_TEST_SECRET" not in r.stdout and "s3cret" not in r.stdout
    assert "['solution.py']" in r.stdout
    r2 = run_python(box, "open('left_behind.txt', 'w').write('x')\nimport os\nprint(os.listdir('.'))")
    assert r2.status == "ok" and "left_behind.txt" in r2.stdout
    assert "left_behind.txt" not in run_python(box, src).stdout  # the next run starts empty again


def test_stdin_is_the_test_input(box):
    r = run_python(box, "import sys\nprint(len(sys.stdin.read()))", "x" * 100_000)
    assert r.status == "ok" and r.stdout.strip() == "100000"


# --------------------------------------------------------------------------------------------------------------------
# Hostile programs
# --------------------------------------------------------------------------------------------------------------------


def test_infinite_loop_is_killed(box, unharmed):
    r = hostile(box, "while True:\n    pass")
    assert r.status == "timeout" and r.seconds < LIMITS["wall_s"] + SLACK
    r = hostile(box, "import time\ntime.sleep(3600)")  # no CPU used: the wall clock ends it
    assert r.status == "timeout" and r.seconds < LIMITS["wall_s"] + SLACK


def test_fork_bomb_is_contained_and_cleaned_up(box, unharmed):
    src = ("import os, time\n"
           "for _ in range(10000):\n"
           "    try:\n"
           "        os.fork()\n"
           "    except OSError:\n"
           "        pass\n"
           "time.sleep(3600)\n")
    r = hostile(box, src)
    assert r.status == "timeout" and r.seconds < LIMITS["wall_s"] + SLACK


def test_detached_child_does_not_outlive_the_run(box, unharmed):
    src = ("import os, time\n"
           "if os.fork() == 0:\n"
           "    os.setsid()\n"
           "    if os.fork() == 0:\n"
           "        time.sleep(3600)\n"
           "    os._exit(0)\n"
           "print(3)\n")
    r = run_python(box, src, "1 2\n")
    assert r.status == "ok"  # the program itself ends at once; its grandchild must die with it (checked by `unharmed`)


def test_memory_bomb_fails(box, unharmed):
    r = hostile(box, "x = bytearray(10 ** 10)")
    assert r.status == "error" and "MemoryError" in r.stderr
    r = hostile(box, "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)")
    assert r.status in ("error", "timeout") and r.seconds < LIMITS["wall_s"] + SLACK


def test_writes_outside_the_working_directory_fail(box, unharmed, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sentinel = shared / "sentinel.txt"
    sentinel.write_text("untouched")
    sentinel.chmod(0o666)
    project_file = sb.PROJECT_ROOT / "pyproject.toml"
    before = project_file.read_bytes()
    targets = [str(sentinel), str(shared / "new.txt"), str(project_file), "/etc/r1flow-sandbox-test",
               str(Path.home() / "r1flow-sandbox-test"), "/var/tmp/r1flow-sandbox-test"]
    src = "for p in %r:\n    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" % targets
    hostile(box, src)
    assert sentinel.read_text() == "untouched"
    assert not (shared / "new.txt").exists()
    assert project_file.read_bytes() == before
    for p in targets[3:]:
        assert not os.path.exists(p)


def test_user_files_and_environment_stay_unread(box, unharmed, tmp_path, monkeypatch):
    monkeypatch.setenv("R1FLOW_TEST_SECRET", "s3cret-env")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret-file")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    paths = [str(secret), str(sb.PROJECT_ROOT / "README.md"), f"/proc/{os.getpid()}/environ", "/proc/1/environ",
             f"/proc/{os.getppid()}/environ"]
    src = ("import os\nout = [str(os.environ)]\n"
           "for p in %r:\n    try:\n        out.append(open(p, 'rb').read().decode('latin-1'))\n"
           "    except OSError as e:\n        out.append(repr(e))\n"
           "print('\\n'.join(out))\n" % paths)
    r = hostile(box, src)
    assert "s3cret" not in r.stdout
    assert "r1flow" not in r.stdout.lower()  # the project (README) is hidden


def test_sockets_reach_nothing(box, unharmed):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    tcp.settimeout(0.2)
    port = tcp.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    name = f"\0r1flow-sandbox-test-{os.getpid()}"
    unix.bind(name)
    unix.listen(1)
    unix.settimeout(0.2)
    src = ("import socket\nok = []\n"
           "for fam, addr in [(socket.AF_INET, ('127.0.0.1', %d)), (socket.AF_INET, ('1.1.1.1', 53)),"
           " (socket.AF_UNIX, %r)]:\n"
           "    try:\n        s = socket.socket(fam)\n        s.settimeout(0.5)\n        s.connect(addr)\n"
           "        ok.append(addr)\n    except OSError:\n        pass\n"
           "print(ok)\n" % (port, name))
    r = hostile(box, src)
    assert r.stdout.strip() == "[]"
    for server in (tcp, unix):
        with pytest.raises(socket.timeout):
            server.accept()
        server.close()


def test_huge_output_is_cut(box, unharmed):
    r = hostile(box, "while True:\n    print('x' * 100000)")
    assert r.status == "output_limit" and len(r.stdout) <= LIMITS["output_bytes"]
    r = hostile(box, "import sys\nwhile True:\n    sys.stderr.write('y' * 100000)")
    assert r.status == "output_limit" and len(r.stderr) <= LIMITS["output_bytes"]
    r = hostile(box, "open('big', 'w').write('z' * 10 ** 8)")  # file size limit
    assert r.status == "error"


def test_killing_the_parent_fails(box, unharmed):
    me = os.getpid()
    src = ("import os, signal\n"
           "for pid in (os.getppid(), %d, %d, 1, -1, 0):\n"
           "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
           "try:\n    os.killpg(os.getpgid(0), signal.SIGKILL)\nexcept OSError:\n    pass\n" % (me, os.getppid()))
    hostile(box, src)
    os.kill(me, 0)  # still alive (and so is this test run)


def test_os_system_runs_confined(box, unharmed, tmp_path):
    marker = tmp_path / "pwned"
    src = ("import os\n"
           "os.system('touch %s; touch /pwned; echo pwned > /etc/r1flow-pwned; sleep 3600 &')\n"
           "print(3 + 1)\n" % marker)
    r = hostile(box, src)
    assert r.stdout.strip() == "4"
    assert not marker.exists() and not os.path.exists("/pwned") and not os.path.exists("/etc/r1flow-pwned")


# --------------------------------------------------------------------------------------------------------------------
# Configuration and bad input
# --------------------------------------------------------------------------------------------------------------------


def test_refuses_without_namespaces_unless_allowed(monkeypatch, tmp_path, caplog):
    """A stand-in first process that fails the way a kernel without namespaces does (our refusal logic, not the
    isolation itself, is under test here); mode "none" runs the real one."""
    fake = tmp_path / "init.py"
    fake.write_text(
        "import json, os, runpy, sys\n"
        "spec = sys.stdin.read()\n"
        "if json.loads(spec)['mode'] != 'none':\n"
        "    os.write(2, b'r1flow-sandbox: unshare: Operation not permitted\\n')\n"
        "    os._exit(125)\n"
        "import io\nsys.stdin = io.StringIO(spec)\n"
        f"runpy.run_path({str(sb.INIT_SCRIPT)!r}, run_name='__main__')\n")
    fake.chmod(0o755)
    tmp_path.chmod(0o755)
    monkeypatch.setattr(sb, "INIT_SCRIPT", fake)
    monkeypatch.setattr(sb, "_MODES", {})
    with pytest.raises(UserError, match="allow_without_namespaces"):
        run_python(Sandbox(**LIMITS), "print(1)")
    allowed = Sandbox(**{**LIMITS, "allow_without_namespaces": True})
    r = run_python(allowed, "print(1)")
    assert r.status == "ok" and r.stdout == "1\n"
    assert "no namespaces" in caplog.text


def test_unknown_interpreter_is_a_user_error():
    with pytest.raises(UserError, match="sandbox.python"):
        run_python(Sandbox(**{**LIMITS, "python": "/nonexistent/python3"}), "print(1)")


def test_config_node_checked():
    assert sb.sandbox_from_config(dict(LIMITS)) == Sandbox(**LIMITS)
    with pytest.raises(UserError, match="sandbox.wall_s"):
        sb.sandbox_from_config({**LIMITS, "wall_s": 0})
    with pytest.raises(UserError, match="exactly the keys"):
        sb.sandbox_from_config({**LIMITS, "wal_s": 1})


def test_parse_tests_accepts_open_r1_verification_info():
    info = {"language": "python", "test_cases": [{"type": "stdin_stdout", "input": "1\n", "output": "2\n",
                                                  "fn_name": None}]}
    assert parse_tests(info, "t") == [{"type": "stdin_stdout", "input": "1\n", "output": "2\n"}]
    import json
    assert parse_tests(json.dumps(info), "t") == parse_tests(info, "t")
    assert parse_tests([], "t") is None and parse_tests(None, "t") is None


@pytest.mark.parametrize("tests, message", [
    ([{"type": "stdin", "input": "1", "output": "2"}], "`type` must be one of"),
    ([{"type": "stdin_stdout", "input": 1, "output": "2"}], "`input` must be a string"),
    ([{"type": "assert", "code": "assert f(1) =="}], "not valid Python"),
    ([{"type": "function_call", "fn_name": "f x", "input": "[1]", "output": "[2]"}], "identifier"),
    ([{"type": "function_call", "fn_name": "f", "input": "{1", "output": "[2]"}], "must be JSON"),
    ([{"type": "function_call", "fn_name": "f", "input": "1", "output": "[2]"}], "JSON list of arguments"),
    ("[1, 2", "not JSON"),
    ({"language": "cpp", "test_cases": []}, "Python only"),
    (["assert f(1) == 2"], "must be an object"),
])
def test_malformed_tests_name_the_row(tests, message):
    with pytest.raises(UserError, match=message) as err:
        parse_tests(tests, "data/code/rl_train.jsonl:7 (id code-0006)")
    assert "data/code/rl_train.jsonl:7" in str(err.value)


def test_verifiable_coding_problems_fixture_through_the_data_config(box):
    """conf/data/verifiable_code.yaml's column mapping on a local file of the hub set's exact schema: every row's
    tests parse and its gold solution passes them."""
    import yaml

    from stages.shared.data import load_rows

    conf = yaml.safe_load((sb.PROJECT_ROOT / "conf" / "data" / "verifiable_code.yaml").read_text())
    fixture = Path(__file__).parents[1] / "fixtures" / "verifiable_coding_problems_python_tiny.jsonl"
    spec = {"path": str(fixture), "columns": conf["files"]["rl_train"]["columns"]}
    rows = load_rows(spec, required=["prompt", "tests"], name="rl_train")
    assert {t["type"] for r in rows for t in parse_tests(r["tests"], r["id"])} == {"stdin_stdout", "call"}
    for r in rows:
        gold = r["gold_standard_solution"].split("```python\n")[1].split("```")[0]
        assert all(run_tests(box, gold, parse_tests(r["tests"], r["id"]))), r["id"]


def test_default_sandbox_is_conf_sandbox_default():
    from pipeline.plan import compose_config

    assert sb.default_sandbox() == sb.sandbox_from_config(compose_config([]).sandbox)
