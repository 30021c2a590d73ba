"""Stage `cold_start_sft`: TRL SFTTrainer on the cold-start long-CoT samples, from the base checkpoint.

The samples are conversations (`messages`: the user's question, then the assistant's `<think>` reasoning and summary).
The user turn is rendered with the same template the RL stage prompts with (cfg.template), so SFT and RL see the same
prompts. The loss falls on the assistant part only (assistant_only_loss: the chat template marks it with
{% generation %}). Batches are padded on CPU (grouped by length to keep the padding small), padding-free rows drawn at
random on a GPU (hardware.padding_free), or best-fit packed where cfg.packing is on. LoRA is optional
(cfg.lora.enabled) and merged into a plain checkpoint at the end, so the next stage and vLLM load it without peft.
Logs loss and token accuracy; metrics hold the held-out accuracy and format rate of the input model and of the result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages.shared import hardware, heldout, logs, trainers
from stages.shared.errors import UserError
from stages.shared.rewards.code import code_settings

log = logging.getLogger(__name__)


def build_dataset(cfg):
    """(the SFT dataset, decontamination counts): `messages` rows, the user turn rendered by the stage's template, at
    most cfg.max_samples, none whose question shares a word n-gram with the held-out split or a benchmark."""
    from datasets import Dataset

    from stages.shared import data, templates

    rows = data.load_rows(cfg.train_file, ["messages"], "cold_start_sft.train_file")
    if cfg.max_difficulty is not None:
        rows = [r for r in rows if r.get("difficulty") is None or int(r["difficulty"]) <= int(cfg.max_difficulty)]
    rows = [{**r, "question": r.get("prompt") or next((m["content"] for m in r["messages"] if m.get("role") == "user"),
                                                       "")} for r in rows]
    rows, counts = data.decontaminate(rows, data.evaluation_sets(cfg), ngram=int(cfg.decontaminate_ngram),
                                      key="cold_start_sft.train_file", field="question")
    if cfg.max_samples is not None:
        rows = rows[: int(cfg.max_samples)]
    if not rows:
        raise UserError(f"cold_start_sft.train_file={cfg.train_file!r} has no usable rows")
    template = cfg.template
    out = []
    for i, r in enumerate(rows):
        messages = r["messages"]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        if not assistant:
            raise UserError(f"cold_start_sft.train_file row {i}: `messages` has no assistant turn")
        prompt = templates.format_prompt(r["question"], template)
        if isinstance(prompt, str):  # a plain-text template: train on prompt/completion
            out.append({"prompt": prompt, "completion": " " + assistant[-1]["content"]})
        else:
            out.append({"messages": [*prompt, {"role": "assistant", "content": assistant[-1]["content"]}]})
    return Dataset.from_list(out), counts


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    hardware.setup(cfg)
    model, tokenizer = trainers.load_policy(inputs["model"], cfg.hardware)
    dataset, counts = build_dataset(cfg)
    log.info(f"cold_start_sft: {len(dataset)} samples")
    rows = heldout.eval_rows(cfg.eval_file, int(cfg.eval_samples), name="cold_start_sft.eval_file") \
        if cfg.eval_samples > 0 else []
    template = cfg.template
    metrics: dict = {"samples": len(dataset), **counts}
    if rows:
        before = _heldout(model, tokenizer, rows, cfg, template, "before")
        metrics.update(heldout.eval_metrics("before", before))
    t0 = time.time()
    model, trainer = trainers.sft(cfg, model, tokenizer, dataset, work_dir, name="cold_start_sft",
                                  callbacks=callbacks)
    metrics["train_seconds"] = time.time() - t0
    metrics.update(trainers.finish(output_dir, model, tokenizer, trainer))
    if rows:
        after = _heldout(model, tokenizer, rows, cfg, template, "after")
        metrics.update(heldout.eval_metrics("eval", after))
    return logs.clean_metrics(metrics)


def _heldout(model, tokenizer, rows, cfg, template, label) -> dict:
    return heldout.check(model, tokenizer, rows, template=template, verification=cfg.verification,
                         max_new_tokens=int(cfg.eval_max_new_tokens), label=label, code=code_settings(cfg))
