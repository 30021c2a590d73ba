"""The store under faults and sharing: why a stage is stale, accepting an artifact, damaged files, a killed run's
staging dir, two runs on one artifacts_root. Toy stages (tests/pipeline/toy_stage.py) in real subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import psutil
import pytest

from pipeline import artifacts
from pipeline import plan as plan_module
from pipeline.cli import main
from pipeline.plan import PROJECT_ROOT, artifacts_root, compose_config, plan, work_root
from pipeline.runner import run_stage

TEST_CONF = Path(__file__).parent / "conf"
# One orchestrator the way the flow drives it (plan, then run_stage per stage), printing what each stage did.
RUN_ALL = """
import json, sys
from pipeline.plan import artifacts_root, compose_config, plan, work_root
from pipeline.runner import run_stage
cfg = compose_config(json.loads(sys.argv[1]))
for stage in plan(cfg):
    result = run_stage(stage, root=artifacts_root(cfg), work_root=work_root(cfg))
    print("RESULT", stage.name, stage.version, "cached" if result["cached"] else "ran", flush=True)
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R1FLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def trace(tmp_path, monkeypatch):
    """File with one line per computation of a toy stage: '<value> <pid>'."""
    path = tmp_path / "trace.txt"
    monkeypatch.setenv("R1FLOW_TOY_TRACE", str(path))
    return path


def computed(trace: Path) -> list[int]:
    return sorted(int(line.split()[0]) for line in trace.read_text().splitlines()) if trace.exists() else []


def toy(tmp_path, root=None) -> list[str]:
    return [f"hydra.searchpath=[file://{TEST_CONF}]", "recipe=toy", f"artifacts_root={root or tmp_path / 'artifacts'}",
            f"work_root={tmp_path / 'work'}"]


def run_all(overrides, log=None) -> dict[str, str]:
    cfg = compose_config(overrides)
    out = {}
    for stage in plan(cfg):
        result = run_stage(stage, root=artifacts_root(cfg), work_root=work_root(cfg), log=log or (lambda s: None))
        out[stage.name] = "cached" if result["cached"] else "ran"
    return out


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def status(capsys, overrides) -> dict[str, str]:
    code, out, _ = cli(capsys, "status", *overrides)
    assert code == 0
    return {line.split()[0]: line.split(None, 2)[2] for line in out.splitlines()[1:]}


# --- why a stage is stale, and accepting an artifact -----------------------------------------------------------------


def test_status_names_what_changed_and_accept_keeps_the_artifact(tmp_path, capsys, monkeypatch, trace):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"q": 1}\n')
    overrides = toy(tmp_path) + [f"+toy.first.rows={data}"]
    assert run_all(overrides) == {"first": "ran", "second": "ran", "side": "ran", "third": "ran"}
    assert set(status(capsys, overrides).values()) == {"done"}

    s = status(capsys, overrides + ["toy.second.value=20"])
    assert s["first"] == "done"
    assert s["second"].startswith("stale") and "config: value" in s["second"] and "input" not in s["second"]
    assert s["third"].startswith("stale") and "input: source" in s["third"] and "config" not in s["third"]

    data.write_text('{"q": 2}\n')
    s = status(capsys, overrides)
    assert s["first"].startswith("stale") and f"data: {data}" in s["first"]
    data.write_text('{"q": 1}\n')

    # A code change in a module the stage imports (not the stage's own file): a copy of the recorded sources with the
    # shared one edited stands in for the project.
    root = tmp_path / "artifacts"
    recorded = artifacts.read_manifest(str(root), "first", artifacts.latest(str(root), "first"))["code"]
    assert "tests/pipeline/toy_stage.py" in recorded
    shared = next(rel for rel in recorded if rel.endswith("errors.py"))
    src = tmp_path / "src"
    for rel in recorded:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, src / rel)
    with open(src / shared, "a") as f:
        f.write("\n# a comment: changes no result\n")
    monkeypatch.setattr(plan_module, "PROJECT_ROOT", src)
    s = status(capsys, overrides)
    assert s["first"].startswith("stale") and f"code: {shared}" in s["first"]
    assert f"code: {shared}" in s["third"] and "input: other, source" in s["third"]

    # Accepting needs the inputs' new versions first, then keeps every artifact without recomputing.
    code, _, err = cli(capsys, "accept", "second", *overrides)
    assert code == 2 and "run or accept first first" in err
    old = {name: artifacts.latest(str(root), name) for name in ("first", "second", "side", "third")}
    code, out, _ = cli(capsys, "accept", "third", "first", "second", "side", *overrides)
    assert code == 0 and out.count("accepted") == 4
    assert set(status(capsys, overrides).values()) == {"done"}
    planned = {s.name: s for s in plan(compose_config(overrides))}
    for name in ("first", "second", "side", "third"):
        new = planned[name].version
        m = artifacts.read_manifest(str(root), name, new)
        assert m["accepted"]["from"] == old[name] and m["accepted"]["by"] and m["accepted"]["at"]
        assert any(r.startswith("code: ") for r in m["accepted"]["reasons"])
        assert m["code"] == planned[name].code and m["metrics"] == artifacts.read_manifest(
            str(root), name, old[name])["metrics"]
        assert {r: i["version"] for r, i in m["inputs"].items()} == planned[name].input_versions
        # the same bytes, not a copy (hard links), and a complete artifact that verifies
        assert (root / name / new / "value.txt").stat().st_ino == (root / name / old[name] / "value.txt").stat().st_ino
        artifacts.load(str(root), name, new)
        assert artifacts.latest(str(root), name) == new
    before = computed(trace)
    assert run_all(overrides) == {"first": "cached", "second": "cached", "side": "cached", "third": "cached"}
    assert computed(trace) == before


def test_accepting_a_damaged_artifact_is_refused(tmp_path, capsys):
    overrides = toy(tmp_path)
    run_all(overrides)
    root = tmp_path / "artifacts"
    first = artifacts.latest(str(root), "first")
    (root / "first" / first / "value.txt").write_text("7")  # same size, other bytes
    code, _, err = cli(capsys, "accept", "first", *overrides, "toy.first.fail=true")  # a config change to accept
    assert code == 2 and "value.txt has sha256" in err and "cannot accept" in err
    assert artifacts.latest(str(root), "first") == first


# --- damaged artifacts: status flags them cheaply, verify re-hashes -------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "artifacts")
        return
    url = f"memory://r1flow-{uuid.uuid4().hex}"
    yield url
    fs, base = fsspec.core.url_to_fs(url)
    fs.rm(base, recursive=True)


def test_damaged_files_show_in_status_and_fail_verify(tmp_path, capsys, store):
    overrides = toy(tmp_path, root=store)
    run_all(overrides)
    assert cli(capsys, "artifacts", "verify", *overrides)[0] == 0
    fs, base = fsspec.core.url_to_fs(store)
    v = {s.name: s.version for s in plan(compose_config(overrides))}
    fs.pipe_file(f"{base}/first/{v['first']}/value.txt", b"")          # truncated
    fs.rm_file(f"{base}/second/{v['second']}/value.txt")                # missing
    fs.pipe_file(f"{base}/third/{v['third']}/value.txt", b"2111")       # same size, other bytes

    s = status(capsys, overrides)
    assert s["first"].startswith("damaged") and "value.txt has 0 bytes, manifest says 1" in s["first"]
    assert s["second"].startswith("damaged") and "value.txt listed in the manifest is missing" in s["second"]
    assert s["third"] == "done"  # sizes cannot see this one; verify can

    code, out, _ = cli(capsys, "artifacts", "verify", *overrides)
    assert code == 1 and "4 artifact(s) verified, 3 damaged" in out
    lines = {line.split()[1].split("@")[0]: line for line in out.splitlines() if line.startswith("DAMAGED")}
    assert "0 bytes" in lines["first"] and "missing" in lines["second"] and "sha256" in lines["third"]
    code, out, _ = cli(capsys, "artifacts", "verify", f"third@{v['third']}", *overrides)
    assert code == 1 and "1 artifact(s) verified, 1 damaged" in out
    code, _, err = cli(capsys, "artifacts", "verify", "nope", *overrides)
    assert code == 2 and "no complete 'nope' artifact" in err


# --- a killed run's staging dir --------------------------------------------------------------------------------------


def start_run_all(overrides, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN_ALL, json.dumps(overrides)], cwd=PROJECT_ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def stage_processes(tmp_path) -> list:
    return [p for p in psutil.process_iter(["cmdline"])
            if "pipeline.runner" in (p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"])]


def staging_of(root: Path, name: str) -> list[Path]:
    return sorted((root / name).glob(".staging-*"))


def test_the_next_run_cleans_a_killed_runs_staging_and_spares_a_live_one(tmp_path, trace):
    root = tmp_path / "artifacts"
    overrides = toy(tmp_path)
    killed = start_run_all(overrides, R1FLOW_TOY_SLEEP_S="600")
    wait_for(lambda: any((d / "partial.txt").exists() for d in staging_of(root, "first")), "the stage to start")
    left = staging_of(root, "first")
    os.kill(killed.pid, signal.SIGKILL)  # the orchestrator; its stage process dies with it (PR_SET_PDEATHSIG)
    killed.wait()
    wait_for(lambda: not stage_processes(tmp_path), "the stage process to die with its orchestrator")
    assert computed(trace) == [1]
    assert left and all(d.exists() for d in left)
    assert list((root / "first").glob(".lease-*"))  # the killed run's lease is still there

    # A live run of another version of the same stage, mid-write, while the killed one's version reruns.
    live = start_run_all(toy(tmp_path) + ["toy.first.value=5"], R1FLOW_TOY_SLEEP_S="600")
    wait_for(lambda: len(staging_of(root, "first")) == len(left) + 1, "the live run to stage")
    live_staging = [d for d in staging_of(root, "first") if d not in left]
    wait_for(lambda: (live_staging[0] / "partial.txt").exists(), "the live run to write")

    messages = []
    assert run_all(overrides, log=messages.append) == {"first": "ran", "second": "ran", "side": "ran", "third": "ran"}
    assert not any(d.exists() for d in left)  # cleaned: its process is gone (the lease said so)
    assert any("taking over the lease" in m and "process is gone" in m for m in messages)
    assert any(f"removed {left[0]}" in m for m in messages)
    assert live_staging[0].exists() and (live_staging[0] / "partial.txt").exists()  # spared: its run is alive
    live.kill()
    live.wait()


# --- two runs on one store -------------------------------------------------------------------------------------------


def cli_run(overrides, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *overrides], cwd=PROJECT_ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def states(output: str) -> dict[str, str]:
    rows = [line.split() for line in output.splitlines()]
    return {row[0]: row[2] for row in rows if len(row) == 5 and row[0] in ("first", "second", "side", "third")}


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_two_r1flow_runs_on_one_store_compute_each_version_once(tmp_path, trace, scheme, prefect_server):
    root = tmp_path / "artifacts"
    overrides = toy(tmp_path, root=f"{scheme}{root}")
    # each run starts Prefect's temporary server; two at once on 2 busy cores can take longer than its 20 s default
    env = {"R1FLOW_TOY_SLEEP_S": "2", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    runs = [cli_run(overrides, **env) for _ in range(2)]
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert computed(trace) == [1, 10, 100, 1000]  # each version computed once, by one of the two
    for name in ("first", "second", "side", "third"):
        assert sorted(states(out)[name] for out in outputs) == ["cached", "ran"], outputs
        assert len(artifacts.list_versions(str(root), name)) == 1
        assert not list((root / name).glob(".*"))  # no staging dir, no lease left behind
    assert any("waiting for first@" in out for out in outputs)


def test_different_versions_run_side_by_side(tmp_path, trace):
    root = tmp_path / "artifacts"
    slow = start_run_all(toy(tmp_path), R1FLOW_TOY_SLEEP_S="600")
    wait_for(lambda: any((d / "partial.txt").exists() for d in staging_of(root, "first")), "the slow run to start")
    # another version of every stage runs to the end while the slow one holds first@<its version>
    assert run_all(toy(tmp_path) + ["toy.first.value=2"]) == {"first": "ran", "second": "ran", "side": "ran", "third": "ran"}
    assert slow.poll() is None
    slow.kill()
    slow.wait()


def test_memory_store_shared_by_two_orchestrators_computes_once(tmp_path, trace, monkeypatch):
    """memory:// lives in one process: two threads there stand for two machines on one object store (the remote path:
    upload, manifest last, download into the cache)."""
    url = f"memory://r1flow-{uuid.uuid4().hex}"
    monkeypatch.setenv("R1FLOW_TOY_SLEEP_S", "1")
    monkeypatch.setattr(artifacts, "POLL_S", 0.2)
    cfg = compose_config(toy(tmp_path, root=url))  # Hydra composes in one thread at a time
    stages, work = plan(cfg), work_root(cfg)
    results, errors = [], []

    def orchestrate():
        try:
            results.append({s.name: "cached" if run_stage(s, root=url, work_root=work, log=lambda m: None)["cached"]
                            else "ran" for s in stages})
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=orchestrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert computed(trace) == [1, 10, 100, 1000]
    for name in ("first", "second", "side", "third"):
        assert sorted(r[name] for r in results) == ["cached", "ran"]
        assert len(artifacts.list_versions(url, name)) == 1
    fs, base = fsspec.core.url_to_fs(url)
    assert not [p for p in fs.find(base) if "/.lease-" in p]
    fs.rm(base, recursive=True)


# --- the lease itself ------------------------------------------------------------------------------------------------


def test_a_lease_is_taken_over_only_once_its_heartbeat_stops(monkeypatch):
    monkeypatch.setattr(artifacts, "POLL_S", 0.05)
    url = f"memory://r1flow-{uuid.uuid4().hex}"
    fs, base = fsspec.core.url_to_fs(url)
    path = f"{base}/sft/.lease-v1"
    messages, order = [], []

    def take(tag, **kw):
        with artifacts.lease(url, "sft", "v1", log=messages.append, **kw):
            order.append(tag)

    # A live holder beats every 0.05 s: a waiter that gives up on 1 s of silence keeps waiting for 3 s and more.
    release = threading.Event()

    def hold():
        with artifacts.lease(url, "sft", "v1", heartbeat_s=0.05):
            order.append("holder")
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    wait_for(lambda: order == ["holder"], "the holder")
    waiter = threading.Thread(target=take, args=("waiter",), kwargs={"stale_after_s": 1.0})
    waiter.start()
    time.sleep(3)
    assert order == ["holder"] and any("waiting for sft@v1" in m for m in messages)
    release.set()
    holder.join()
    waiter.join()
    assert order == ["holder", "waiter"] and not any("taking over" in m for m in messages)
    assert not fs.exists(path)  # released

    # A holder on another machine that died: its lease never changes again and is taken over.
    fs.pipe_file(path, json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "pid_started": 0.0,
                                   "since": "2026-01-01T00:00:00", "beat": 7}).encode())
    take("after a dead machine", stale_after_s=0.5)
    assert order[-1] == "after a dead machine"
    assert any("taking over the lease of sft@v1 from pid 1 on elsewhere" in m and "no heartbeat" in m
               for m in messages)
    fs.rm(base, recursive=True)


# --- what a stage learns about its inputs' history -------------------------------------------------------------------


def test_upstream_timings_reach_a_stage_through_its_inputs_manifests_on_a_remote_store(tmp_path, cache):
    """The report's wall-time table reads the inputs' manifests only: complete with a memory:// root, where the
    ancestors are not in the local cache at all."""
    from stages import report

    url = f"memory://r1flow-{uuid.uuid4().hex}"
    run_all(toy(tmp_path, root=url))
    shutil.rmtree(cache)  # another machine: nothing cached
    third = artifacts.latest(url, "third")
    d = artifacts.load(url, "third", third)
    assert sorted(p.name for p in cache.iterdir()) == ["third"]
    times = report.ancestry({"source": d})
    assert sorted(t["name"] for t in times) == ["first", "second", "side", "third"]
    assert all(isinstance(t["seconds"], float) and t["seconds"] > 0 for t in times)
    assert next(t for t in times if t["name"] == "first")["version"] == artifacts.latest(url, "first")
    fs, base = fsspec.core.url_to_fs(url)
    fs.rm(base, recursive=True)
