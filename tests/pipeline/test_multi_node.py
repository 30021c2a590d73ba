"""Two nodes for real, on this machine: two accelerate launchers (--num_machines 2, gloo over 127.0.0.1, one process
each) train cold_start_sft on the tiny model, started the way README "Several nodes" tells users (the flow's node runs
the stage and logs the command; the test runs that command with --machine_rank 1), and through `srun` (a stand-in on
PATH, tests/pipeline/fake_slurm). Then the faults: a node killed mid-training, a node that never joins, the flow's own
node killed. Each fails the stage with a message naming the cause, within hardware.distributed_timeout_s, and leaves
no artifact and no staging directory."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline import artifacts, runner
from pipeline.plan import compose_config, plan

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
TIMEOUT_S = 20  # hardware.distributed_timeout_s in these tests
OTHER_NODE = "on every other node, with its --machine_rank: "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stages(root, *overrides):
    cfg = compose_config(["size=smoke", "base.max_steps=2", "base.eval_samples=0", "cold_start_sft.eval_samples=0",
                          "hardware.launcher=accelerate", "hardware.num_processes=1", "hardware.num_machines=2",
                          "hardware.distributed_modules=[cold_start_sft]", "hardware.torch_threads=1",
                          f"hardware.distributed_timeout_s={TIMEOUT_S}", f"artifacts_root={root}",
                          f"work_root={root}-work", *overrides])
    return {s.name: s for s in plan(cfg)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An artifacts root holding a 2-step smoke base (one process: base is not in distributed_modules here)."""
    root = tmp_path_factory.mktemp("multi_node")
    base = _stages(root)["base"]
    runner.run_stage(base, root=str(root), work_root=f"{root}-work", log=lambda line: None)
    return root


@pytest.fixture
def node_env(monkeypatch):
    """What README "Several nodes" exports on the node that runs the flow."""
    monkeypatch.setenv("MACHINE_RANK", "0")
    monkeypatch.setenv("MAIN_PROCESS_IP", "127.0.0.1")
    monkeypatch.setenv("MAIN_PROCESS_PORT", str(_free_port()))


class OtherNode:
    """Node 1: runs the command the flow logs, with --machine_rank 1, as its own process group (a whole node).
    With read_only=root it sees the artifacts root read-only (a private mount namespace), so any write of its
    processes there fails the stage (the work root stays writable: every rank saves its RNG state with a
    checkpoint)."""

    def __init__(self, read_only: str | None = None):
        self.read_only = read_only
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self, logged: str) -> None:
        cmd = shlex.split(logged[len(OTHER_NODE):])
        cmd[cmd.index("--machine_rank") + 1] = "1"
        if self.read_only:
            cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
                   'exec "$@"', self.read_only, *cmd]
        self.proc = subprocess.Popen(cmd, cwd=runner.PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"node 1 still running {TIMEOUT_S + 60} s after the stage ended:\n{''.join(self.lines)}")


def _run(stage, root, on_line):
    return runner.run_stage(stage, root=str(root), work_root=f"{root}-work", log=on_line)


def _nothing_published(root, stage):
    assert not artifacts.exists(str(root), stage.name, stage.version)
    assert not [p for p in (Path(root) / stage.name).glob(".staging-*")]


def _unshare_works(path) -> bool:
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {path} {path} && "
                           f"mount -o remount,bind,ro {path} {path}"], capture_output=True)
    return done.returncode == 0


def test_two_nodes_train_and_only_rank_0_writes_the_artifact(store, node_env):
    stage = _stages(store)["cold_start_sft"]
    node1 = OtherNode(read_only=str(store) if _unshare_works(store) else None)
    lines = []

    def on_line(line):
        lines.append(line)
        if line.startswith(OTHER_NODE):
            node1.start(line)

    try:
        result = _run(stage, store, on_line)
    except RuntimeError as e:
        node1.wait()
        pytest.fail(f"{e}\n--- node 1:\n{''.join(node1.lines[-80:])}")
    assert node1.proc is not None, "the flow did not log the command for the other nodes"
    assert node1.wait() == 0, "".join(node1.lines)
    assert result["metrics"]["global_step"] == 2  # 128 samples, batch 32 per process, 2 processes
    path = artifacts.load(str(store), stage.name, stage.version)  # re-hashes every file against the manifest
    assert (path / "model.safetensors").exists()
    assert any("--num_machines 2" in line for line in lines)


def test_killing_the_other_node_fails_the_stage(store, node_env):
    stage = _stages(store, "cold_start_sft.per_device_train_batch_size=4")["cold_start_sft"]
    node1 = OtherNode()

    def on_line(line):
        if line.startswith(OTHER_NODE):
            node1.start(line)
        elif line.startswith("step ") and node1.proc.poll() is None:
            node1.kill()

    with pytest.raises(RuntimeError, match="lost contact with the other nodes of its 2-node launch") as failed:
        _run(stage, store, on_line)
    assert "Connection" in str(failed.value) and "distributed_timeout_s=20" in str(failed.value)
    assert node1.wait() == -signal.SIGKILL
    _nothing_published(store, stage)


def test_a_hung_node_fails_the_stage_after_the_timeout(store, node_env):
    """Node 1 stopped (SIGSTOP: alive, its connections open, no progress), as a hung machine: node 0's collective
    gives up after hardware.distributed_timeout_s instead of waiting forever."""
    stage = _stages(store, "cold_start_sft.per_device_train_batch_size=4", "cold_start_sft.seed=4")["cold_start_sft"]
    node1 = OtherNode()

    def on_line(line):
        if line.startswith(OTHER_NODE):
            node1.start(line)
        elif line.startswith("step ") and node1.proc.poll() is None:
            for pid in [node1.proc.pid, *_descendants(node1.proc.pid)]:  # torchrun starts its workers in their
                os.kill(pid, signal.SIGSTOP)                              # own sessions: stop each process

    try:
        with pytest.raises(RuntimeError, match="lost contact with the other nodes") as failed:
            _run(stage, store, on_line)
    finally:
        node1.kill()
    assert "Timed out" in str(failed.value)
    _nothing_published(store, stage)


def test_a_node_that_never_joins_fails_the_stage_after_the_timeout(store, node_env):
    stage = _stages(store, "cold_start_sft.max_samples=64")["cold_start_sft"]
    with pytest.raises(RuntimeError, match="did not join within hardware.distributed_timeout_s=20") as failed:
        _run(stage, store, lambda line: None)
    assert "1/2 clients joined" in str(failed.value)
    _nothing_published(store, stage)


def test_killing_the_flows_node_stops_the_other_node(store, node_env):
    """SIGKILL to the launcher the flow started (its workers die with it): the stage reports the SIGKILL, and node 1,
    left alone, fails by itself instead of waiting forever."""
    stage = _stages(store, "cold_start_sft.per_device_train_batch_size=4", "cold_start_sft.seed=1")["cold_start_sft"]
    node1 = OtherNode()

    def on_line(line):
        if line.startswith(OTHER_NODE):
            node1.start(line)
        elif line.startswith("step ") and node1.proc.poll() is None:
            for child in _children(os.getpid()):  # the flow's launcher only: not node 1, not the session's
                if child != node1.proc.pid and b"accelerate" in Path(f"/proc/{child}/cmdline").read_bytes():  # server
                    os.kill(child, signal.SIGKILL)

    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        _run(stage, store, on_line)
    assert node1.wait() != 0
    assert "Connection closed by peer" in "".join(node1.lines) or "Connection reset" in "".join(node1.lines)
    _nothing_published(store, stage)


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for child in children for d in _descendants(child)]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-[0-1]")
    monkeypatch.delenv("MAIN_PROCESS_IP", raising=False)  # the host comes from scontrol, as in a real allocation
    monkeypatch.setenv("MAIN_PROCESS_PORT", str(_free_port()))
    pids = tmp_path / "srun_pids"
    monkeypatch.setenv("FAKE_SRUN_PIDS", str(pids))
    return pids


def test_slurm_path_runs_one_launcher_per_node(store, fake_slurm):
    stage = _stages(store, "hardware.node_launcher=srun", "cold_start_sft.seed=2")["cold_start_sft"]
    lines = []
    result = _run(stage, store, lines.append)
    assert result["metrics"]["global_step"] == 2
    assert len(fake_slurm.read_text().split()) == 2  # srun started two node tasks
    artifacts.load(str(store), stage.name, stage.version)
    assert not any(line.startswith(OTHER_NODE) for line in lines)  # srun starts the other node itself


def test_slurm_node_killed_fails_the_stage(store, fake_slurm):
    stage = _stages(store, "hardware.node_launcher=srun", "cold_start_sft.per_device_train_batch_size=4",
                    "cold_start_sft.seed=3")["cold_start_sft"]

    def on_line(line):
        if line.startswith("step ") and fake_slurm.exists():
            node1 = int(fake_slurm.read_text().split()[1])
            fake_slurm.unlink()
            os.killpg(node1, signal.SIGKILL)

    with pytest.raises(RuntimeError, match="lost contact with the other nodes of its 2-node launch"):
        _run(stage, store, on_line)
    _nothing_published(store, stage)
