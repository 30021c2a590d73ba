"""Run one stage in its own process and publish what it wrote as a versioned artifact.

Each stage is a separate process (`python -m pipeline.runner spec.json`, or `accelerate launch` for several GPUs), so
a crash or an out-of-memory error in a stage does not take the flow down, GPU memory is freed between stages, and
single- and multi-GPU runs share one code path. The child dies with its parent (PR_SET_PDEATHSIG), so killing
`r1flow` never leaves an orphaned trainer writing into the work directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from pipeline import artifacts
from pipeline.plan import PROJECT_ROOT, Stage
from stages.shared.data import write_json
from stages.shared.errors import UserError

RESULT_FILE = "_stage_result.json"
USER_ERROR_FILE = "user_error.txt"
# Progress events from the stage process to the flow: JSON lines appended to this file, whose path the stage finds in
# the environment variable (stages/shared/progress.py writes them; pipeline/flow.py follows them).
EVENTS_FILE = "events.jsonl"
EVENTS_ENV = "R1FLOW_EVENTS"
RUN_NAME_ENV = "R1FLOW_RUN_NAME"  # the trackers' run name (stages/shared/trainers.py): one per stage version


RUNNER_FILES = {"stage.log", "spec.json", ".lock", EVENTS_FILE, USER_ERROR_FILE}  # what drop_resume_state keeps


def events_path(work_root: str, stage: Stage) -> Path:
    return Path(work_root) / stage.name / stage.version / EVENTS_FILE


def launch_command(hardware: dict, spec_path: str) -> list[str]:
    """The command that runs a stage: plain python, or `accelerate launch` over all local GPUs (and nodes).

    hardware.launcher=accelerate launches the stages whose module is in hardware.distributed_modules (the trainers;
    all stages when the list is absent) as num_processes x num_machines processes, FSDP when hardware.fsdp is set. The
    others (evaluation, rejection sampling, report) stay one process: their vLLM engine spreads over the GPUs itself
    (tensor or data parallel), and N copies of them would each write the whole artifact.
    Multi-node (num_machines > 1): with hardware.node_launcher=srun (inside a Slurm allocation) the command is an
    `srun` over the nodes that starts one accelerate launcher per node; otherwise the accelerate command itself, with
    MACHINE_RANK, MAIN_PROCESS_IP and MAIN_PROCESS_PORT from the environment (README "Several nodes").
    """
    module = _spec_module(spec_path)
    if hardware.get("launcher", "python") == "python" or not _distributed(hardware, module):
        return [sys.executable, "-m", "pipeline.runner", spec_path]
    per_node = hardware.get("num_processes", "auto")
    if per_node in ("auto", None):
        import torch

        per_node = max(torch.cuda.device_count(), 1)
    machines = int(hardware.get("num_machines") or 1)
    if int(per_node) * machines == 1:  # one GPU in all: the plain process (no FSDP over a single shard)
        return [sys.executable, "-m", "pipeline.runner", spec_path]
    # accelerate's --num_processes is the total over all machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(int(per_node) * machines),
           "--num_machines", str(machines), "--mixed_precision", "bf16" if hardware.get("bf16") else "no",
           "--dynamo_backend", "no"]
    if hardware.get("fsdp"):
        version = int(hardware.get("fsdp_version") or 2)
        cmd += ["--use_fsdp", "--fsdp_version", str(version), "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_state_dict_type", "FULL_STATE_DICT",
                # accelerate's default (true) has transformers load real weights on the first process only and leave
                # the others empty; accelerate's prepare then broadcasts the policy, but not the models a stage or
                # TRL loads beside it: GRPO's reference (KL 0.78 at step 1 on 2 GPUs, where it is 0) and the reward
                # models of the alignment RL. Every process loads the checkpoint (CPU memory: processes x model)
                "--fsdp_cpu_ram_efficient_loading", "false"]
        cmd += ["--fsdp_reshard_after_forward", "true"] if version == 2 else ["--fsdp_sharding_strategy", "FULL_SHARD"]
    else:
        cmd += ["--multi_gpu"] if int(per_node) * machines > 1 else []
    if machines > 1:  # a node that never joins fails the rendezvous after this long instead of torch's 600 s
        cmd += ["--rdzv_conf", f"timeout={int(hardware['distributed_timeout_s'])}"]
    tail = ["-m", "pipeline.runner", spec_path]
    port = os.environ.get("MAIN_PROCESS_PORT", "29500")
    if machines > 1 and hardware.get("node_launcher") == "srun":
        # Inside a Slurm allocation: one accelerate launcher per node through srun, node rank from SLURM_NODEID, the
        # first node of the allocation (where the flow runs, so global rank 0 writes the result it waits for) as host.
        ip = os.environ.get("MAIN_PROCESS_IP")
        host = shlex.quote(ip) if ip else '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"'
        inner = (f'{shlex.join(cmd)} --machine_rank "$SLURM_NODEID" --main_process_ip {host} '
                 f'--main_process_port {shlex.quote(port)} {shlex.join(tail)}')
        return ["srun", f"--nodes={machines}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", inner]
    if machines > 1:  # the same command on every node, rank and rendezvous from the environment
        cmd += ["--machine_rank", os.environ.get("MACHINE_RANK", "0"), "--main_process_ip",
                os.environ.get("MAIN_PROCESS_IP", "127.0.0.1"), "--main_process_port", port]
    return cmd + tail


def _spec_module(spec_path: str) -> str | None:
    try:
        return json.loads(Path(spec_path).read_text()).get("module")
    except (OSError, ValueError):
        return None


def _distributed(hardware: dict, module: str | None) -> bool:
    modules = hardware.get("distributed_modules")
    return modules is None or module is None or module in modules


def stage_env(hardware: dict) -> dict[str, str]:
    env = dict(os.environ)
    # R1FLOW_TORCH_THREADS forces torch's threads in the stage (stages.shared.hardware.pick_threads); the OpenMP pool,
    # which vLLM on a CPU and the tokenizers use, follows it
    threads = env.get("R1FLOW_TORCH_THREADS") or str(hardware.get("torch_threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"))
    vllm = hardware.get("vllm") or {}
    if vllm.get("cpu_kvcache_space_gib"):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vllm["cpu_kvcache_space_gib"]))
    if vllm.get("cpu_omp_threads_bind"):
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(vllm["cpu_omp_threads_bind"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# Failures a user can act on, recognised in a stage's output (any process, any node's line that reaches it). Ordered
# by precedence: a worker killed for memory makes the other workers report a lost peer, so memory outranks the peer.
FAILURE_PATTERNS = [
    # torch.save on a full disk: "[enforce fail at inline_container.cc:...] . unexpected pos N vs M" and "basic_ios::
    # clear: iostream error" (no errno in its message; seen when a reward model's optimizer state filled the disk)
    ("disk", re.compile(r"No space left on device|\[Errno 28\]|ENOSPC|inline_container\.cc:\d+\] \. unexpected pos|"
                        r"basic_ios::clear: iostream error")),
    # vLLM's engine start (vLLM 0.25's messages): it needs gpu_memory_utilization x the GPU's memory free, counting
    # the trainer's tensors beside a colocated engine as used; then its KV cache must fit in that share. The two call
    # for opposite changes of the same key, so neither is read as plain memory
    ("vllm_start", re.compile(r"on startup is less than desired GPU memory utilization")),
    ("vllm_kv_cache", re.compile(r"No available memory for the cache blocks|larger than the available KV cache "
                                 r"memory")),
    ("memory", re.compile(r"CUDA out of memory|OutOfMemoryError|can't allocate memory|Cannot allocate memory|"
                          r"\bMemoryError\b")),
    ("sigkill", re.compile(r"Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9\b")),
    ("peer", re.compile(r"Connection (reset|closed) by peer|DistNetworkError|DistStoreError|Rendezvous\w*Error|"
                        r"Timed out waiting \d+ms|collective operation timeout|NCCL (error|timeout)")),
]
MEMORY_ADVICE = ("lower what one step holds: per_device_train_batch_size, or prompts_per_step x num_generations for "
                 "GRPO (raise gradient_accumulation_steps to keep the batch), max_length / max_completion_length; "
                 "hardware.gradient_checkpointing=true; for vLLM hardware.vllm.gpu_memory_utilization (GPU) or "
                 "cpu_kvcache_space_gib (CPU); or run on a machine with more memory")


def oom_kills() -> dict[str, int]:
    """The kernel's OOM-kill counters that can concern this process and its children: its memory cgroup's (v2
    memory.events, v1 memory.oom_control; where the container shows its own cgroup as the root, that one) and the
    machine's (/proc/vmstat). Compared before and after a stage, a rise says the OOM killer ran meanwhile."""
    paths = ["/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control", "/proc/vmstat"]
    try:
        for entry in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = entry.split(":", 2)
            if controllers == "":
                paths.append(f"/sys/fs/cgroup{path}/memory.events")
            elif "memory" in controllers.split(","):
                paths.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
    except (OSError, ValueError):
        pass
    counts = {}
    for path in dict.fromkeys(paths):
        try:
            for entry in Path(path).read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill":
                    counts[path] = int(value)
        except (OSError, ValueError):
            continue
    return counts


def failure_message(label: str, code: int, causes: dict[str, str], oom_before: dict[str, int], hardware: dict,
                    dirs: list[Path]) -> str:
    """Why stage `label` failed and what to change, from its exit code, the causes seen in its output and the
    OOM-kill counters before it started; the bare exit code where nothing is recognised."""
    after = oom_kills()
    oom = [f"{path}: oom_kill {oom_before[path]} -> {n}" for path, n in after.items()
           if path in oom_before and n > oom_before[path]]
    if "disk" in causes:
        free = "; ".join(f"{d}: {shutil.disk_usage(d).free / 2**20:,.0f} MiB free" for d in dirs if d.exists())
        return (f"stage {label} ran out of disk space (ENOSPC: {causes['disk']}). Free space there ({free}), or point "
                f"work_root (checkpoints) or artifacts_root / R1FLOW_CACHE (artifacts) at a larger disk. Nothing was "
                f"published; a rerun resumes from the last complete checkpoint")
    share = f"hardware.vllm.gpu_memory_utilization={(hardware.get('vllm') or {}).get('gpu_memory_utilization')}"
    if "vllm_start" in causes:
        return (f"stage {label}: vLLM's engine did not start ({causes['vllm_start']}). It needs {share} of the GPU "
                f"free when it starts: lower that share below the free part the message shows, or free the GPU "
                f"(another process on it; in the RL stages the trainer's policy and reward models are already there)")
    if "vllm_kv_cache" in causes:
        return (f"stage {label}: vLLM's KV cache does not fit its share of the GPU ({causes['vllm_kv_cache']}): raise "
                f"{share} where the GPU has room, or generate shorter sequences (the stage's max_completion_length "
                f"or max_tokens)")
    if "memory" in causes:
        return f"stage {label} ran out of memory ({causes['memory']}): {MEMORY_ADVICE}"
    if code == -signal.SIGKILL or "sigkill" in causes:
        if oom:
            return f"stage {label} was killed by the kernel's OOM killer ({', '.join(oom)}): {MEMORY_ADVICE}"
        return (f"stage {label} was killed by SIGKILL (often the OOM killer, or a scheduler's memory limit; no OOM "
                f"kill was counted where this process can see it). If memory: {MEMORY_ADVICE}. A rerun resumes from "
                f"the last complete checkpoint")
    if "peer" in causes:
        machines = int(hardware.get("num_machines") or 1)
        where = f"the other nodes of its {machines}-node launch" if machines > 1 else "its other processes"
        return (f"stage {label} lost contact with {where} ({causes['peer']}): a process or node stopped, crashed or "
                f"did not join within hardware.distributed_timeout_s={hardware.get('distributed_timeout_s')} s. The "
                f"first error is in the output of the node that stopped; a rerun resumes from the last complete "
                f"checkpoint")
    if code < 0:
        return f"stage {label} was killed by signal {signal.Signals(-code).name}"
    return f"stage {label} failed (exit code {code})"


def run_stage(stage: Stage, *, root: str, work_root: str, log: Callable[[str], None] = print,
              force: bool = False) -> dict:
    """Run `stage` unless its version exists; returns {"cached": bool, "version", "metrics", "seconds"}."""
    if artifacts.exists(root, stage.name, stage.version) and not force:
        manifest = artifacts.read_manifest(root, stage.name, stage.version)
        return {"cached": True, "version": stage.version, "metrics": manifest.get("metrics", {}), "seconds": 0.0}
    if stage.pinned:
        raise UserError(f"recipe.pins asks for {stage.name}@{stage.version}, which is not in {root}; "
                        f"list versions with `r1flow artifacts ls {stage.name}`")
    # One computation of a version per store: another process sharing the root waits here, then finds it done.
    with artifacts.lease(root, stage.name, stage.version, log=log):
        if artifacts.exists(root, stage.name, stage.version) and not force:
            manifest = artifacts.read_manifest(root, stage.name, stage.version)
            return {"cached": True, "version": stage.version, "metrics": manifest["metrics"], "seconds": 0.0}
        for leftover in artifacts.clean_staging(root, stage.name, stage.version):
            log(f"removed {leftover}, left by a run of {stage.name}@{stage.version} that was killed")
        return _run_leased(stage, root=root, work_root=work_root, log=log, force=force)


def _run_leased(stage: Stage, *, root: str, work_root: str, log: Callable[[str], None], force: bool) -> dict:
    inputs = {role: str(artifacts.load(root, producer, stage.input_versions[role]))
              for role, producer in stage.inputs.items()}
    work_dir = Path(work_root) / stage.name / stage.version
    if force and work_dir.exists():
        shutil.rmtree(work_dir)  # a forced rerun starts over instead of resuming the finished training
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = open(work_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"stage {stage.name}@{stage.version} is already running (lock {work_dir / '.lock'}); "
                        f"wait for it or stop that process") from None

    staging = artifacts.staging_dir(root, stage.name, stage.version)
    hardware = stage.config.get("hardware", {})
    spec = {"name": stage.name, "module": stage.module, "config": stage.config, "inputs": inputs,
            "output_dir": str(staging), "work_dir": str(work_dir)}
    (work_dir / USER_ERROR_FILE).unlink(missing_ok=True)
    events = events_path(work_root, stage)
    events.unlink(missing_ok=True)  # this attempt's events only
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    started = datetime.now(timezone.utc).isoformat()
    t0 = time.time()
    cmd = launch_command(hardware, str(spec_path))
    log(f"running {stage.name}@{stage.version}: {shlex.join(cmd[-3:])}")
    if int(hardware.get("num_machines") or 1) > 1 and "accelerate.commands.launch" in cmd:
        # several nodes without Slurm: every other node runs this same command with its own --machine_rank
        log(f"on every other node, with its --machine_rank: {shlex.join(cmd)}")
    oom_before = oom_kills()
    env = stage_env(hardware)
    env.update({EVENTS_ENV: str(events), RUN_NAME_ENV: f"{stage.name}-{stage.version}"})
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
    tail: list[str] = []
    causes: dict[str, str] = {}  # kind of failure -> the first output line that shows it
    # every attempt's output, beside its checkpoints; unbuffered, so a full disk fails one write (and the stage's
    # output keeps streaming) instead of a close that flushes
    stage_log: int | None = os.open(work_dir / "stage.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def keep(text: str) -> None:
        nonlocal stage_log
        if stage_log is None:
            return
        try:
            os.write(stage_log, text.encode())
        except OSError as e:
            causes.setdefault("disk", f"writing {work_dir / 'stage.log'}: {e}")
            os.close(stage_log)
            stage_log = None

    keep(f"=== {started} {shlex.join(cmd)}\n")
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        for kind, pattern in FAILURE_PATTERNS:
            if kind not in causes and pattern.search(line):
                causes[kind] = line.strip()
        keep(line + "\n")
        log(line)
    if stage_log is not None:
        os.close(stage_log)
    code = proc.wait()
    result_path = Path(staging) / RESULT_FILE
    if code != 0 or not result_path.exists():
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()
        user_error = work_dir / USER_ERROR_FILE
        if code == 2 and user_error.exists():
            raise UserError(f"stage {stage.name}: {user_error.read_text()}")
        raise RuntimeError(failure_message(f"{stage.name}@{stage.version}", code, causes, oom_before, hardware,
                                           [work_dir, Path(staging).parent]) + "; last lines:\n" + "\n".join(tail[-15:]))
    result = json.loads(result_path.read_text())
    result_path.unlink()
    if force and artifacts.exists(root, stage.name, stage.version):
        artifacts.remove(root, stage.name, stage.version)
    try:
        artifacts.publish(root, stage.name, stage.version, staging, kind=stage.kind, stage=stage.module,
                          inputs={role: {"name": stage.inputs[role], "version": v}
                                  for role, v in stage.input_versions.items()},
                          config=stage.config, metrics=result["metrics"], started_at=started,
                          ended_at=datetime.now(timezone.utc).isoformat(),
                          extra={"fingerprints": stage.fingerprints, "code": stage.code,
                                 "seconds": round(time.time() - t0, 2)})
    except OSError as e:  # e.g. the manifest on a full disk: the staging directory was never renamed into place
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()
        if e.errno != errno.ENOSPC:
            raise
        raise RuntimeError(failure_message(f"{stage.name}@{stage.version}", 0, {"disk": f"publishing: {e}"},
                                           oom_before, hardware, [Path(staging).parent])) from e
    freed = drop_resume_state(work_dir)
    if freed:
        log(f"removed {freed / 2**30:.1f} GiB of resume state (checkpoints) from {work_dir}: {stage.name}@"
            f"{stage.version} is published")
    lock.close()
    return {"cached": False, "version": stage.version, "metrics": result["metrics"], "seconds": time.time() - t0}


def drop_resume_state(work_dir: Path) -> int:
    """Remove what a stage left in its work dir to resume from (trainer checkpoints: weights, optimizer state, RNG),
    keeping the runner's own files (the log of every attempt, the spec, the events); returns the bytes freed.

    Called once the artifact is published: from then on the store serves the stage and nothing resumes. Kept, two
    fp32 checkpoints with AdamW state are 36 GB per stage at 1.5B parameters and 180 GB at 7.6B; the paper preset's
    recipe on one GPU filled a 64 GB disk by its fifth stage (benchmarks/README.md, sixth lease)."""
    freed = 0
    for path in work_dir.iterdir():
        if path.name in RUNNER_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path, ignore_errors=True)
        else:
            freed += path.lstat().st_size
            path.unlink(missing_ok=True)
    return freed


def main(spec_path: str) -> int:
    """Child side: import the stage module and call its run()."""
    spec = json.loads(Path(spec_path).read_text())
    config = spec["config"]
    import torch
    from omegaconf import OmegaConf

    # the stages log (logging, not print): plain lines on stdout, which the runner tees into stage.log and Prefect
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        # a worker of a launcher (torchrun) dies with it: killing a node's launcher stops that node's processes
        # instead of leaving them in the collectives with the other nodes
        _die_with_parent()
    if local_rank is not None and torch.cuda.is_available():
        # under accelerate launch: this process's GPU, so that "cuda" (models loaded before the trainer exists,
        # reward models, generation) means it rather than GPU 0 in every process
        torch.cuda.set_device(int(local_rank))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several processes: every wait for the others (each collective) ends after distributed_timeout_s,
        # so a node that dies or hangs fails the stage instead of hanging it; accelerate and the trainers reuse
        # this process group (PartialState is shared), so it is set up before anything else asks for it
        from accelerate import PartialState

        PartialState(timeout=timedelta(seconds=int(config["hardware"]["distributed_timeout_s"])))
    # `module` names a file in stages/; a dotted path (tests) is imported as given.
    module_name = spec["module"] if "." in spec["module"] else f"stages.{spec['module']}"
    module = importlib.import_module(module_name)
    output_dir, work_dir = Path(spec["output_dir"]), Path(spec["work_dir"])
    try:
        metrics = module.run(OmegaConf.create(config), {k: Path(v) for k, v in spec["inputs"].items()},
                             output_dir, work_dir)
    except UserError as e:
        print(f"error: {e}", flush=True)
        (work_dir / USER_ERROR_FILE).write_text(str(e))
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate only the main process reports
        write_json(output_dir / RESULT_FILE, {"metrics": metrics or {}})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
