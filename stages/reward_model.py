"""Stages `helpfulness_rm` / `harmlessness_rm`: a reward model for alignment RL, as an artifact of its own.

- cfg.source == "train" (the embedded default): TRL's RewardTrainer on preference pairs (cfg.pairs_file rows
  {prompt, chosen, rejected, split: train|eval}), an AutoModelForSequenceClassification (num_labels=1, pad token set)
  initialised from inputs["model"] (the base checkpoint). Metrics: pairwise accuracy on the held-out pairs
  (split == eval) before and after training, also per `issue` where the pairs say what is wrong with the rejected one.
- any other value: a hub id or a local path of an AutoModelForSequenceClassification checkpoint, recorded like the
  base stage records a hub model (pinned revision, or file hashes for a local directory); nothing is copied.

cfg.scope says what the model scores: `summary` (the response after its </think> block; the helpfulness RM, which
must never see the reasoning) or `whole` (reasoning and summary; the harmlessness RM). Training pairs are cut the same
way, and the artifact's reward_model.json carries the scope to the alignment stage, so training and scoring agree.

Scoring, loading and what the model sees (shared with the alignment stage): stages/shared/reward_models.py.
"""

from __future__ import annotations

import logging
import json
import time
from pathlib import Path

import torch

from stages.shared import hardware, logs, reward_models, trainers
from stages.shared.errors import UserError

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------------
# The stage

def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    hardware.setup(cfg)
    output_dir, work_dir = Path(output_dir), Path(work_dir)
    if cfg.scope not in reward_models.SCOPES:
        raise UserError(f"reward_model.*.scope={cfg.scope!r}; use one of {', '.join(reward_models.SCOPES)}")
    meta = {"scope": str(cfg.scope), "max_length": int(cfg.max_length), "source": str(cfg.source)}
    if str(cfg.source) == "train":
        metrics = _train(cfg, Path(inputs["model"]), output_dir, work_dir, callbacks)
    else:
        metrics = _record(cfg, output_dir)
    (output_dir / reward_models.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return logs.clean_metrics(metrics)


def _record(cfg, output_dir: Path) -> dict:
    """A named reward model (hub id or local directory), recorded and pinned exactly as the base stage records one."""
    from stages.shared import models

    return models.record_source(str(cfg.source), cfg.revision, output_dir, key="reward_model.*.source")


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply) of an hh-rlhf style pair: two whole transcripts
    ``\n\nHuman: ... \n\nAssistant: ...`` that share everything up to the last assistant turn. The prompt is that
    shared dialogue (a single question loses its ``Human:`` label); None when the texts are not such transcripts."""
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0 or chosen[:cut_c] != rejected[:cut_r] or not chosen.startswith(HUMAN):
        return None
    dialogue = chosen[:cut_c].strip()
    if dialogue.count(HUMAN.strip()) == 1 and ASSISTANT.strip() not in dialogue:
        dialogue = dialogue[len(HUMAN.strip()):].strip()
    return dialogue, chosen[cut_c + len(ASSISTANT):].strip(), rejected[cut_r + len(ASSISTANT):].strip()


def load_pairs(spec, key: str, default_split: str) -> list[dict]:
    """Rows {prompt, chosen, rejected, split, issue?} of a preference file entry: with a `prompt` column as they are,
    or whole hh-rlhf transcripts (no prompt column) split by `split_transcript`."""
    from stages.shared import data

    rows = data.load_rows(spec, ["chosen", "rejected"], key)
    out = []
    for i, r in enumerate(rows):
        if r.get("prompt") is None:
            parts = split_transcript(str(r["chosen"]), str(r["rejected"]))
            if parts is None:
                raise UserError(f"{key} row {i}: no `prompt` column and chosen/rejected are not hh-rlhf transcripts "
                                f"(\\n\\nHuman: ... \\n\\nAssistant: ...) sharing everything up to the last "
                                f"assistant turn; columns present: {sorted(r)}. Map a prompt column with "
                                f"{key}.columns: {{prompt: <their column>}}")
            r = {**r, "prompt": parts[0], "chosen": parts[1], "rejected": parts[2]}
        out.append({**r, "split": r.get("split") or default_split})
    return out


def pairs(cfg) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} pairs {question, chosen, rejected, issue}, responses cut to cfg.scope: the
    held-out pairs are cfg.eval_pairs_file's rows when it is set (a hub set's test split), else the pairs_file rows
    whose `split` is eval."""
    key = "reward_model.*.pairs_file"
    rows = load_pairs(cfg.pairs_file, key, "train")
    if cfg.eval_pairs_file is not None:
        rows = [r for r in rows if r["split"] == "train"]
        rows += load_pairs(cfg.eval_pairs_file, "reward_model.*.eval_pairs_file", "eval")
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for i, r in enumerate(rows):
        split = r["split"]
        if split not in out:
            raise UserError(f"{cfg.pairs_file} row {i}: split={split!r}; use train or eval")
        out[split].append({"question": r["prompt"], "chosen": reward_models.view(r["chosen"], cfg.scope),
                           "rejected": reward_models.view(r["rejected"], cfg.scope), "issue": r.get("issue") or "all"})
    if not out["train"]:
        raise UserError(f"{cfg.pairs_file} has no training pairs (split == train)")
    return out


def pairwise_accuracy(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 64) -> dict:
    """Share of pairs the model scores chosen > rejected, overall and per `issue`; and the mean margin."""
    if not rows:
        return {}
    questions = [r["question"] for r in rows]
    chosen = reward_models.score(model, tokenizer, questions, [r["chosen"] for r in rows], batch_size=batch_size,
                   max_length=max_length)
    rejected = reward_models.score(model, tokenizer, questions, [r["rejected"] for r in rows], batch_size=batch_size,
                     max_length=max_length)
    wins = [c > r for c, r in zip(chosen, rejected)]
    out = {"pairwise_accuracy": sum(wins) / len(wins),
           "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(wins), "pairs": len(wins)}
    for issue in sorted({r["issue"] for r in rows}):
        hits = [w for w, r in zip(wins, rows) if r["issue"] == issue]
        out[f"pairwise_accuracy_{issue}"] = sum(hits) / len(hits)
    return out


def _train(cfg, base_dir: Path, output_dir: Path, work_dir: Path, callbacks) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from stages.shared import models

    split = pairs(cfg)
    source, revision = models.model_source(base_dir)
    tokenizer = models.load_tokenizer(source, revision=revision)
    torch.manual_seed(int(cfg.seed))  # the score head is random-initialised
    model = AutoModelForSequenceClassification.from_pretrained(
        source, revision=revision, num_labels=1, dtype=hardware.model_dtype(cfg.hardware),
        **({"local_files_only": True} if Path(source).is_dir() else {}))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to("cpu" if hardware.on_cpu(cfg.hardware) else "cuda")
    max_length = models.fit_to_context("reward_model.*.max_length", int(cfg.max_length),
                                       getattr(model.config.get_text_config(), "max_position_embeddings", None))
    before = pairwise_accuracy(model, tokenizer, split["eval"], max_length)

    dataset = Dataset.from_list([{"chosen": reward_models.rm_text(tokenizer, r["question"], r["chosen"]),
                                  "rejected": reward_models.rm_text(tokenizer, r["question"], r["rejected"])}
                                 for r in split["train"]])
    log.info(f"reward_model: {len(dataset)} training pairs, {len(split['eval'])} held-out, scope {cfg.scope}, "
          f"from {source}; held-out pairwise accuracy before training {before.get('pairwise_accuracy', 0):.3f}")
    ckpt = work_dir / trainers.CHECKPOINT_DIR
    args = trainers.trainer_args(RewardConfig, cfg, ckpt, dataset_num_proc=None)
    trainer = trainers.build_trainer(RewardTrainer, name="reward_model", callbacks=callbacks, model=model, args=args,
                                     train_dataset=dataset, processing_class=tokenizer)
    t0 = time.time()
    trainers.train(trainer, ckpt)
    metrics = {"train_seconds": time.time() - t0, "train_pairs": len(dataset)}
    metrics.update(trainers.finish(output_dir, trainer.model, tokenizer, trainer))
    after = pairwise_accuracy(trainer.model, tokenizer, split["eval"], max_length)
    metrics.update({f"before_{k}": v for k, v in before.items() if k.startswith("pairwise_accuracy")})
    metrics.update({f"eval_{k}": v for k, v in after.items()})
    log.info(f"reward_model: held-out pairwise accuracy {before.get('pairwise_accuracy', 0):.3f} -> "
          f"{after.get('pairwise_accuracy', 0):.3f} on {after.get('pairs', 0)} pairs "
          + " ".join(f"{k.removeprefix('pairwise_accuracy_')}={v:.2f}" for k, v in after.items()
                     if k.startswith("pairwise_accuracy_")))
    return metrics
