"""Held-out accuracy of a model being trained: the stages' before/after checks and the accuracy curve of the RL runs.

Generation goes through generation.hf_generate (the one HF loop) with the model in memory; the answer checks are the
rewards the RL stages pay (accuracy through math-verify, the format reward), so "held-out accuracy" means what the
reward means.
"""

from __future__ import annotations

import logging
import re

from transformers import TrainerCallback

from stages.shared import data
from stages.shared.logs import finite

log = logging.getLogger(__name__)


def evaluate(model, tokenizer, rows: list[dict], *, template: str, verification, num_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 256,
             keep_samples: int = 0, code: dict | None = None) -> dict:
    """Held-out check on rows ({prompt, answer} for math, {prompt, tests} for code): k completions per question
    (greedy for temperature 0).

    accuracy: share of completions whose final answer (\\boxed{} or <answer>, stages.shared.templates.extract_answer)
    verifies against the gold answer, or whose program passes all its tests (rewards.verify_rows with `verification`,
    the stage's config node) -- what the accuracy reward pays (a check that cannot tell counts as not correct);
    format_rate: share the RL stage's format reward scores 1; strict_accuracy: both; lenient_accuracy: also counts a
    bare last number equal to the gold answer of a math row (how often a model that never learnt the format is
    right); mean_length: completion tokens. `code`: {sandbox, code_language} for code rows
    (stages.shared.rewards.code.code_settings; conf/sandbox/default.yaml when None).
    """
    from stages.shared import generation, models, rewards, templates

    prompts = [templates.prompt_token_ids(r["prompt"], template, tokenizer) for r in rows for _ in range(num_samples)]
    golds = [str(r["answer"]) if r.get("answer") is not None else "tests" for r in rows for _ in range(num_samples)]
    max_new_tokens = models.fit_to_context(
        "eval_max_new_tokens", max_new_tokens, getattr(model.config.get_text_config(), "max_position_embeddings", None),
        prompt_tokens=max((len(p) for p in prompts), default=0))
    outs = generation.hf_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    batch_size=batch_size)
    texts = [o["text"] for o in outs]
    correct = [v is True for v in rewards.verify_rows(texts, [r for r in rows for _ in range(num_samples)],
                                                      verification, **(code or {}))]
    formatted = [v >= 1.0 for v in rewards.format_reward(
        texts, template=template, think_prefilled=templates.think_prefilled(tokenizer, template))]
    lenient = []
    for i, (text, gold, ok) in enumerate(zip(texts, golds, correct)):
        if not ok and rows[i // num_samples].get("answer") is not None and templates.extract_answer(text) is None:
            numbers = _NUMBER_RE.findall(text)
            ok = bool(numbers) and numbers[-1] == gold.strip()
        lenient.append(ok)
    n = max(1, len(texts))
    result = {
        "accuracy": sum(correct) / n,
        "format_rate": sum(formatted) / n,
        "strict_accuracy": sum(c and f for c, f in zip(correct, formatted)) / n,
        "lenient_accuracy": sum(lenient) / n,
        "mean_length": sum(o["num_tokens"] for o in outs) / n,
        "truncated_rate": sum(o["finish_reason"] == "length" for o in outs) / n,
        "questions": len(rows),
    }
    if keep_samples:
        result["samples"] = [{"prompt": rows[i // num_samples]["prompt"], "completion": texts[i],
                              "gold": golds[i], "correct": correct[i], "formatted": formatted[i]}
                             for i in range(min(keep_samples, len(texts)))]
    return result


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def eval_rows(path, n: int, *, name: str = "eval_file") -> list[dict]:
    """The first n rows ({prompt, answer, tests}: answer for math, tests for code) of the held-out split."""
    rows = data.load_task_rows(path, name)
    if n and n > 0:
        rows = rows[:n]
    return [{"prompt": r["prompt"], "answer": r.get("answer"), "tests": r.get("tests")} for r in rows]


def eval_metrics(prefix: str, result: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in result.items() if finite(v)}


class HeldoutEvalCallback(TrainerCallback):
    """Held-out accuracy every `every` steps (and at step 0), appended to the log history as heldout/* entries."""

    def __init__(self, tokenizer, rows: list[dict], *, template: str, verification, every: int, max_new_tokens: int,
                 batch_size: int = 256, code: dict | None = None):
        self.tokenizer, self.rows, self.template, self.verification = tokenizer, rows, template, verification
        self.every, self.max_new_tokens, self.batch_size = every, max_new_tokens, batch_size
        self.code = code

    def _run(self, state, model):
        result = evaluate(model, self.tokenizer, self.rows, template=self.template, verification=self.verification,
                          max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, code=self.code)
        entry = {f"heldout/{k}": v for k, v in result.items() if k != "samples"}
        entry["step"] = state.global_step
        state.log_history.append(entry)
        if state.is_world_process_zero:
            log.info("step %d/%d heldout_acc=%.4g heldout_fmt=%.4g heldout_len=%.4g", state.global_step,
                     state.max_steps, result["accuracy"], result["format_rate"], result["mean_length"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step == 0 and model is not None:
            self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and model is not None and (state.global_step % self.every == 0
                                                     or state.global_step == state.max_steps):
            self._run(state, model)


def check(model, tokenizer, rows: list[dict], *, template: str, verification, max_new_tokens: int,
          label: str, code: dict | None = None) -> dict:
    """Greedy held-out accuracy / format rate / length on `rows`, logged with two sample completions: the before/after
    check of the stages that train."""
    result = evaluate(model, tokenizer, rows, template=template, verification=verification,
                      max_new_tokens=max_new_tokens, keep_samples=2, code=code)
    for s in result.pop("samples", []):
        log.info("  %r -> %r (gold %s)", s["prompt"], s["completion"], s["gold"])
    log.info("held-out %s [%s]: accuracy=%.3f format=%.3f len=%.1f", label, template, result["accuracy"],
             result["format_rate"], result["mean_length"])
    return result
