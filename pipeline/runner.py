"""Run one stage in its own process and publish what it wrote as a versioned artifact.

Each stage is a separate process (`python -m pipeline.runner spec.json`, or `accelerate launch` for several GPUs), so
a crash or an out-of-memory error in a stage does not take the flow down, GPU memory is freed between stages, and
single- and multi-GPU runs share one code path. The child dies with its parent (PR_SET_PDEATHSIG), so killing
`r1flow` never leaves an orphaned trainer writing into the work directory.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
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
                "--fsdp_state_dict_type", "FULL_STATE_DICT"]
        cmd += ["--fsdp_reshard_after_forward", "true"] if version == 2 else ["--fsdp_sharding_strategy", "FULL_SHARD"]
    else:
        cmd += ["--multi_gpu"] if int(per_node) * machines > 1 else []
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
    threads = str(hardware.get("torch_threads", 1))
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
    env = stage_env(hardware)
    env.update({EVENTS_ENV: str(events), RUN_NAME_ENV: f"{stage.name}-{stage.version}"})
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
    tail: list[str] = []
    with open(work_dir / "stage.log", "a") as stage_log:  # every attempt's output, beside its checkpoints
        stage_log.write(f"=== {started} {shlex.join(cmd)}\n")
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            stage_log.write(line + "\n")
            stage_log.flush()
            log(line)
    code = proc.wait()
    result_path = Path(staging) / RESULT_FILE
    if code != 0 or not result_path.exists():
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()
        user_error = work_dir / USER_ERROR_FILE
        if code == 2 and user_error.exists():
            raise UserError(f"stage {stage.name}: {user_error.read_text()}")
        raise RuntimeError(f"stage {stage.name}@{stage.version} failed (exit code {code}); last lines:\n"
                           + "\n".join(tail[-15:]))
    result = json.loads(result_path.read_text())
    result_path.unlink()
    if force and artifacts.exists(root, stage.name, stage.version):
        artifacts.remove(root, stage.name, stage.version)
    artifacts.publish(root, stage.name, stage.version, staging, kind=stage.kind, stage=stage.module,
                      inputs={role: {"name": stage.inputs[role], "version": v}
                              for role, v in stage.input_versions.items()},
                      config=stage.config, metrics=result["metrics"], started_at=started,
                      ended_at=datetime.now(timezone.utc).isoformat(),
                      extra={"fingerprints": stage.fingerprints, "code": stage.code,
                             "seconds": round(time.time() - t0, 2)})
    lock.close()
    return {"cached": False, "version": stage.version, "metrics": result["metrics"], "seconds": time.time() - t0}


def main(spec_path: str) -> int:
    """Child side: import the stage module and call its run()."""
    spec = json.loads(Path(spec_path).read_text())
    config = spec["config"]
    import torch
    from omegaconf import OmegaConf

    # the stages log (logging, not print): plain lines on stdout, which the runner tees into stage.log and Prefect
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        # under accelerate launch: this process's GPU, so that "cuda" (models loaded before the trainer exists,
        # reward models, generation) means it rather than GPU 0 in every process
        torch.cuda.set_device(int(local_rank))
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
