"""Training pieces shared by every stage that trains: TRL argument building from the `hardware` node, resume from the
last complete checkpoint, a line-per-log progress callback, log history and summary metrics, a held-out accuracy
check, and the `sft()` helper (cold-start SFT, merged SFT, distillation).

What later stages reuse:

- `setup(cfg)`: torch threads and seeds from the stage config, before anything is built.
- `trainer_args(config_cls, cfg, checkpoint_dir, **fields)`: a TRL config (SFTConfig, GRPOConfig, ...) with the
  hardware settings, checkpointing into `checkpoint_dir`, progress lines instead of tqdm; `fields` win.
- `load_policy(model_dir, hardware)` -> (model, tokenizer) from an input checkpoint artifact.
- `train(trainer, checkpoint_dir)`: `trainer.train()` resuming from the last complete checkpoint; returns the step it
  resumed from (0 for a fresh start).
- `ProgressCallback`: prints `step i/N key=val ...` on every log; `HeldoutEvalCallback`: held-out accuracy every N
  steps into the log history (the RL curves' accuracy).
- `evaluate(model, tokenizer, rows, template=..., ...)` -> {accuracy, format_rate, mean_length, ...}.
- `sft(cfg, model, tokenizer, dataset, work_dir)` -> (plain model, trainer): SFTTrainer on a messages / text /
  prompt-completion dataset, LoRA optional (merged at the end), resumed after a crash.
- `finish(output_dir, model, tokenizer, trainer)`: save_pretrained + log_history.jsonl + loss/RL plots; returns the
  summary metrics of the log history.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from transformers import TrainerCallback

from stages.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LOG_HISTORY = "log_history.jsonl"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Set-up

def setup(cfg: Mapping) -> None:
    """Threads, seeds and quiet progress bars, for runs inside the runner's subprocess and in-process calls alike."""
    hardware = cfg.get("hardware") or {}
    threads = pick_threads(int(hardware.get("torch_threads") or 1), on_cpu(hardware))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    from stages import gpu

    gpu.configure_attention(hardware)  # GPU: no cuDNN attention (NaN gradients on padded batches, stages/gpu.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()  # map() bars are carriage-return noise in a line-by-line log
    except ImportError:  # pragma: no cover
        pass
    seed = int(cfg.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


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
    if busy is None:  # pragma: no cover - no /proc (macOS): trust the config
        return configured
    free = (os.cpu_count() or configured) - int(busy + 0.5)
    threads = max(1, min(configured, free))
    if threads != configured:
        print(f"torch threads: {threads} instead of hardware.torch_threads={configured} ({busy:.1f} of "
              f"{os.cpu_count()} cores busy; R1FLOW_TORCH_THREADS overrides)", flush=True)
    return threads


def busy_cores(interval: float = 0.3) -> float | None:
    """How many cores other processes keep busy, from two /proc/stat samples `interval` seconds apart."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def on_cpu(hardware: Mapping) -> bool:
    return str(hardware.get("device", "cpu")) == "cpu" or not torch.cuda.is_available()


def model_dtype(hardware: Mapping) -> str:
    """The dtype the weights of a model that trains (or scores rewards) are loaded in.

    fp32 on CPU. On a GPU `hardware.weights_dtype` (default float32): fp32 master weights and optimizer state, with the
    forward and backward in bf16 under autocast (`hardware.bf16`), i.e. standard mixed precision. `bfloat16` keeps the
    weights themselves in bf16 (half the memory), but then AdamW adds each update to a bf16 weight, which rounds away
    every update smaller than 2^-8 of the weight: at RL learning rates (1e-6..5e-5) most weights never move
    (tests/pipeline/test_hardware.py). Under FSDP accelerate keeps fp32 master weights itself (it upcasts).
    """
    if on_cpu(hardware):
        return "float32"
    dtype = str(hardware.get("weights_dtype") or "float32")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"hardware.weights_dtype={dtype!r}: use float32 (mixed precision) or bfloat16 (pure bf16)")
    return dtype


def world_size() -> int:
    """Processes of this stage (accelerate launch sets WORLD_SIZE; 1 for a plain `python -m pipeline.runner`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_args(hardware: Mapping) -> dict:
    """TrainingArguments fields for FSDP from `hardware.fsdp` ("full_shard auto_wrap", "shard_grad_op", + "offload")
    and `hardware.fsdp_version`: an explicit fsdp_config, so the version is the one the launcher was given
    (transformers 5 otherwise picks FSDP2 whatever accelerate launch said). Each decoder layer is its own FSDP unit;
    the final model is gathered whole on the main process (save_model); trainer checkpoints hold the full state."""
    opts = str(hardware.get("fsdp") or "").replace(",", " ").split()
    version = int(hardware.get("fsdp_version") or 2)
    strategies = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
    strategy = next((o for o in opts if o in strategies), "full_shard")
    if version == 2 and strategy not in ("full_shard", "shard_grad_op"):
        raise UserError(f"hardware.fsdp={hardware.get('fsdp')!r}: FSDP2 shards as full_shard or shard_grad_op; "
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
        bf16=bool(hardware.get("bf16")) and not cpu,
        fp16=False,
        use_cpu=cpu,
        optim=str(hardware.get("optim") or "adamw_torch"),
        gradient_checkpointing=bool(hardware.get("gradient_checkpointing", False)),
        dataloader_pin_memory=not cpu,
        dataloader_num_workers=0 if cpu else int(hardware.get("dataloader_workers") or 0),
    )
    if hardware.get("liger_kernels") and not cpu:  # sft() turns it off where it compiles the layers instead
        from stages import gpu

        if gpu.liger_available():
            args["use_liger_kernel"] = True
        else:
            print("hardware.liger_kernels=true but liger-kernel is not installed: training without it", flush=True)
    if hardware.get("fsdp") and world_size() > 1:  # FSDP only where the launcher started several processes
        args.update(fsdp_args(hardware))
    return args


def trainer_args(config_cls, cfg: Mapping, checkpoint_dir: str | Path, **fields) -> Any:
    """Build a TRL config (SFTConfig, GRPOConfig, ...) for one stage.

    Defaults: the hardware settings, seed, checkpoints every `save_steps` into `checkpoint_dir` (two kept; optimizer,
    scheduler and RNG included), a log every `logging_steps`, no tqdm and no external loggers (ProgressCallback prints
    lines that stream into Prefect). `fields` (the stage's own knobs) override them. Unknown fields are an error.
    """
    hardware = cfg.get("hardware") or {}
    base = dict(
        output_dir=str(checkpoint_dir),
        seed=int(cfg.get("seed", 0)),
        data_seed=int(cfg.get("seed", 0)),
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        logging_strategy="steps",
        logging_steps=int(cfg.get("logging_steps", 10)),
        save_strategy="steps",
        save_steps=int(cfg.get("save_steps", 100)),
        save_total_limit=2,
        **hardware_args(hardware),
    )
    base.update(fields)
    known = {f.name for f in dataclass_fields(config_cls)}
    if "warmup_ratio" in base and "warmup_ratio" not in known:  # transformers 5: warmup_steps < 1 is a ratio
        ratio = float(base.pop("warmup_ratio") or 0.0)
        if ratio >= 1:
            raise UserError(f"warmup_ratio={ratio} must be < 1 (a share of the training steps)")
        base.setdefault("warmup_steps", ratio)
    unknown = sorted(set(base) - known)
    if unknown:
        raise UserError(f"{config_cls.__name__} has no field(s) {unknown}; check the stage config keys")
    return config_cls(**base)


def load_policy(model_dir: str | Path, hardware: Mapping):
    """(model, tokenizer) of a checkpoint artifact (a save_pretrained dir or a recorded hub/local source)."""
    from stages import models

    source, revision = models.model_source(Path(model_dir))
    device = "cpu" if on_cpu(hardware) else "cuda"
    model = models.load_model(source, revision=revision, trust_remote_code=False, dtype=model_dtype(hardware),
                              device=device)
    tokenizer = models.load_tokenizer(source, revision=revision, trust_remote_code=False)
    from stages import gpu

    gpu.set_attention(model, hardware.get("attn_implementation"))  # sdpa_varlen: registered here, sdpa on CPU
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume

def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest *complete* checkpoint (trainer_state.json is written last) under checkpoint_dir, or None.

    A checkpoint a crash cut short is removed, so the trainer does not trip over it when it saves that step again.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for path in checkpoint_dir.iterdir():
        m = _CHECKPOINT_RE.match(path.name)
        if m and path.is_dir():
            if (path / "trainer_state.json").exists():
                found.append((int(m.group(1)), path))
            else:
                shutil.rmtree(path, ignore_errors=True)
    return str(max(found)[1]) if found else None


def train(trainer, checkpoint_dir: str | Path) -> int:
    """trainer.train(), resumed from the last complete checkpoint in checkpoint_dir (model, optimizer, scheduler, RNG,
    step). Returns the global step it resumed from (0 for a fresh start)."""
    from transformers import TrainerState

    checkpoint = last_checkpoint(checkpoint_dir)
    start = 0
    if checkpoint:
        state_file = Path(checkpoint) / "trainer_state.json"
        saved = json.loads(state_file.read_text())
        start = int(saved.get("global_step", 0))
        if saved.get("max_steps") and start >= int(saved["max_steps"]):
            # Training had finished (the crash came later, e.g. while saving the artifact): Trainer would run one
            # more step on a resume at max_steps, so load the final weights and state instead.
            print(f"training had finished at {checkpoint}; loading it", flush=True)
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(str(state_file))
            return start
        print(f"resuming from {checkpoint} (global_step {start})", flush=True)
    if getattr(trainer, "is_fsdp_enabled", False) and world_size() > 1:
        # transformers' generate keeps every process stepping until all are done (synced_gpus) only for models it
        # knows to be FSDP-managed, and accelerate's FSDP does not mark them: without it, GRPO's generation and the
        # held-out checks deadlock in the layers' all-gathers as soon as two processes stop after different lengths.
        trainer.model._is_fsdp_managed_module = True
    trainer.train(resume_from_checkpoint=checkpoint)
    return start


# ---------------------------------------------------------------------------------------------------------------------
# Progress lines and log history

# Log keys printed by ProgressCallback, in this order, with their short names. Anything else is kept in the log history.
_SHOWN = [
    ("loss", "loss"), ("mean_token_accuracy", "tok_acc"), ("reward", "reward"), ("reward_std", "reward_std"),
    ("heldout/accuracy", "heldout_acc"), ("heldout/format_rate", "heldout_fmt"), ("kl", "kl"),
    ("entropy", "entropy"), ("completions/mean_length", "len"), ("completions/clipped_ratio", "truncated"),
    ("clip_ratio/region_mean", "clipped"), ("frac_reward_zero_std", "zero_std"), ("grad_norm", "grad_norm"),
    ("learning_rate", "lr"),
]


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


class ProgressCallback(TrainerCallback):
    """One line per log: `step i/N key=val ...` (tqdm stays off, so logs stream line by line into Prefect)."""

    def __init__(self, name: str = ""):
        self.name = name
        self.t0 = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.start_step = state.global_step
        if state.is_world_process_zero:
            print(f"{self.name}: training to step {state.max_steps}"
                  + (f" (resumed at {state.global_step})" if state.global_step else ""), flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, short in _SHOWN:
            if logs.get(key) is not None:
                parts.append(f"{short}={_fmt(logs[key])}")
        for key, value in logs.items():  # per reward function: rewards/<name>/mean
            if key.startswith("rewards/") and key.endswith("/mean") and value is not None:
                parts.append(f"{key.split('/')[1]}={_fmt(value)}")
        if len(parts) > 1 and state.is_world_process_zero:  # several processes (FSDP): one line, not one each
            if self.t0 is not None and state.global_step > self.start_step:
                per_step = (time.time() - self.t0) / (state.global_step - self.start_step)
                parts.append(f"s/step={per_step:.2f}")
            print(" ".join(parts), flush=True)


class HeldoutEvalCallback(TrainerCallback):
    """Held-out accuracy every `every` steps (and at step 0), appended to the log history as heldout/* entries."""

    def __init__(self, tokenizer, rows: list[dict], *, template: str, every: int, max_new_tokens: int,
                 batch_size: int = 256):
        self.tokenizer, self.rows, self.template = tokenizer, rows, template
        self.every, self.max_new_tokens, self.batch_size = every, max_new_tokens, batch_size

    def _run(self, state, model):
        result = evaluate(model, self.tokenizer, self.rows, template=self.template,
                          max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        entry = {f"heldout/{k}": v for k, v in result.items() if k != "samples"}
        entry["step"] = state.global_step
        state.log_history.append(entry)
        if state.is_world_process_zero:
            print(f"step {state.global_step}/{state.max_steps} heldout_acc={_fmt(result['accuracy'])} "
                  f"heldout_fmt={_fmt(result['format_rate'])} heldout_len={_fmt(result['mean_length'])}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step == 0 and model is not None:
            self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and model is not None and (state.global_step % self.every == 0
                                                     or state.global_step == state.max_steps):
            self._run(state, model)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_log_history(log_history: list[dict], path: str | Path) -> None:
    with open(path, "w") as f:
        for entry in log_history:
            f.write(json.dumps({k: (v if v is None or not isinstance(v, float) or math.isfinite(v) else None)
                                for k, v in entry.items()}) + "\n")


def read_log_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if _finite(entry.get(key)) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def summarize(log_history: list[dict], keys: Iterable[str] | None = None, window: float = 0.1) -> dict:
    """first_/last_ <key> (mean over the first/last `window` share of logged points) for the logged training keys."""
    if keys is None:
        keys = sorted({k for e in log_history for k, v in e.items()
                       if _finite(v) and k not in ("step", "epoch", "total_flos", "train_runtime")
                       and not k.startswith(("train_", "eval_"))
                       and not k.endswith("_per_second")})
    out = {}
    for key in keys:
        _, values = series(log_history, key)
        if not values:
            continue
        n = max(1, int(round(len(values) * window)))
        name = key.replace("/", "_")
        out[f"first_{name}"] = sum(values[:n]) / n
        out[f"last_{name}"] = sum(values[-n:]) / n
    for entry in log_history:  # the trainer's own end-of-training summary
        for key in ("train_runtime", "train_loss"):
            if _finite(entry.get(key)):
                out[key] = float(entry[key])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Held-out accuracy

def prompt_ids(tokenizer, question: str, template: str) -> list[int]:
    """Token ids of a prompt exactly as GRPOTrainer builds them (chat template with a generation prompt for
    conversational templates, plain tokenization otherwise)."""
    from stages import templates

    prompt = templates.format_prompt(question, template)
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 256) -> list[tuple[str, int]]:
    """(decoded completion, completion length in tokens) for each prompt; greedy when temperature == 0."""
    import contextlib

    was_training = model.training
    model.eval()
    weight = next(model.parameters())
    device = weight.device
    # fp32 master weights on a GPU (hardware.weights_dtype=float32) generate in bf16, as they train: autocast
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and weight.dtype == torch.float32 \
        and torch.cuda.is_bf16_supported() else contextlib.nullcontext()
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[tuple[str, int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with amp:
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row, i in enumerate(idx):
            completion = out[row, width:].tolist()
            n = len(completion)
            for j, tok in enumerate(completion):
                if tok in eos:
                    n = j + 1
                    break
            results[i] = (tokenizer.decode(completion[:n], skip_special_tokens=True), n)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def evaluate(model, tokenizer, rows: list[dict], *, template: str, num_samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 256, keep_samples: int = 0) -> dict:
    """Held-out check on rows ({prompt, answer}): k completions per question (greedy for temperature 0).

    accuracy: share of completions whose final answer (\\boxed{} or <answer>, stages.templates.extract_answer)
    verifies against the gold answer (rewards.verify_batch) -- what the accuracy reward pays; format_rate: share the
    RL stage's format reward scores 1; strict_accuracy: both; lenient_accuracy: also counts a bare last number equal
    to the gold answer (how often a model that never learnt the format is right); mean_length: completion tokens.
    """
    from stages import rewards, templates

    prompts = [prompt_ids(tokenizer, r["prompt"], template) for r in rows for _ in range(num_samples)]
    golds = [str(r["answer"]) for r in rows for _ in range(num_samples)]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    batch_size=batch_size)
    texts = [t for t, _ in outs]
    correct = [bool(v) for v in rewards.verify_batch(list(zip(texts, golds)))]
    formatted = [v >= 1.0 for v in rewards.format_reward(texts, template=template)]
    lenient = []
    for text, gold, ok in zip(texts, golds, correct):
        if not ok and templates.extract_answer(text) is None:
            numbers = _NUMBER_RE.findall(text)
            ok = bool(numbers) and numbers[-1] == gold.strip()
        lenient.append(ok)
    n = max(1, len(texts))
    result = {
        "accuracy": sum(correct) / n,
        "format_rate": sum(formatted) / n,
        "strict_accuracy": sum(c and f for c, f in zip(correct, formatted)) / n,
        "lenient_accuracy": sum(lenient) / n,
        "mean_length": sum(length for _, length in outs) / n,
        "truncated_rate": sum(length >= max_new_tokens for _, length in outs) / n,
        "questions": len(rows),
    }
    if keep_samples:
        result["samples"] = [{"prompt": rows[i // num_samples]["prompt"], "completion": texts[i],
                              "gold": golds[i], "correct": correct[i], "formatted": formatted[i]}
                             for i in range(min(keep_samples, len(texts)))]
    return result


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def eval_rows(path, n: int, *, name: str = "eval_file") -> list[dict]:
    """The first n rows ({prompt, answer}) of the held-out split."""
    from stages import data

    rows = data.load_rows(path, ["prompt", "answer"], name)
    if n and n > 0:
        rows = rows[:n]
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def eval_metrics(prefix: str, result: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in result.items() if _finite(v)}


# ---------------------------------------------------------------------------------------------------------------------
# SFT

def lora_config(lora: Mapping | None):
    if not lora or not lora.get("enabled"):
        return None
    from peft import LoraConfig

    target = lora.get("target_modules", "all-linear")
    return LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=list(target) if not isinstance(target, str) else target, task_type="CAUSAL_LM")


SFT_KEYS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_length", "packing",
            "assistant_only_loss", "adam_epsilon", "max_grad_norm")


def sft(cfg: Mapping, model, tokenizer, dataset, work_dir: str | Path, *, name: str = "sft",
        callbacks: list | None = None, **fields):
    """Supervised fine-tuning with TRL's SFTTrainer; returns (plain model, trainer).

    `dataset` is a datasets.Dataset in one of TRL's formats: `messages` (conversational; cfg.assistant_only_loss puts
    the loss on the assistant turns, which the chat template marks with {% generation %}), `prompt`/`completion`
    (loss on the completion), or `text` (language modelling). The knobs in SFT_KEYS come from cfg, `fields` override
    them. cfg.packing turns on best-fit packing, which is padding-free (position ids restart per sequence; sdpa and
    flash attention keep the sequences apart). cfg.lora.enabled trains a LoRA adapter through peft and merges it into
    the returned model, so what is saved is a plain checkpoint. Checkpoints go to work_dir/checkpoints; a rerun
    resumes from the last one.
    """
    from trl import SFTConfig, SFTTrainer

    knobs = {k: cfg[k] for k in SFT_KEYS if k in cfg and cfg[k] is not None}
    if knobs.get("packing"):
        knobs.setdefault("packing_strategy", "bfd")
    knobs.update(fields)
    if "text" in dataset.column_names and "messages" not in dataset.column_names:
        knobs["assistant_only_loss"] = False
    ckpt = Path(work_dir) / CHECKPOINT_DIR
    # GPU (conf/hardware/gpu.yaml, stages/gpu.py): padding-free batches through varlen attention, compiled layers
    from stages import gpu

    hardware = cfg.get("hardware") or {}
    gpu.set_attention(model, hardware.get("attn_implementation"))  # models built in-stage (base) too
    collator = gpu.padding_free_collator(tokenizer) if not knobs.get("packing") and \
        gpu.use_padding_free(hardware, model) else None
    if gpu.compile_for_training(model, hardware):
        knobs["use_liger_kernel"] = False  # compiled layers fuse what Liger would (faster, measured)
    args = trainer_args(SFTConfig, cfg, ckpt, **knobs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=collator, peft_config=lora_config(cfg.get("lora")),
                         callbacks=[ProgressCallback(name), *(callbacks or [])])
    trainer.remove_callback(_printer_callback())
    try:
        trainer.resumed_from = train(trainer, ckpt)
    finally:
        gpu.uncompile(model)  # generation and saving afterwards run the plain modules
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapter into the weights
        model = model.merge_and_unload()
    return model, trainer


def _printer_callback():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback


# ---------------------------------------------------------------------------------------------------------------------
# Saving

def save_model(model, tokenizer, output_dir: str | Path) -> None:
    """A plain transformers checkpoint (safetensors) that AutoModelForCausalLM and vLLM load directly.

    Under FSDP (several processes) every process must call it: the full state dict is gathered onto the main
    process's CPU, the main process writes it, the others wait for it at a barrier."""
    output_dir = Path(output_dir)
    if fsdp_sharded(model):
        _save_sharded(model, tokenizer, output_dir)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def fsdp_sharded(model) -> bool:
    """Whether model's weights are sharded over several processes by FSDP (1: a wrapper module; 2: fully_shard)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover  (torch < 2.6)
        FSDPModule = FullyShardedDataParallel
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def _save_sharded(model, tokenizer, output_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # a collective: every process takes part; the main process receives the full tensors on its CPU, the others {}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        plain = getattr(model, "module", model)  # FSDP1: the wrapped model; FSDP2 shards the model in place
        plain.save_pretrained(output_dir, state_dict=state)
        tokenizer.save_pretrained(output_dir)
    del state
    dist.barrier()


def finish(output_dir: str | Path, model, tokenizer, trainer, *, rl: bool = False) -> dict:
    """Save model + tokenizer, log_history.jsonl and plots into output_dir; return the log history's summary.
    Under FSDP every process calls it (the weights are gathered) and the main process writes."""
    from stages import plots

    output_dir = Path(output_dir)
    save_model(model, tokenizer, output_dir)
    history = list(trainer.state.log_history)
    if is_main_process():
        write_log_history(history, output_dir / LOG_HISTORY)
        if rl:
            plots.plot_rl(history, output_dir / "rl_curves.png")
        plots.plot_loss(history, output_dir / "loss.png")
    metrics = summarize(history)
    metrics["global_step"] = int(trainer.state.global_step)
    metrics["resumed_from_step"] = int(getattr(trainer, "resumed_from", 0))
    return metrics


def clean_metrics(metrics: Mapping) -> dict:
    """Only finite numbers (and strings) go into the manifest."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif _finite(v):
            out[k] = v
        elif isinstance(v, str):
            out[k] = v
    return out


def log(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
