"""Training pieces shared by every stage that trains: TRL argument building from the `hardware` node, resume from the
last complete checkpoint, a line-per-log progress callback, log history and summary metrics, a held-out accuracy
check, and the `sft()` helper (cold-start SFT, merged SFT, distillation).

What later stages reuse:

- `setup(cfg)`: torch threads and seeds from the stage config, before anything is built.
- `trainer_args(config_cls, cfg, checkpoint_dir, **fields)`: a TRL config (SFTConfig, GRPOConfig, ...) with the
  hardware settings, checkpointing into `checkpoint_dir`, the trackers of `hardware.report_to` (run.report_to),
  a tqdm bar on a terminal and progress lines otherwise; `fields` win.
- `load_policy(model_dir, hardware)` -> (model, tokenizer) from an input checkpoint artifact.
- `train(trainer, checkpoint_dir)`: `trainer.train()` resuming from the last complete checkpoint; returns the step it
  resumed from (0 for a fresh start). The last step's checkpoint holds the weights only (FinalCheckpointCallback).
- `ProgressCallback`: logs `step i/N key=val ...` on every log and reports progress and metrics as events for the
  orchestrator (stages/shared/progress.py); `HeldoutEvalCallback`: held-out accuracy every N
  steps into the log history (the RL curves' accuracy).
- `evaluate(model, tokenizer, rows, template=..., ...)` -> {accuracy, format_rate, mean_length, ...}.
- `sft(cfg, model, tokenizer, dataset, work_dir)` -> (plain model, trainer): SFTTrainer on a messages / text /
  prompt-completion dataset, LoRA optional (merged at the end), resumed after a crash.
- `finish(output_dir, model, tokenizer, trainer)`: save_pretrained + log_history.jsonl + loss/RL plots + TensorBoard
  event files; returns the summary metrics of the log history.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

from stages.shared import logs, precision, progress
from stages.shared.errors import UserError
from stages.shared.hardware import (hardware_args, is_main_process, model_dtype, on_cpu, peak_gpu_memory,
                                    release_memory, reset_peak_gpu_memory, world_size)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
TENSORBOARD_DIR = "tensorboard"  # in a training artifact: the event files of its run
# The runner names each stage version's tracker run (`<stage>-<version>`), so a resumed attempt continues one run.
RUN_NAME_ENV = "R1FLOW_RUN_NAME"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# Stage keys that share a name with a TrainingArguments field but mean something of ours: never passed through.
NOT_TRL = frozenset({"hardware", "eval_steps"})


def trl_fields(config_cls, cfg: Mapping) -> dict:
    """The keys of a stage's config node that are fields of `config_cls` (SFTConfig, GRPOConfig, RewardConfig): they
    pass through to TRL under their own names, so a TRL knob is added to conf/ (and stages/shared/schema.py) only."""
    known = {f.name for f in dataclass_fields(config_cls)}
    return {k: v for k, v in cfg.items() if k in known and k not in NOT_TRL}


def trainer_args(config_cls, cfg: Mapping, checkpoint_dir: str | Path, **fields) -> Any:
    """Build a TRL config (SFTConfig, GRPOConfig, ...) for one stage.

    From cfg: every key that is a field of config_cls (trl_fields) and the hardware settings; ours: checkpoints into
    `checkpoint_dir` (the last one kept; optimizer, scheduler and RNG included), NaN losses logged as NaN, the
    trackers of hardware.report_to (run.report_to; TensorBoard writes under checkpoint_dir/runs/, which `finish` copies
    into the artifact), tqdm's bar only on a terminal (ProgressCallback logs lines that stream into Prefect). `fields`
    (what a stage derives) override them. Unknown fields are an error.
    """
    base = dict(
        output_dir=str(checkpoint_dir),
        data_seed=int(cfg["seed"]),
        report_to=trackers(cfg["hardware"]["report_to"]),
        run_name=os.environ.get(RUN_NAME_ENV),
        disable_tqdm=not sys.stderr.isatty(),
        log_level="warning",
        logging_strategy="steps",
        save_strategy="steps",
        # the last checkpoint only: the trainer deletes the older one after the new one is complete, so a crash while
        # saving still leaves one to resume from, and the disk holds two at a time, not three (a 7B one is 114 GiB)
        save_total_limit=1,
        # a NaN or inf loss is logged as such; transformers' filter logs the mean of the earlier steps instead (0.0 on
        # a first step), and its check is a host sync on every micro-step (benchmarks/README.md, SFT MFU)
        logging_nan_inf_filter=False,
        **hardware_args(cfg["hardware"]),
        **trl_fields(config_cls, cfg),
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


def trackers(report_to) -> str | list[str]:
    """run.report_to (one name or a list) as TRL's report_to; UserError for a tracker it does not know."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"run.report_to={report_to!r}: {unknown} unknown; use {', '.join(TRACKERS)} or a list of them")
    names = [n for n in names if n != "none"]
    return names or "none"


def load_policy(model_dir: str | Path, hardware: Mapping):
    """(model, tokenizer) of a checkpoint artifact (a save_pretrained dir or a recorded hub/local source)."""
    from stages.shared import models

    source, revision = models.model_source(Path(model_dir))
    device = "cpu" if on_cpu(hardware) else "cuda"
    model = models.load_model(source, revision=revision, trust_remote_code=False, dtype=model_dtype(hardware),
                              device=device)
    tokenizer = models.load_tokenizer(source, revision=revision, trust_remote_code=False)
    from stages.shared import attention

    attention.set_attention(model, hardware["attn_implementation"])  # sdpa_varlen: registered here, sdpa on CPU
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
    step; for GRPO with sync_ref_model also the reference model). Returns the global step it resumed from (0 for a
    fresh start)."""
    from transformers import TrainerState

    reference = getattr(trainer, "ref_model", None) if getattr(trainer.args, "sync_ref_model", False) else None
    if reference is not None:
        trainer.add_callback(ReferenceCheckpointCallback(reference))  # after TRL's SyncRefModelCallback: saves the
        # reference as that step's sync left it
    trainer.add_callback(FinalCheckpointCallback())
    checkpoint = last_checkpoint(checkpoint_dir)
    start = 0
    if checkpoint:
        state_file = Path(checkpoint) / "trainer_state.json"
        saved = json.loads(state_file.read_text())
        start = int(saved.get("global_step", 0))
        if saved.get("max_steps") and start >= int(saved["max_steps"]):
            # Training had finished (the crash came later, e.g. while saving the artifact): Trainer would run one
            # more step on a resume at max_steps, so load the final weights and state instead.
            log.info("training had finished at %s; loading it", checkpoint)
            precision.restore_master_weights(trainer.model)  # fp32, as that checkpoint holds them
            if getattr(trainer, "is_fsdp_enabled", False):  # the model is not wrapped yet: train() would do it
                load_final_weights(trainer.model, Path(checkpoint))
            else:
                trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(str(state_file))
            trainer.resumed_from = start
            return start
        log.info("resuming from %s (global_step %d)", checkpoint, start)
        if reference is not None:
            load_reference(reference, Path(checkpoint), trainer.args.ref_model_sync_steps)
    if getattr(trainer, "is_fsdp_enabled", False) and world_size() > 1:
        # transformers' generate keeps every process stepping until all are done (synced_gpus) only for models it
        # knows to be FSDP-managed, and accelerate's FSDP does not mark them: without it, GRPO's generation and the
        # held-out checks deadlock in the layers' all-gathers as soon as two processes stop after different lengths.
        trainer.model._is_fsdp_managed_module = True
    trainer.resumed_from = start
    if is_main_process():
        check_checkpoint_space(trainer, checkpoint_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    return start


def load_final_weights(model, checkpoint: Path) -> None:
    """The weights of a finished run's last checkpoint (FinalCheckpointCallback: weights only) into the model of a
    trainer under FSDP, whole or already sharded. transformers' loader reads FSDP's own copy of the weights
    (pytorch_model_fsdp.bin) there, which it writes only together with the optimizer state, so it cannot load such a
    checkpoint. Every process reads the saved full state dict (a sharded model keeps its shard). A tied LM head is
    saved once, under the embedding's name, and is the embedding here."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no model*.safetensors to load the finished run's weights from")
    state = {}
    for f in files:
        state.update(load_file(f))
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    tied = set(getattr(model, "all_tied_weights_keys", getattr(model, "_tied_weights_keys", None)) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{checkpoint}: the saved weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")


def checkpoint_bytes(trainer) -> int:
    """What one trainer checkpoint of this model takes on disk: the trained weights in their dtype, AdamW's two
    states per trained parameter, and GRPO's reference when it is saved with the checkpoint (sync_ref_model). Under
    FSDP the weights are there twice: transformers saves the model (model.safetensors) and then, with the optimizer,
    FSDP's own copy of it to resume from (pytorch_model_fsdp.bin), each gathered whole."""
    model = trainer.model
    trained = [p for p in model.parameters() if p.requires_grad]
    peft = hasattr(model, "peft_config")  # an adapter checkpoint holds the adapter's weights only
    weights = sum(p.numel() * p.element_size() for p in (trained if peft else model.parameters()))
    masters = precision.master_weights(model)  # hardware.master_weights=optimizer: fp32 masters + fp32 AdamW state
    adam = sum(p.numel() * (12 if p in masters else 2 * p.element_size()) for p in trained)
    reference = getattr(trainer, "ref_model", None) if getattr(trainer.args, "sync_ref_model", False) else None
    ref = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    fsdp_copy = weights if getattr(trainer, "is_fsdp_enabled", False) else 0
    return weights + adam + ref + fsdp_copy


def check_checkpoint_space(trainer, checkpoint_dir: str | Path) -> None:
    """Refuse to start training where not even one checkpoint fits the disk, and warn where the ones the trainer keeps
    do not (save_total_limit, plus the one it writes before dropping the oldest): otherwise the stage fails at its
    first save, after minutes or hours of training (the paper preset's recipe did, on a lent 64 GB disk)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    one = checkpoint_bytes(trainer)
    free = shutil.disk_usage(checkpoint_dir).free
    kept = int(trainer.args.save_total_limit or 1) + 1
    gb = 2**30
    parts = "weights, AdamW state" + (", reference" if getattr(trainer.args, "sync_ref_model", False) else "")
    sizes = f"one checkpoint of this model ({parts}) is {one / gb:.1f} GiB"
    fix = ("free space there, or point work_root (where checkpoints go) at a larger disk, e.g. "
           "`python -m pipeline.cli run work_root=/scratch/r1flow-work`")
    if free < one:
        raise UserError(f"{checkpoint_dir}: {free / gb:.1f} GiB free, but {sizes}: the first save would fail; {fix}")
    if free < kept * one:
        log.warning(f"{checkpoint_dir}: {free / gb:.1f} GiB free; {sizes} and the trainer holds up to {kept} at a "
                    f"time while saving ({kept * one / gb:.1f} GiB): a later save may fail; {fix}")


# ---------------------------------------------------------------------------------------------------------------------
# GRPO's reference model across a resume

REFERENCE_FILE = "reference_model.pt"


class ReferenceCheckpointCallback(TrainerCallback):
    """Writes GRPO's reference model into each trainer checkpoint; train() loads it back on a resume.

    With sync_ref_model, TRL's SyncRefModelCallback moves the reference towards the policy every ref_model_sync_steps,
    but a trainer checkpoint holds only the policy, optimizer, scheduler and RNG: a resumed GRPOTrainer builds its
    reference from the initial model again and measures the KL against that until the next sync (up to 399 steps
    with R1's reset every 400). The weights are saved rather than rebuilt from the step of the last sync because the
    policy of that step is gone by then (one checkpoint is kept) and ref_model_mixup_alpha < 1 makes the reference
    a running mix of many policies. Written at the end of a step that saves, after that step's sync and before the
    trainer writes the checkpoint (whose trainer_state.json, written last, marks it complete)."""

    def __init__(self, ref_model):
        self.ref_model = ref_model

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.global_step < state.max_steps:  # the last one: FinalCheckpointCallback
            save_reference(self.ref_model, Path(args.output_dir) / f"checkpoint-{state.global_step}")


class FinalCheckpointCallback(TrainerCallback):
    """The checkpoint that transformers writes after the last step holds the weights and the trainer state only.

    What it would add (AdamW's two states per weight, the scheduler, RNG, GRPO's reference) only serves to continue
    training, and after the last step nothing continues: a rerun after a crash between training and publishing loads
    the final weights from it (train()), and once the stage is published the runner deletes it. At 7B under FSDP the
    full checkpoint is ~114 GiB (cold start) and ~142 GiB (GRPO with its reference; checkpoint_bytes counts both
    copies of the weights FSDP writes), written by one process in 2.5 to 4.5 minutes per stage (benchmarks/README.md,
    leases 7 and 9). The weights alone are 28 GiB (fp32), written in ~38 s (lease 10)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.save_only_model = args.save_only_model

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.global_step >= state.max_steps
        args.save_only_model = self.save_only_model or (control.should_save and last)
        if last and model is not None:  # hardware.master_weights=optimizer: the final checkpoint holds the fp32 weights
            precision.restore_master_weights(model)

    def on_train_end(self, args, state, control, **kwargs):
        args.save_only_model = self.save_only_model


def save_reference(ref_model, checkpoint: Path) -> None:
    """The reference's full state dict into checkpoint/REFERENCE_FILE (written by the main process; under FSDP every
    process takes part in gathering it)."""
    import torch

    if fsdp_sharded(ref_model):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # a collective: the main process receives the full tensors on its CPU, the others {}
        state = get_model_state_dict(ref_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        main = dist.get_rank() == 0
    else:
        state = getattr(ref_model, "module", ref_model).state_dict()
        main = is_main_process()
    if main:
        checkpoint.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint / f"{REFERENCE_FILE}.tmp"
        torch.save(state, tmp)
        tmp.replace(checkpoint / REFERENCE_FILE)


def load_reference(ref_model, checkpoint: Path, sync_steps: int) -> None:
    """Restore the reference saved with `checkpoint`; a checkpoint from before it was saved keeps the initial
    reference, with a warning saying until which step."""
    import torch

    path = checkpoint / REFERENCE_FILE
    if not path.exists():
        step = int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
        log.warning("%s has no %s (saved before r1flow kept GRPO's reference): the KL is measured against the initial "
                    "model until the next reference sync at step %d", checkpoint, REFERENCE_FILE,
                    (step // sync_steps + 1) * sync_steps)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if fsdp_sharded(ref_model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(ref_model, state, options=StateDictOptions(full_state_dict=True))
    else:
        getattr(ref_model, "module", ref_model).load_state_dict(state)
    log.info("reference model restored from %s", path)


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
    """One line per log: `step i/N key=val ...`, which streams line by line into Prefect; and progress events
    (stages/shared/progress.py): every log with its metrics, between logs at most one a second."""

    def __init__(self, name: str = ""):
        self.name = name
        self.phase = f"{name} training".strip()
        self.t0 = None
        self.start_step = 0
        self.last_event = 0.0
        self.last_step_end = None

    def _emit(self, state, metrics=None):
        progress.emit(self.phase, state.global_step, state.max_steps, metrics)
        self.last_event = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.time()
        if state.is_world_process_zero and self.last_step_end - self.last_event >= progress.MIN_EVENT_INTERVAL_S:
            self._emit(state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._emit(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.start_step = state.global_step
        reset_peak_gpu_memory()  # the trainer's peak, not its stage's loading or an earlier trainer's
        if state.is_world_process_zero:
            log.info("%s: training to step %d%s", self.name, state.max_steps,
                     f" (resumed at {state.global_step})" if state.global_step else "")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if state.is_world_process_zero:
            self._emit(state, logs)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, short in _SHOWN:
            if logs.get(key) is not None:
                parts.append(f"{short}={_fmt(logs[key])}")
        for key, value in logs.items():  # per reward function: rewards/<name>/mean
            if key.startswith("rewards/") and key.endswith("/mean") and value is not None:
                parts.append(f"{key.split('/')[1]}={_fmt(value)}")
        if len(parts) > 1 and state.is_world_process_zero:  # several processes (FSDP): one line, not one each
            if self.t0 is not None and state.global_step > self.start_step:
                # up to the end of the last step: the summary logged after training comes after the last checkpoint
                # write (140 s for a 7B one), which is not a step's time
                per_step = ((self.last_step_end or time.time()) - self.t0) / (state.global_step - self.start_step)
                parts.append(f"s/step={per_step:.2f}")
            memory = peak_gpu_memory()  # this process's; the artifact's metrics hold the largest over processes
            if memory:
                parts.append(f"mem={memory['allocated']:.1f}/{memory['reserved']:.1f}GiB")
            log.info(" ".join(parts))


# ---------------------------------------------------------------------------------------------------------------------
# SFT

def lora_config(lora: Mapping):
    """peft's LoraConfig from a stage's `lora` node, or None where it is not enabled."""
    if not lora["enabled"]:
        return None
    from peft import LoraConfig

    target = lora["target_modules"]
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=target if isinstance(target, str) else list(target), task_type="CAUSAL_LM")


def sft(cfg: Mapping, model, tokenizer, dataset, work_dir: str | Path, *, name: str = "sft",
        callbacks: list | None = None, **fields):
    """Supervised fine-tuning with TRL's SFTTrainer; returns (plain model, trainer).

    `dataset` is a datasets.Dataset in one of TRL's formats: `messages` (conversational; cfg.assistant_only_loss puts
    the loss on the assistant turns, which the chat template marks with {% generation %}), `prompt`/`completion`
    (loss on the completion), or `text` (language modelling). The SFTConfig fields among cfg's keys pass through;
    `fields` override them. cfg.packing turns on best-fit packing, which is padding-free (position ids restart per sequence; sdpa and
    flash attention keep the sequences apart). cfg.lora.enabled trains a LoRA adapter through peft and merges it into
    the returned model, so what is saved is a plain checkpoint. Checkpoints go to work_dir/checkpoints; a rerun
    resumes from the last one.
    """
    from stages.shared import attention

    trainer = sft_trainer(cfg, model, tokenizer, dataset, work_dir, name=name, callbacks=callbacks, **fields)
    ckpt = Path(work_dir) / CHECKPOINT_DIR
    try:
        train(trainer, ckpt)
    finally:
        attention.undo_for_training(model)  # generation and saving afterwards run the plain modules
        precision.restore_master_weights(model)  # ... on the trained fp32 weights
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapter into the weights
        model = model.merge_and_unload()
    return model, trainer


def sft_trainer(cfg: Mapping, model, tokenizer, dataset, work_dir: str | Path, *, name: str = "sft",
                callbacks: list | None = None, **fields):
    """The SFTTrainer that `sft()` trains (its dataset already tokenized, its masks in place), for a real checkpoint
    as for the built one:

    - the chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) becomes the EOS (SFTConfig.eos_token;
      TRL also adds it to the model's generation_config), so the saved checkpoint stops at the end of its turn in
      GRPO, vLLM and generate, where a base checkpoint's own EOS (``<|endoftext|>``) would let it run on;
    - assistant-only loss where the template cannot mark the assistant turn (no ``{% generation %}`` markers and
      none TRL can patch in: Qwen2.5-Math, Llama 3.1) trains on a conversational prompt/completion split instead
      (`assistant_loss_format`);
    - max_length is capped at the model's context (models.fit_to_context: logged).
    """
    from trl import SFTConfig, SFTTrainer

    from stages.shared import attention, models, templates

    hardware = cfg["hardware"]
    attention.set_attention(model, hardware["attn_implementation"])  # models built in-stage (base) too
    packing = cfg["packing"]
    # GPU (conf/hardware/gpu.yaml, stages/shared/attention.py): padding-free batches through varlen attention
    padding_free = not packing and attention.use_padding_free(hardware, model)
    knobs: dict = {}
    if packing is True:
        knobs["packing_strategy"] = "bfd"
    elif not padding_free:  # padded batches: similar lengths together, less padding
        knobs["train_sampling_strategy"] = "group_by_length"
    # Padding-free batches have no padding to save, so they are drawn at random: grouped by length, the SFT benchmark's
    # steps ran from 5.5k tokens (the GPU waiting on the host) to 63.6k (the memory peak), 17% slower and 20 GB more
    # on an H100 (benchmarks/README.md, the thirteenth lease)
    knobs.update(fields)
    if "text" in dataset.column_names and "messages" not in dataset.column_names:
        knobs["assistant_only_loss"] = False
    if knobs.get("assistant_only_loss", "assistant_only_loss" in cfg and cfg["assistant_only_loss"]):
        dataset, knobs["assistant_only_loss"] = assistant_loss_format(dataset, tokenizer, name)
    max_length = knobs.get("max_length", cfg["max_length"] if "max_length" in cfg else None)
    if max_length is not None:
        knobs["max_length"] = models.fit_to_context(
            f"{name}.max_length", max_length, getattr(model.config.get_text_config(), "max_position_embeddings", None))
    end_of_turn = templates.end_of_turn_token(tokenizer)
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token:
        log.info("%s: EOS %s -> %s (the chat template's end of turn)", name, tokenizer.eos_token, end_of_turn)
        knobs["eos_token"] = end_of_turn
    ckpt = Path(work_dir) / CHECKPOINT_DIR
    collator = attention.padding_free_collator(tokenizer) if padding_free else None
    if attention.compile_for_training(model, hardware):
        knobs["use_liger_kernel"] = False  # compiled layers fuse what Liger would (faster, measured)
    attention.bf16_residual_for_training(model, hardware)
    args = trainer_args(SFTConfig, cfg, ckpt, **knobs)
    peft_config = lora_config(cfg["lora"]) if "lora" in cfg else None
    # LoRA trains fp32 adapters (peft upcasts them) on a frozen base: fp32 masters of the frozen weights would only cost
    # memory, so the base stays as loaded
    masters = {} if peft_config is not None else \
        precision.bf16_weights_for_training(model, hardware, sharded=bool(args.fsdp))
    return build_trainer(SFTTrainer, name=name, callbacks=callbacks, model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=collator,
                         optimizer_cls_and_kwargs=precision.master_weights_optimizer(args, masters),
                         peft_config=peft_config)


def assistant_loss_format(dataset, tokenizer, name: str = "sft"):
    """(dataset, assistant_only_loss) for a `messages` dataset that asks for the loss on the assistant turns.

    Kept as is when the chat template has `{% generation %}` markers or TRL can patch them in
    (trl.chat_template_utils.get_training_chat_template: Qwen2.5-Instruct, Llama 3, R1-Distill, ...). Otherwise each
    conversation becomes a conversational prompt/completion pair, everything before the last assistant turn being the
    prompt: TRL then puts the loss on the completion, the last assistant turn with its end-of-turn token (earlier
    assistant turns of a multi-turn conversation carry none). A conversation that does not end in an assistant turn
    cannot be split so: UserError naming the template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if "messages" not in dataset.column_names:
        return dataset, False
    template = tokenizer.chat_template
    if has_generation_markers(template):
        return dataset, True
    try:
        get_training_chat_template(tokenizer)
        return dataset, True
    except ValueError:
        pass
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    first_line = (template or "").strip().splitlines()[0][:80] if template else "(none)"
    for i, messages in enumerate(dataset["messages"]):
        if not messages or messages[-1].get("role") != "assistant":
            raise UserError(
                f"{name}.assistant_only_loss=true: the chat template of {source} (starting {first_line!r}) has no "
                f"{{% generation %}} markers and TRL cannot patch it, and row {i} does not end with an assistant turn, "
                f"so it cannot be trained as prompt/completion either. Fix: end every conversation with the assistant "
                f"turn to train, add {{% generation %}}...{{% endgeneration %}} around the assistant turn (end-of-turn "
                f"token inside) in the template, or set {name}.assistant_only_loss=false")
    log.info("%s: the chat template of %s cannot mark assistant turns for the loss; training on prompt/completion "
             "(loss on the final assistant turn and its end-of-turn token)", name, source)
    split = dataset.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                        remove_columns=["messages"])
    return split, False


def build_trainer(trainer_cls, *, name: str, callbacks: list | None = None, **kwargs):
    """A TRL trainer (SFTTrainer, GRPOTrainer, RewardTrainer) that reports progress as `step i/N key=val` lines
    (ProgressCallback) instead of transformers' printed dicts."""
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_cls(callbacks=[ProgressCallback(name), *(callbacks or [])], **kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# GRPO (reasoning_grpo and the alignment RL of merged_sft_alignment)

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")


# GRPOConfig fields that change what GRPO optimises: each is a key of conf/ (and stages/shared/schema.py) and passes
# through by name (trl_fields), none left to TRL's default, which moves between TRL releases (use_bias_correction_kl
# and the vLLM importance-sampling correction arrived on by default). tests/stages/shared/test_grpo_args.py checks
# that every one follows the config.
OBJECTIVE_FIELDS = ("beta", "epsilon", "epsilon_high", "delta", "loss_type", "scale_rewards", "num_iterations",
                    "mask_truncated_completions", "top_entropy_quantile", "importance_sampling_level",
                    "use_bias_correction_kl", "off_policy_mask_threshold", "vllm_importance_sampling_correction",
                    "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                    "vllm_importance_sampling_clip_min", "sync_ref_model", "ref_model_sync_steps",
                    "ref_model_mixup_alpha", "temperature", "top_p", "max_completion_length")


def grpo_args(cfg, checkpoint_dir, reward_weights: list[float] | None = None, revision: str | None = None, *,
              longest_prompt: int = 0, context: int | None = None, key: str = "reasoning_grpo"):
    """The GRPOConfig for this stage: the GRPOConfig fields among cfg's keys pass through (conf/ pins every one that
    changes the objective, OBJECTIVE_FIELDS), plus what r1flow derives: the batch from prompts_per_step x G, global
    over all processes (the paper's 32 x 16 per step, split into gradient_accumulation_steps x processes passes),
    the rollout reuse, the reward weights, max_completion_length capped at the model's `context` after the
    `longest_prompt` (logged), and vLLM's share of the GPU from the hardware node. `key` names the config node in
    errors."""
    from trl import GRPOConfig

    from stages.shared import models

    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"{key}.loss_type={cfg.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise UserError(f"{key}.scale_rewards={cfg.scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}")
    if cfg.sync_ref_model and float(cfg.beta) == 0.0:
        raise UserError(f"{key}.sync_ref_model=true needs a reference model: set {key}.beta > 0 (the paper: 0.001)")
    G = int(cfg.num_generations)
    if G < 2:
        raise UserError(f"{key}.num_generations={G}: GRPO needs at least 2 samples per prompt")
    per_step, accumulation, processes = int(cfg.prompts_per_step) * G, int(cfg.gradient_accumulation_steps), \
        world_size()
    if per_step % (accumulation * processes):
        raise UserError(f"{key}: prompts_per_step x num_generations = {per_step} samples per step must divide by "
                        f"gradient_accumulation_steps x processes = {accumulation} x {processes}")
    vllm = cfg.hardware.vllm
    asleep = bool(vllm.enable_sleep_mode) and cfg.hardware.device == "cuda"
    if vllm.enable_sleep_mode and not asleep and cfg.use_vllm:
        log.info(f"{key}: hardware.vllm.enable_sleep_mode ignored: vLLM sleeps on CUDA only")
    max_completion = models.fit_to_context(f"{key}.max_completion_length", int(cfg.max_completion_length), context,
                                           prompt_tokens=longest_prompt)
    fields = dict(
        # the batch: prompts_per_step prompts x G samples per optimizer step, over all processes
        per_device_train_batch_size=per_step // (accumulation * processes),
        # one rollout feeds steps_per_rollout optimizer steps (the paper: 8,192 outputs split in 16 minibatches);
        # TRL counts steps_per_generation in forward/backward passes
        steps_per_generation=int(cfg.steps_per_rollout) * accumulation,
        reward_weights=reward_weights,
        epsilon_high=float(cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high),  # null: a symmetric clip
        max_completion_length=max_completion,
        disable_dropout=True,
        log_completions=False,
        vllm_gpu_memory_utilization=float(vllm.gpu_memory_utilization),
        vllm_tensor_parallel_size=1 if vllm.tensor_parallel_size == "auto" else int(vllm.tensor_parallel_size),
        # vLLM's sleep mode needs CUDA ("Sleep mode is not supported on current platform" on the CPU build): the
        # paper preset turns it on for every hardware, so a CPU try of a real-model config runs without it (logged)
        vllm_enable_sleep_mode=asleep,
    )
    if float(cfg.beta) > 0:  # TRL loads the reference model from the policy's path with these
        reference = {"revision": revision} if revision else {}  # the same pinned hub revision
        if processes > 1:
            # TRL loads the reference with device_map="auto" unless the run is DDP or DeepSpeed; under FSDP "auto"
            # spreads it over every GPU of the host in each process (a 7B on 4 GPUs, 8th lease: "Expected all
            # tensors to be on the same device" at the first reference forward). None: loaded on the CPU, then
            # sharded onto this process's GPU with the policy
            reference["device_map"] = None
            mixing = bool(cfg.sync_ref_model) and float(cfg.ref_model_mixup_alpha) < 1.0
            if cfg.hardware.bf16 and cfg.hardware.get("fsdp") and not mixing:
                # TRL builds the reference in the policy's dtype (fp32 master weights). Under FSDP with bf16 mixed
                # precision accelerate casts every gathered parameter to bf16 for the forward, so a reference stored
                # in bf16 computes the same logits bit for bit (tests/stages/test_fsdp_save.py) in half the memory:
                # 3.8 GB less per GPU for a 7B on 4, which the 7B alignment RL needs beside vLLM on 80 GB cards. Not
                # where TRL mixes the policy into it (alpha < 1): each mix would round to bf16 (a reset, alpha 1, is
                # the same cast FSDP makes)
                reference["dtype"] = "bfloat16"
        if reference:
            fields["model_init_kwargs"] = reference
    if cfg.use_vllm and cfg.vllm_mode == "colocate":
        # TRL reads the token ids only; vLLM's detokenization of every completion, in the trainer's process, cost 40%
        # of generation at 32 prompts x 16 x 1,024 tokens on an H100 (18.3k -> 30.7k tokens/s, benchmarks/README.md
        # "GRPO at a 1.5B shape")
        fields["generation_kwargs"] = {"detokenize": False}
        # colocated: one engine per group of tensor-parallel processes, i.e. data parallel over the rest
        tp = fields["vllm_tensor_parallel_size"]
        if vllm.data_parallel_size != "auto" and int(vllm.data_parallel_size) not in (1, processes // tp):
            raise UserError(f"hardware.vllm.data_parallel_size={vllm.data_parallel_size}: GRPO's colocated vLLM runs "
                            f"one engine per {tp} process(es), i.e. data parallel over {processes // tp}; set it to "
                            f"1 or {processes // tp}")
    if cfg.use_vllm and longest_prompt:
        fields["vllm_max_model_length"] = longest_prompt + max_completion  # KV cache for what the rollouts need
    return trainer_args(GRPOConfig, cfg, checkpoint_dir, **fields)


@contextlib.contextmanager
def colocated_engine_args(hardware: Mapping):
    """Around GRPOTrainer(...): TRL 1.16 builds its colocated vLLM engine there with `LLM(...)` and has no field for
    enforce_eager, so hardware.vllm.enforce_eager reaches that engine only through the constructor TRL calls. Eager
    starts in ~10 s instead of 57-82 s and decodes at 0.62x (benchmarks/README.md, 1.5B on an H100): worth it for
    short stages, not for long ones. Memory the trainer's process no longer uses goes back to the driver first: the
    engine's start counts it as used (hardware.release_memory)."""
    import trl.generation.vllm_generation as trl_vllm

    release_memory()

    if not hardware["vllm"]["enforce_eager"] or not hasattr(trl_vllm, "LLM"):
        yield
        return
    constructor = trl_vllm.LLM
    trl_vllm.LLM = functools.partial(constructor, enforce_eager=True)
    try:
        yield
    finally:
        trl_vllm.LLM = constructor


def check_vllm(cfg, key: str = "reasoning_grpo") -> None:
    """use_vllm's preconditions, before any model loads; `key` names the config node in errors."""
    if not cfg.use_vllm:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{key}.use_vllm=true but vLLM is not installed (`make setup` installs it on GPU machines); "
                        f"set {key}.use_vllm=false to generate with the trainer")
    if on_cpu(cfg.hardware):
        raise UserError(f"{key}.use_vllm=true needs a GPU: TRL's weight sync into vLLM's CPU backend fails "
                        f"('Parameter' object has no attribute 'weight_loader'); set {key}.use_vllm=false with "
                        f"hardware=cpu")
    if cfg.vllm_mode not in ("colocate", "server"):
        raise UserError(f"{key}.vllm_mode={cfg.vllm_mode!r}; use colocate or server")


# ---------------------------------------------------------------------------------------------------------------------
# Saving

def save_model(model, tokenizer, output_dir: str | Path) -> None:
    """A plain transformers checkpoint (safetensors) that AutoModelForCausalLM and vLLM load directly.

    Under FSDP (several processes) every process must call it: the full state dict is gathered onto the main
    process's CPU, the main process writes it, the others wait for it at a barrier. Without FSDP only the main
    process writes (on several nodes they all see one shared output directory)."""
    output_dir = Path(output_dir)
    if fsdp_sharded(model):
        _save_sharded(model, tokenizer, output_dir)
        return
    if not is_main_process():  # several processes without FSDP (DDP): each holds the whole model, one writes it
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
    """Save model + tokenizer, log_history.jsonl, plots and TensorBoard event files into output_dir; return the log
    history's summary.
    Under FSDP every process calls it (the weights are gathered) and the main process writes."""
    from stages.shared import plots

    output_dir = Path(output_dir)
    # the training's peak GPU memory (reset when it began), the largest over processes, read before the save gathers
    # the weights: live tensors, and with the allocator's cache ({} on the CPU)
    memory = peak_gpu_memory(over_processes=True)
    save_model(model, tokenizer, output_dir)
    history = list(trainer.state.log_history)
    if is_main_process():
        logs.write_log_history(history, output_dir / logs.LOG_HISTORY)
        if rl:
            plots.plot_rl(history, output_dir / "rl_curves.png")
        plots.plot_loss(history, output_dir / "loss.png")
        runs = Path(trainer.args.output_dir) / "runs"  # TensorBoard's event files, one directory per attempt
        if runs.is_dir():
            shutil.copytree(runs, output_dir / TENSORBOARD_DIR, dirs_exist_ok=True)
    metrics = logs.summarize(history)
    metrics["global_step"] = int(trainer.state.global_step)
    metrics["resumed_from_step"] = int(getattr(trainer, "resumed_from", 0))
    if metrics["global_step"] > metrics["resumed_from_step"]:  # resumed at its end, this process trained nothing
        metrics.update({f"gpu_peak_{k}_gib": v for k, v in memory.items()})
    return metrics


