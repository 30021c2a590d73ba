"""Stage `base`: the checkpoint every recipe starts from.

- model.source == "build" (the embedded default): build the tiny tokenizer and model offline (stages/shared/models.py) and
  pre-train them on the task world's plain corpus (cfg.corpus) with TRL's SFTTrainer as plain language modelling, so
  that R1-Zero starts from a model that answers some problems right and almost never in the <think>/<answer> format.
  The artifact is a plain save_pretrained (safetensors) directory.
- a hub id or a local path: the stage records the source (stages/shared/models.record_source), pinned: a hub id resolves
  to the commit sha of the requested revision (from the local cache when HF_HUB_OFFLINE=1; a model that is not cached
  fails fast naming model.source), a local directory is fingerprinted file by file (sha256). With max_steps > 0 the
  model is also pre-trained further on cfg.corpus and saved like the built one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages.shared import hardware, heldout, logs, trainers
from stages.shared.errors import UserError
from stages.shared.rewards.code import code_settings

log = logging.getLogger(__name__)


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    hardware.setup(cfg)
    source = str(cfg.model.source)
    if source == "build":
        return _build_and_pretrain(cfg, Path(output_dir), Path(work_dir), callbacks)
    from stages.shared import models

    metrics = models.record_source(source, cfg.model.revision, Path(output_dir))
    if int(cfg.max_steps) > 0 and cfg.corpus:
        src, revision = models.model_source(Path(output_dir))
        model = models.load_model(src, revision=revision, trust_remote_code=bool(cfg.model.trust_remote_code),
                                  dtype=hardware.model_dtype(cfg.hardware),
                                  device="cpu" if hardware.on_cpu(cfg.hardware) else "cuda")
        tokenizer = models.load_tokenizer(src, revision=revision,
                                          trust_remote_code=bool(cfg.model.trust_remote_code))
        for f in Path(output_dir).iterdir():  # the reference is replaced by the trained weights
            f.unlink()
        metrics.update(_pretrain(cfg, model, tokenizer, Path(output_dir), Path(work_dir), callbacks))
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# The embedded tiny model

def _build_and_pretrain(cfg, output_dir: Path, work_dir: Path, callbacks) -> dict:
    from stages.shared import data, models

    t0 = time.time()
    corpus_files = [str(data.resolve_path(p)) for p in cfg.model.tokenizer.corpus]
    tokenizer = models.build_tokenizer(corpus_files, int(cfg.model.tokenizer.vocab_size))
    model = models.build_model(dict(cfg.model.architecture), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"base: built {type(model).__name__} with {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)} "
          f"({time.time() - t0:.1f}s)")
    metrics = _pretrain(cfg, model, tokenizer, output_dir, work_dir, callbacks)
    metrics["parameters"] = n_params
    return metrics


def _pretrain(cfg, model, tokenizer, output_dir: Path, work_dir: Path, callbacks) -> dict:
    """Language modelling on cfg.corpus (rows with a `text` field), then save and check on the held-out split."""
    from datasets import Dataset

    from stages.shared import data

    t0 = time.time()
    rows = data.load_rows(cfg.corpus, ["text"], "base.corpus")
    dataset = Dataset.from_list([{"text": r["text"]} for r in rows])
    max_steps = int(cfg.max_steps)
    fields = dict(max_steps=max_steps, per_device_train_batch_size=int(cfg.batch_size), completion_only_loss=False)
    packing = cfg.packing
    if packing in ("wrapped", "bfd", "bfd_split"):
        # wrapped: the corpus as one stream cut into max_length rows (no padding, documents separated by eos);
        # bfd: whole documents binned into rows, padding-free with per-document positions (varlen attention, GPU)
        fields.update(packing=True, packing_strategy=packing)
    elif packing:
        raise UserError(f"base.packing={packing!r}; use wrapped, bfd, bfd_split or null (padded batches)")
    else:
        fields["train_sampling_strategy"] = "group_by_length" if cfg.group_by_length else "random"
    if cfg.lr_scheduler_type == "warmup_stable_decay":
        fields["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, int(max_steps * float(cfg.decay_ratio))),
                                         "min_lr_ratio": 0.0}
    model, trainer = trainers.sft(cfg, model, tokenizer, dataset, work_dir, name="base", callbacks=callbacks,
                                  **fields)
    train_s = time.time() - t0
    metrics = trainers.finish(output_dir, model, tokenizer, trainer)
    metrics["train_seconds"] = train_s
    metrics.update(_heldout(cfg, model, tokenizer))
    return logs.clean_metrics(metrics)


def _heldout(cfg, model, tokenizer) -> dict:
    """Greedy held-out check in the R1-Zero template: how many the base answers right, and in which format."""
    n = int(cfg.eval_samples)
    if n <= 0 or not cfg.eval_file:
        return {}
    rows = heldout.eval_rows(cfg.eval_file, n, name="base.eval_file")
    out = {}
    for template in cfg.eval_templates:
        result = heldout.check(model, tokenizer, rows, template=template, verification=cfg.verification,
                               max_new_tokens=int(cfg.eval_max_new_tokens), label="base", code=code_settings(cfg))
        out.update(heldout.eval_metrics(f"eval_{template}", result))
    return out
