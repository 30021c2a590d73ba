"""Stage `distill` (recipe distill): SFT of a student model on a stage-3 dataset. SFT only, as in the paper.

inputs["model"] is the student's own base checkpoint (stage student_base: the base module with the `student` model
config), inputs["dataset"] a rejection-sampling artifact (train.jsonl rows {messages, kind: reasoning|general}),
made in the same run or pinned by version (recipe.pins.rejection_sampling). The conversations go through the
student's own chat template (TRL SFTTrainer, loss on the assistant turns); the result is a plain checkpoint. Metrics:
held-out accuracy / format rate of the student before and after, and the training summary.

`sft_dataset` and `heldout` are shared with the merged SFT of stage 4 (stages/merged_sft_alignment.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from stages import training
from stages.errors import UserError

DATASET_FILE = "train.jsonl"


def sft_dataset(dataset_dir: str | Path, max_samples: int | None = None):
    """The stage-3 conversations of a dataset artifact as a TRL conversational dataset ({messages}); also returns
    the count per kind."""
    from datasets import Dataset

    from stages import data

    path = Path(dataset_dir) / DATASET_FILE
    if not path.is_file():
        raise UserError(f"{dataset_dir} is not a stage-3 dataset artifact ({DATASET_FILE} missing); give the "
                        f"rejection_sampling stage's output")
    rows = data.load_rows(str(path), ["messages"], "rejection_sampling.train")
    if max_samples:
        rows = rows[: int(max_samples)]
    out, kinds = [], {}
    for i, r in enumerate(rows):
        messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError(f"{path} row {i}: `messages` must end with an assistant turn")
        out.append({"messages": messages})
        kind = str(r.get("kind") or "reasoning")
        kinds[kind] = kinds.get(kind, 0) + 1
    return Dataset.from_list(out), kinds


def sft_fields(cfg) -> dict:
    """Without packing, batches of similar lengths (less padding), as the cold-start SFT does."""
    return {} if cfg.get("packing") else {"train_sampling_strategy": "group_by_length"}


def heldout(model, tokenizer, cfg, label: str, name: str) -> dict:
    """Greedy held-out accuracy / format rate on cfg.eval_file (cfg.eval_samples rows) with cfg.template."""
    rows = training.eval_rows(cfg.eval_file, int(cfg.eval_samples), name=f"{name}.eval_file")
    result = training.evaluate(model, tokenizer, rows, template=str(cfg.template),
                               max_new_tokens=int(cfg.eval_max_new_tokens), keep_samples=2)
    for s in result.pop("samples", []):
        print(f"  {s['prompt']!r} -> {s['completion']!r} (gold {s['gold']})", flush=True)
    print(f"{name}: held-out {label}: accuracy={result['accuracy']:.3f} format={result['format_rate']:.3f} "
          f"len={result['mean_length']:.1f}", flush=True)
    return result


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    training.setup(cfg)
    model, tokenizer = training.load_policy(inputs["model"], cfg.hardware)
    dataset, kinds = sft_dataset(inputs["dataset"], cfg.get("max_samples"))
    print(f"distill: {len(dataset)} samples {kinds} -> student {inputs['model']}", flush=True)
    metrics: dict = {"samples": len(dataset), **{f"samples_{k}": v for k, v in kinds.items()}}
    evaluate = int(cfg.get("eval_samples") or 0) > 0
    if evaluate:
        metrics.update(training.eval_metrics("before", heldout(model, tokenizer, cfg, "before", "distill")))
    t0 = time.time()
    model, trainer = training.sft(cfg, model, tokenizer, dataset, work_dir, name="distill", callbacks=callbacks,
                                  **sft_fields(cfg))
    metrics["train_seconds"] = time.time() - t0
    metrics.update(training.finish(output_dir, model, tokenizer, trainer))
    if evaluate:
        metrics.update(training.eval_metrics("eval", heldout(model, tokenizer, cfg, "after", "distill")))
    return training.clean_metrics(metrics)
