"""Stage `distill` (recipe distill): SFT of a student model on a stage-3 dataset. SFT only, as in the paper.

inputs["model"] is the student's own base checkpoint (stage student_base: the base module with the `student` model
config), inputs["dataset"] a rejection-sampling artifact (train.jsonl rows {messages, kind: reasoning|general}),
made in the same run or pinned by version (recipe.pins.rejection_sampling). The conversations go through the
student's own chat template (TRL SFTTrainer, loss on the assistant turns); the result is a plain checkpoint. Metrics:
held-out accuracy / format rate of the student before and after, and the training summary.

`sft_dataset` and `heldout` are shared with the merged SFT of stage 4 (stages/merged_sft_alignment.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages.shared import data, hardware, heldout, logs, trainers
from stages.shared.errors import UserError
from stages.shared.rewards.code import code_settings

log = logging.getLogger(__name__)

def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    hardware.setup(cfg)
    model, tokenizer = trainers.load_policy(inputs["model"], cfg.hardware)
    dataset, kinds = data.sft_dataset(inputs["dataset"], cfg.max_samples)
    log.info(f"distill: {len(dataset)} samples {kinds} -> student {inputs['model']}")
    if not kinds.get("reasoning"):
        # what the student is distilled for; rejection sampling keeps the general rows when no sample passes
        log.warning(f"distill: the dataset {inputs['dataset']} holds no reasoning samples ({kinds}): the student "
                    f"learns no reasoning from it; see the rejection_sampling artifact's filter_counts.json")
    metrics: dict = {"samples": len(dataset), **{f"samples_{k}": v for k, v in kinds.items()}}
    evaluate = int(cfg.eval_samples) > 0
    if evaluate:
        metrics.update(heldout.eval_metrics("before", _check(model, tokenizer, cfg, "before")))
    t0 = time.time()
    model, trainer = trainers.sft(cfg, model, tokenizer, dataset, work_dir, name="distill", callbacks=callbacks)
    metrics["train_seconds"] = time.time() - t0
    metrics.update(trainers.finish(output_dir, model, tokenizer, trainer))
    if evaluate:
        metrics.update(heldout.eval_metrics("eval", _check(model, tokenizer, cfg, "after")))
    return logs.clean_metrics(metrics)


def _check(model, tokenizer, cfg, label: str) -> dict:
    rows = heldout.eval_rows(cfg.eval_file, int(cfg.eval_samples), name="distill.eval_file")
    return heldout.check(model, tokenizer, rows, template=str(cfg.template), verification=cfg.verification,
                         max_new_tokens=int(cfg.eval_max_new_tokens), label=label, code=code_settings(cfg))
