"""Where and how a stage computes: device, precision, threads, seeds, FSDP, and the TRL arguments that follow from the
`hardware` config node (conf/hardware/*.yaml). The attention kernels and compilation live in attention.py.

- `setup(cfg)`: torch threads, seeds, cuDNN attention off: first thing in every stage that trains or generates.
- `on_cpu(hardware)`: the one "is this a CPU run" test.
- `model_dtype(hardware)`: the dtype weights that train load in (fp32 master weights by default on GPUs).
- `world_size()`, `is_main_process()`: accelerate's view of the launched processes.
- `hardware_args(hardware)`: TrainingArguments fields (bf16, optimizer, workers, FSDP).
- `release_memory()`: garbage and the CUDA allocator's cache back to the driver, before vLLM sizes an engine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

import torch

from stages.shared.errors import UserError

log = logging.getLogger(__name__)


def setup(cfg: Mapping) -> None:
    """Threads, seeds and quiet progress bars, for runs inside the runner's subprocess and in-process calls alike."""
    hardware = cfg["hardware"]
    threads = pick_threads(int(hardware["torch_threads"]), on_cpu(hardware))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    from stages.shared import attention

    attention.configure_attention(hardware)  # GPU: no cuDNN attention (NaN gradients on padded batches: attention.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()  # map() bars are carriage-return noise in a line-by-line log
    except ImportError:  # pragma: no cover
        pass
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # "Loading weights" bars: carriage-return noise too, where no terminal draws them
        hf_logging.disable_progress_bar()
    set_seed(int(cfg["seed"]))  # python, numpy, torch (and CUDA) in one place


def release_memory() -> None:
    """Collect Python garbage, then hand the CUDA allocator's cached blocks back to the driver.

    A finished trainer's model sits in reference cycles until the collector runs (a 7B's fp32 shards under FSDP: 7.6 GB
    per GPU on 4), and the blocks PyTorch caches count as used for vLLM, which sizes a colocated engine from the
    driver's free memory and refuses to start below gpu_memory_utilization x total. In the eleventh lease the 7B
    alignment RL started its engine beside 56 GB per GPU of the trainer's (benchmarks/README.md): more than an 80 GB
    GPU leaves for the engine's 40 GB."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def reset_peak_gpu_memory() -> None:
    """Start this process's peak-memory counters afresh (a trainer's own peak, not its stage's loading)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_memory(*, over_processes: bool = False) -> dict[str, float]:
    """This process's peak CUDA memory since the last reset, in GiB: `allocated` (live tensors: what must fit) and
    `reserved` (plus the allocator's cached blocks, which nvidia-smi counts too, and which a full GPU hands back before
    it fails an allocation). {} without CUDA. `over_processes`: the largest over all processes, a collective that
    every process must call. nvidia-smi alone could not say whether the 7B alignment RL fits an 80 GB GPU (twelfth
    lease, benchmarks/README.md)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    peaks = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
    dist = torch.distributed
    if over_processes and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor(peaks, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        peaks = most.tolist()
    return {"allocated": peaks[0] / 2 ** 30, "reserved": peaks[1] / 2 ** 30}


def pick_threads(configured: int, cpu: bool) -> int:
    """torch intra-op threads: hardware.torch_threads, lowered on a CPU machine that other processes keep busy.

    Measured on the shared 2-core machine (1.1M-param Qwen3, pre-training step): alone, 2 threads 0.29 s/step against
    0.52 for 1; with one other busy process, 2 threads took 1.08 s/step against 0.56 s/step for 1 (STACK-NOTES saw
    10-50x on small steps), because both threads wait for the slower core at every op. So when other processes keep
    cores busy *now*, use only the free ones (at least 1). "Now" is a 0.3 s sample of /proc/stat, not the load average:
    the 1-minute average still counts the previous stage of the same pipeline for a minute after it ended.
    R1FLOW_TORCH_THREADS forces a number.
    """
    forced = os.environ.get("R1FLOW_TORCH_THREADS")
    if forced:
        return max(1, int(forced))
    if not cpu or configured <= 1:
        return max(1, configured)
    busy = busy_cores()
    free = (os.cpu_count() or configured) - int(busy + 0.5)
    threads = max(1, min(configured, free))
    if threads != configured:
        log.info(f"torch threads: {threads} instead of hardware.torch_threads={configured} ({busy:.1f} of "
              f"{os.cpu_count()} cores busy; R1FLOW_TORCH_THREADS overrides)")
    return threads


def busy_cores(interval: float = 0.3) -> float:
    """How many cores are busy now: a CPU-time sample over `interval` seconds (psutil), not the load average."""
    import psutil

    return psutil.cpu_percent(interval=interval) / 100 * (psutil.cpu_count() or 1)


def on_cpu(hardware: Mapping) -> bool:
    """The one test for "this stage computes on the CPU": the config says so, or there is no GPU."""
    return str(hardware["device"]).startswith("cpu") or not torch.cuda.is_available()


def model_dtype(hardware: Mapping) -> str:
    """The dtype the weights of a model that trains are loaded in (reward models that only score: bf16 on a GPU).

    fp32 on CPU. On a GPU `hardware.weights_dtype` (default float32): fp32 master weights and optimizer state, with the
    forward and backward in bf16 under autocast (`hardware.bf16`), i.e. standard mixed precision. `bfloat16` keeps the
    weights themselves in bf16 (half the memory), but then AdamW adds each update to a bf16 weight, which rounds away
    every update smaller than 2^-8 of the weight: at RL learning rates (1e-6..5e-5) most weights never move
    (tests/pipeline/test_hardware.py). Under FSDP accelerate keeps fp32 master weights itself (it upcasts). Without
    FSDP, SFT stages move the loaded fp32 weights into the optimizer and train the model on bf16 copies
    (`hardware.master_weights`, stages/shared/precision.py).
    """
    if on_cpu(hardware):
        return "float32"
    dtype = str(hardware["weights_dtype"])
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"hardware.weights_dtype={dtype!r}: use float32 (mixed precision) or bfloat16 (pure bf16)")
    return dtype


def world_size() -> int:
    """Processes of this stage (several under `accelerate launch`; 1 for a plain `python -m pipeline.runner`)."""
    from accelerate import PartialState

    return PartialState().num_processes


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def fsdp_args(hardware: Mapping) -> dict:
    """TrainingArguments fields for FSDP from `hardware.fsdp` ("full_shard auto_wrap", "shard_grad_op", + "offload")
    and `hardware.fsdp_version`: an explicit fsdp_config, so the version is the one the launcher was given
    (transformers 5 otherwise picks FSDP2 whatever accelerate launch said). Each decoder layer is its own FSDP unit;
    the final model is gathered whole on the main process (save_model); trainer checkpoints hold the full state."""
    opts = str(hardware["fsdp"]).replace(",", " ").split()
    version = int(hardware["fsdp_version"])
    strategies = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
    strategy = next((o for o in opts if o in strategies), "full_shard")
    if version == 2 and strategy not in ("full_shard", "shard_grad_op"):
        raise UserError(f"hardware.fsdp={hardware['fsdp']!r}: FSDP2 shards as full_shard or shard_grad_op; "
                        f"{strategy} needs hardware.fsdp_version=1")
    config = {"version": version, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
              "reshard_after_forward": (strategy == "full_shard") if version == 2 else strategy}
    if "offload" in opts:
        config["cpu_offload"] = True
    return {"fsdp": True, "fsdp_config": config}


def hardware_args(hardware: Mapping) -> dict:
    """TrainingArguments fields that follow from the `hardware` node."""
    cpu = on_cpu(hardware)
    args = dict(
        bf16=bool(hardware["bf16"]) and not cpu,
        fp16=False,
        use_cpu=cpu,
        optim=str(hardware["optim"]),
        gradient_checkpointing=bool(hardware["gradient_checkpointing"]),
        dataloader_pin_memory=not cpu,
        dataloader_num_workers=0 if cpu else int(hardware["dataloader_workers"]),
    )
    if hardware["liger_kernels"] and not cpu:  # sft() turns it off where it compiles the layers instead
        from stages.shared import attention

        if attention.liger_available():
            args["use_liger_kernel"] = True
        else:
            log.warning("hardware.liger_kernels=true but liger-kernel is not installed: training without it")
    if hardware["fsdp"] and world_size() > 1:  # FSDP only where the launcher started several processes
        args.update(fsdp_args(hardware))
    return args
