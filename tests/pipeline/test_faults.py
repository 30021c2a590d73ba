"""Memory and disk faults injected into a real stage process (tests/pipeline/toy_stage.py): the kernel's OOM killer, a
SIGKILL, an address-space limit, a full disk in the stage and at publish. Each is reported with its cause and what to
change, and nothing partial is published."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline import artifacts, runner
from pipeline.plan import compose_config, plan

TEST_CONF = Path(__file__).parent / "conf"


def _first_stage(tmp_path, root, *overrides):
    cfg = compose_config([f"hydra.searchpath=[file://{TEST_CONF}]", "recipe=toy", f"artifacts_root={root}",
                          f"work_root={root}/work", *overrides])
    return plan(cfg)[0]


def _run_and_fail(stage, root):
    with pytest.raises(RuntimeError) as failed:
        runner.run_stage(stage, root=str(root), work_root=f"{root}/work", log=lambda line: None)
    message = str(failed.value)
    assert not artifacts.exists(str(root), stage.name, stage.version)
    leftovers = [p.name for p in (Path(root) / stage.name).iterdir()] if (Path(root) / stage.name).exists() else []
    assert leftovers == [], f"staging left behind: {leftovers}"
    return message


def test_sigkill_is_reported_as_a_likely_out_of_memory(tmp_path):
    stage = _first_stage(tmp_path, tmp_path / "a", "faults.kill_self=true")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "killed by SIGKILL (often the OOM killer" in message
    assert "per_device_train_batch_size" in message and "exit code" not in message


def test_a_worker_killed_under_accelerate_is_reported_as_sigkill(tmp_path):
    """Two processes under `accelerate launch`: torchrun turns the worker's SIGKILL into its own exit code 1 and a
    'Signal 9 (SIGKILL)' line, which the runner reads."""
    stage = _first_stage(tmp_path, tmp_path / "a", "faults.kill_self=true", "+toy.first.hardware.launcher=accelerate",
                         "+toy.first.hardware.num_processes=2", "+toy.first.hardware.distributed_timeout_s=20")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "killed by SIGKILL" in message and "Signal 9 (SIGKILL)" in message


@pytest.fixture
def memory_cgroup():
    """A child memory cgroup with a 64 MiB limit (v2 or v1), where this machine lets us make one (root)."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    v2 = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), None)
    v1 = next((line.split(":", 2)[2] for line in own if ":memory:" in line), None)
    candidates = []
    if v1 is not None:
        candidates.append((Path("/sys/fs/cgroup/memory") / v1.lstrip("/"), "memory.limit_in_bytes"))
        candidates.append((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"))
    if v2 is not None:
        candidates.append((Path("/sys/fs/cgroup") / v2.lstrip("/"), "memory.max"))
    for parent, limit_file in candidates:
        path = parent / f"r1flow-test-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / limit_file).write_text(str(64 << 20))
            (path / "memory.swap.max" if limit_file == "memory.max" else path / "memory.swappiness").write_text("0")
        except OSError:
            path.rmdir()
            continue
        yield path
        path.rmdir()
        return
    pytest.skip("no memory cgroup can be made here (needs root and a writable cgroup filesystem)")


def test_oom_killer_is_named_with_what_to_change(tmp_path, memory_cgroup, monkeypatch):
    """The stage joins a 64 MiB cgroup and touches 512 MiB: the kernel's OOM killer SIGKILLs it, and the runner sees
    the OOM-kill counter rise."""
    monkeypatch.setenv("R1FLOW_TOY_CGROUP", str(memory_cgroup))
    stage = _first_stage(tmp_path, tmp_path / "a", "faults.allocate_mb=512")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "was killed by the kernel's OOM killer" in message and "oom_kill" in message
    assert "prompts_per_step x num_generations" in message and "gradient_checkpointing" in message


def test_memory_error_under_an_address_space_limit(tmp_path):
    stage = _first_stage(tmp_path, tmp_path / "a", "faults.address_space_mb=64", "faults.allocate_mb=512")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "ran out of memory (MemoryError" in message and "per_device_train_batch_size" in message


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root can mount one here); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_in_the_stage_names_enospc_and_the_free_space(tmp_path, small_disk):
    """Artifacts and checkpoints on a 4 MiB disk; the stage writes 16 MiB into its output."""
    stage = _first_stage(tmp_path, small_disk, "faults.write_mb=16")
    message = _run_and_fail(stage, small_disk)
    assert "ran out of disk space (ENOSPC" in message and "No space left on device" in message
    assert f"{small_disk}/work" in message and "MiB free" in message and "work_root" in message
    assert artifacts.list_versions(str(small_disk), stage.name) == []


def test_full_disk_at_publish_leaves_nothing(tmp_path, monkeypatch):
    """The stage succeeds; writing the manifest fails with ENOSPC (injected): no artifact, no staging directory."""
    stage = _first_stage(tmp_path, tmp_path / "a")

    def full(path, manifest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(artifacts, "_write_manifest", full)
    message = _run_and_fail(stage, tmp_path / "a")
    assert "ran out of disk space (ENOSPC: publishing" in message


def test_an_ordinary_failure_keeps_the_exit_code(tmp_path):
    stage = _first_stage(tmp_path, tmp_path / "a", "toy.first.fail=true")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "failed (exit code 1)" in message and "toy stage failed on purpose" in message


def test_a_published_stage_leaves_no_resume_state_and_a_failed_one_keeps_it(tmp_path):
    """The toy stage leaves a 1 MiB checkpoint in its work dir, as a trainer does. Once its artifact is published the
    runner removes it (the store serves the stage from then on; at 1.5B-7B parameters each stage's checkpoints are
    36-180 GB); a failed attempt keeps it, so the rerun resumes."""
    root = tmp_path / "a"
    stage = _first_stage(tmp_path, root)
    lines = []
    runner.run_stage(stage, root=str(root), work_root=f"{root}/work", log=lines.append)
    work_dir = root / "work" / stage.name / stage.version
    assert sorted(p.name for p in work_dir.iterdir()) == [".lock", "events.jsonl", "spec.json", "stage.log"]
    assert any(f"removed 0.0 GiB of resume state (checkpoints) from {work_dir}" in line for line in lines)
    assert artifacts.exists(str(root), stage.name, stage.version)

    failed = _first_stage(tmp_path, tmp_path / "b", "toy.first.fail=true")
    _run_and_fail(failed, tmp_path / "b")
    kept = tmp_path / "b" / "work" / failed.name / failed.version / "checkpoints" / "checkpoint-1" / "optimizer.pt"
    assert kept.stat().st_size == 1 << 20


def test_torch_save_on_a_full_disk_is_read_as_a_full_disk():
    """torch.save's messages on ENOSPC carry no errno (a reward model's optimizer state filled a 64 GB disk on a lent
    H100); the runner reads them as the disk."""
    lines = ["RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 2450621248 vs 2450621136",
             "RuntimeError: basic_ios::clear: iostream error"]
    for line in lines:
        assert [kind for kind, pattern in runner.FAILURE_PATTERNS if pattern.search(line)] == ["disk"], line
    assert not any(pattern.search("RuntimeError: shape mismatch at pos 3") for _, pattern in runner.FAILURE_PATTERNS)


# vLLM 0.25's own lines (vllm/v1/worker/utils.py, vllm/v1/core/kv_cache_utils.py)
VLLM_START = ("ValueError: Free memory on device cuda:0 (24.1/79.2 GiB) on startup is less than desired GPU memory "
              "utilization (0.5, 39.6 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
              "processes.")
VLLM_KV_CACHE = ("ValueError: To serve at least one request with the model's max seq len (32768), (3.5 GiB KV cache is "
                 "needed, which is larger than the available KV cache memory (1.2 GiB). Try increasing "
                 "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.")


def test_vllm_without_room_to_start_names_the_share_to_lower(tmp_path):
    """The 7B alignment RL's engine starts beside the trainer's 40 GB per GPU; on an 80 GB card a larger share fails
    with vLLM's own message, which tells the user nothing of r1flow's key."""
    stage = _first_stage(tmp_path, tmp_path / "a", f"faults.raise_message='{VLLM_START}'",
                         "+toy.first.hardware.vllm.gpu_memory_utilization=0.5")
    message = _run_and_fail(stage, tmp_path / "a")
    assert "vLLM's engine did not start" in message and "24.1/79.2 GiB" in message
    assert "hardware.vllm.gpu_memory_utilization=0.5" in message and "lower that share" in message
    assert "ran out of memory" not in message


def test_a_kv_cache_too_small_asks_for_a_larger_share_not_a_smaller_one():
    causes = {kind: VLLM_KV_CACHE for kind, pattern in runner.FAILURE_PATTERNS if pattern.search(VLLM_KV_CACHE)}
    assert list(causes) == ["vllm_kv_cache"]
    none_left = "ValueError: No available memory for the cache blocks. Try increasing"
    assert [kind for kind, pattern in runner.FAILURE_PATTERNS if pattern.search(none_left)] == ["vllm_kv_cache"]
    message = runner.failure_message("evaluate@1", 1, causes, {}, {"vllm": {"gpu_memory_utilization": 0.3}}, [])
    assert "raise hardware.vllm.gpu_memory_utilization=0.3" in message and "max_tokens" in message
