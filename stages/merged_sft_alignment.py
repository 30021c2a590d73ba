"""Stage `merged_sft_alignment` (recipe r1, stage 4): merged SFT from the BASE model, then alignment RL.

1. Merged SFT (work_dir/sft): TRL SFTTrainer on the stage-3 dataset (inputs["dataset"]/train.jsonl: reasoning
   samples kept by rejection sampling plus non-reasoning data), starting from inputs["base"] -- the base checkpoint,
   not the RL one, as in the paper (the RL checkpoint only generated the data). Two epochs by default. The finished
   SFT model is kept in work_dir/sft/model, so a crash during RL does not redo it.
2. Alignment RL (work_dir/alignment): TRL GRPOTrainer from the merged-SFT model on a mix of reasoning prompts and
   general prompts (a `kind` column). Reasoning prompts get the rule rewards (accuracy, format, language consistency,
   stages/shared/rewards/); general prompts get the reward models (inputs helpfulness_rm / harmlessness_rm, stage
   reward_model): helpfulness on the SUMMARY only (the response after </think>; the model never sees the reasoning),
   harmlessness on the WHOLE response -- each RM's scope comes from its artifact. Every reward returns None for the
   other kind, and TRL leaves a None out of that row's weighted sum (NaN + nansum; a group is one prompt, so one
   kind). The paper's schedule: T=0.7, and general data with preference rewards only in the last part of training
   (alignment.preference_rewards_from, a share of max_steps): the prompts are laid out in that order (reasoning only,
   then the mix) and read unshuffled, and the RM rewards return None before that step (trainer_state.global_step).

Metrics: the SFT summary (sft_*), the RL log summary, held-out accuracy and format rate (greedy) before alignment
(after SFT: before_*) and after (eval_*), and each reward model's mean score on held-out general prompts before and
after (before_rm_<name> / eval_rm_<name>; k sampled responses per prompt at the RL temperature). The artifact: a plain
save_pretrained model (AutoModelForCausalLM, vLLM), the RL log_history.jsonl (as the GRPO stage writes it: per step
rewards per function, including each reward model's mean score, held-out accuracy, length, KL, ...) with
rl_curves.png and loss.png, and the SFT's sft_log_history.jsonl with sft_loss.png.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from stages.shared import data, generation, hardware, heldout, logs, reward_models, rewards, templates, trainers
from stages.shared.errors import UserError
from stages.shared.rewards.code import code_settings

log = logging.getLogger(__name__)

RM_INPUTS = {"helpfulness": "helpfulness_rm", "harmlessness": "harmlessness_rm"}  # reward name -> input role
GENERAL, REASONING = "general", "reasoning"
SFT_LOG_HISTORY = "sft_log_history.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Rewards

class ForKind:
    """A reward function applied to the rows of one `kind` only; None (TRL: not applicable) for the others. It is called
    even when no row is of its kind: a reward model sharded over the processes must run on every process
    (reward_models.most_batches)."""

    def __init__(self, fn, kind: str):
        self.fn, self.kind = fn, kind
        self.__name__ = self.__qualname__ = getattr(fn, "__name__", repr(fn))

    def __call__(self, completions, kind=None, **kwargs) -> list:
        n = len(completions)
        rows = [i for i in range(n) if kind is None or kind[i] == self.kind]
        out: list = [None] * n
        sub = {k: [v[i] for i in rows] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        for i, r in zip(rows, self.fn(completions=[completions[i] for i in rows], **sub)):
            out[i] = r
        return out


def reward_functions(acfg, rms: dict, *, from_step: int, row_kinds: set[str], think_prefilled: bool = False):
    """(funcs, weights) for GRPOTrainer: the rule rewards for reasoning rows (math answers or code tests), the reward
    models for general rows. `row_kinds`: the kinds of the RL dataset's reasoning rows (rewards.row_kind)."""
    weights = {str(k): float(v) for k, v in dict(acfg.rewards).items()}
    extra = {name: reward_models.rm_reward(name, model, tok, scope=meta["scope"], from_step=from_step,
                             max_length=meta["max_length"], batch_size=int(acfg.rm_batch_size))
             for name, (model, tok, meta) in rms.items()}
    missing = sorted(set(RM_INPUTS) & {k for k, v in weights.items() if v} - set(extra))
    if missing:
        raise UserError(f"merged_sft_alignment.alignment.rewards weights {missing}, but no such reward-model input")
    funcs, reward_weights = rewards.build_reward_functions(weights, extra_rewards=extra, row_kinds=row_kinds,
                                                           template=str(acfg.template), language=acfg.language,
                                                           verification=acfg.verification,
                                                           think_prefilled=think_prefilled,
                                                           code_score=acfg.code_score, **code_settings(acfg))
    return [ForKind(f, GENERAL if f.__name__ in extra else REASONING) for f in funcs], reward_weights


# ---------------------------------------------------------------------------------------------------------------------
# Data

def general_prompts(acfg) -> tuple[list[dict], list[dict]]:
    """(training, held-out) general prompts: the last acfg.eval_general_prompts rows are held out for the RM scores."""
    from stages.shared import data

    rows = data.load_rows(acfg.general_prompts_file, ["prompt"], "general_prompts")
    n_eval = int(acfg.eval_general_prompts)
    if len(rows) <= n_eval:
        raise UserError(f"{acfg.general_prompts_file}: {len(rows)} general prompts, but "
                        f"alignment.eval_general_prompts={n_eval} are held out; lower it or add prompts")
    return rows[: len(rows) - n_eval], rows[len(rows) - n_eval:]


def rl_dataset(acfg, general: list[dict], from_step: int):
    """The RL prompts in the order they are read: from_step steps of reasoning prompts, then the mix with a
    general_share of general prompts (shuffled within each part, prompts cycled where a file runs short)."""
    from datasets import Dataset

    from stages.shared import data, templates

    rng = random.Random(int(acfg.seed))
    reasoning = data.load_task_rows(acfg.reasoning_prompts_file, "rl_train")
    reasoning, decontaminated = data.decontaminate(
        reasoning, data.evaluation_sets(acfg), ngram=int(acfg.decontaminate_ngram),
        key="merged_sft_alignment.alignment.reasoning_prompts_file")
    rng.shuffle(reasoning)
    # prompts read per optimizer step (prompts_per_step is over all processes)
    per_step = int(acfg.prompts_per_step) // int(acfg.num_iterations)
    n_first, n_rest = from_step * per_step, (int(acfg.max_steps) - from_step) * per_step
    n_general = round(n_rest * float(acfg.general_share)) if general else 0
    cycle = lambda rows, n, offset=0: [rows[(offset + i) % len(rows)] for i in range(n)]  # noqa: E731
    first = [_reasoning_row(r, acfg) for r in cycle(reasoning, n_first)]
    rest = [_reasoning_row(r, acfg) for r in cycle(reasoning, n_rest - n_general, n_first)]
    rest += [{"prompt": templates.format_prompt(r["prompt"], acfg.template), "question": r["prompt"],
              "answer": None, "tests": None, "language": r.get("language") or acfg.language, "kind": GENERAL}
             for r in cycle(rng.sample(general, len(general)), n_general)]
    rng.shuffle(rest)
    return Dataset.from_list(first + rest), {"reasoning_prompts": n_first + n_rest - n_general,
                                             "general_prompts": n_general, **decontaminated}


def _reasoning_row(r: dict, acfg) -> dict:
    from stages.shared import templates

    return {"prompt": templates.format_prompt(r["prompt"], acfg.template), "question": r["prompt"],
            "answer": None if r.get("answer") is None else str(r["answer"]),
            "tests": None if r.get("tests") is None else json.dumps(r["tests"]),
            "language": r.get("language") or acfg.language, "kind": REASONING}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements before / after alignment

def rm_scores(model, tokenizer, prompts: list[dict], rms: dict, cfg) -> dict:
    """Mean score of each reward model (in its scope) over cfg.eval_rm_samples responses per held-out general prompt,
    sampled at cfg.eval_rm_temperature (the RL temperature: the policy that was optimised), seeded: {name: mean}."""
    import torch

    if not prompts or not rms:
        return {}
    k = int(cfg.eval_rm_samples)
    ids = [templates.prompt_token_ids(r["prompt"], str(cfg.template), tokenizer) for r in prompts for _ in range(k)]
    torch.manual_seed(int(cfg.seed))
    texts = [s["text"] for s in generation.hf_generate(model, tokenizer, ids,
                                                       max_new_tokens=int(cfg.eval_max_new_tokens),
                                                       temperature=float(cfg.eval_rm_temperature))]
    questions = [r["prompt"] for r in prompts for _ in range(k)]
    out = {}
    for name, (rm, tok, meta) in rms.items():
        scores = reward_models.score(rm, tok, questions, [reward_models.view(t, meta["scope"]) for t in texts],
                                    max_length=meta["max_length"])
        out[name] = sum(scores) / len(scores)
    log.info(f"  {questions[0]!r} -> {texts[0]!r}")
    return out


def measure(model, tokenizer, cfg, eval_rows: list[dict], general_eval: list[dict], rms: dict, label: str) -> dict:
    out = {}
    if eval_rows:
        result = heldout.evaluate(model, tokenizer, eval_rows, template=str(cfg.template),
                                   verification=cfg.verification, max_new_tokens=int(cfg.eval_max_new_tokens),
                                   code=code_settings(cfg))
        out.update({k: v for k, v in result.items() if k != "samples"})
    out.update({f"rm_{k}": v for k, v in rm_scores(model, tokenizer, general_eval, rms, cfg).items()})
    log.info(f"merged_sft_alignment: {label}: " + " ".join(f"{k}={v:.3f}" for k, v in out.items()
                                                      if isinstance(v, float)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The stage

def _node(cfg, part: str):
    """cfg.<part> with the stage-level seed, hardware and language pulled in (what trainers.* and TRL configs read)."""
    node = OmegaConf.to_container(cfg[part], resolve=True) if OmegaConf.is_config(cfg) else dict(cfg[part])
    for key in ("seed", "hardware", "verification", "language", "template", "eval_file", "benchmarks",
                "decontaminate_ngram", "sandbox", "code_language"):
        node[key] = cfg[key]
    return OmegaConf.create(node)


def merged_sft(cfg, inputs: dict, work_dir: Path, callbacks=None):
    """SFT of the BASE checkpoint on the stage-3 dataset; (model, tokenizer, metrics, log_history). Reuses
    work_dir/sft/model when a previous attempt finished it."""
    sft_dir = work_dir / "sft"
    done = sft_dir / "model"
    if (done / "metrics.json").is_file():
        log.info(f"merged_sft_alignment: merged SFT already done ({done})")
        model, tokenizer = trainers.load_policy(done, cfg.hardware)
        saved = json.loads((done / "metrics.json").read_text())
        return model, tokenizer, saved["metrics"], saved["log_history"]
    scfg = _node(cfg, "sft")
    model, tokenizer = trainers.load_policy(inputs["base"], cfg.hardware)
    dataset, kinds = data.sft_dataset(inputs["dataset"], scfg.max_samples)
    log.info(f"merged_sft_alignment: merged SFT of the base model {inputs['base']} on {len(dataset)} samples {kinds}")
    t0 = time.time()
    model, trainer = trainers.sft(scfg, model, tokenizer, dataset, sft_dir, name="merged_sft", callbacks=callbacks)
    history = list(trainer.state.log_history)
    metrics = {**logs.summarize(trainer.state.log_history), "train_seconds": time.time() - t0,
               "samples": len(dataset), **{f"samples_{k}": v for k, v in kinds.items()},
               "global_step": int(trainer.state.global_step)}
    trainers.save_model(model, tokenizer, done)
    (done / "metrics.json").write_text(json.dumps({"metrics": logs.clean_metrics(metrics),
                                                   "log_history": history}))
    # the SFT trainer's checkpoints only served to resume the SFT, which the saved model now replaces: with fp32 AdamW
    # state they are 17 GB at 1.5B, and beside the RL's own they filled a 64 GB disk (benchmarks/README.md)
    shutil.rmtree(sft_dir / trainers.CHECKPOINT_DIR, ignore_errors=True)
    # RL starts from the saved model, as a resumed run does: under FSDP the trained one is wrapped (FSDPQwen3...), and
    # a second trainer's FSDP wrap finds no decoder-layer class in it (seen on 2 and 4 H100s)
    del model, trainer
    # ...and the SFT's model and AdamW state leave the GPUs before the RL's policy, reference and reward models come
    hardware.release_memory()
    model, tokenizer = trainers.load_policy(done, cfg.hardware)
    return model, tokenizer, metrics, history


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path, callbacks: list | None = None) -> dict:
    if "base" not in inputs:
        raise UserError("merged_sft_alignment needs input `base` (the base checkpoint: the merged SFT starts from it, "
                        "not from the RL checkpoint); see conf/recipe/r1.yaml")
    from trl import GRPOTrainer

    from stages.shared import plots, rewards

    hardware.setup(cfg)
    verified_before = rewards.verifier_stats()
    output_dir, work_dir = Path(output_dir), Path(work_dir)
    acfg = _node(cfg, "alignment")
    trainers.check_vllm(acfg, key="merged_sft_alignment.alignment")
    max_steps = int(acfg.max_steps)
    from_step = int(round(float(acfg.preference_rewards_from) * max_steps))

    model, tokenizer, sft_metrics, sft_history = merged_sft(cfg, inputs, work_dir, callbacks)
    metrics: dict = {f"sft_{k}": v for k, v in sft_metrics.items()}

    # every reward-model input is loaded: it scores the policy before/after, and rewards it where its weight is not 0
    rms = {name: reward_models.load(inputs[role], cfg.hardware) for name, role in RM_INPUTS.items() if role in inputs}
    general_train, general_eval = general_prompts(acfg)
    eval_rows = heldout.eval_rows(cfg.eval_file, int(cfg.eval_samples), name="rl_eval") \
        if int(cfg.eval_samples) > 0 else []
    before_file = work_dir / "sft" / "model" / "before_alignment.json"
    if before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = measure(model, tokenizer, cfg, eval_rows, general_eval, rms, "before alignment (merged SFT)")
        before_file.write_text(json.dumps(before))
    metrics.update({f"before_{k}": v for k, v in before.items()})

    dataset, counts = rl_dataset(acfg, general_train, from_step)
    kinds = {rewards.row_kind(r) for r in dataset.select_columns(["answer", "tests"])} - {"general"}
    funcs, reward_weights = reward_functions(acfg, rms, from_step=from_step, row_kinds=kinds,
                                             think_prefilled=templates.think_prefilled(tokenizer, str(acfg.template)))
    metrics.update({f"rl_{k}": v for k, v in counts.items()})
    ckpt = work_dir / "alignment" / trainers.CHECKPOINT_DIR
    args = trainers.grpo_args(acfg, ckpt, list(reward_weights), key="merged_sft_alignment.alignment",
                              longest_prompt=templates.longest_prompt(dataset["question"], str(acfg.template),
                                                                      tokenizer),
                              context=model.config.get_text_config().max_position_embeddings)
    log.info(f"merged_sft_alignment: alignment RL, {counts}, rewards {dict(acfg.rewards)}, preference rewards from step "
          f"{from_step}/{max_steps}, G={args.num_generations} x {acfg.prompts_per_step} prompts/step, "
          f"T={args.temperature}, beta={args.beta}, loss={args.loss_type}")
    extra = []
    if eval_rows and int(acfg.eval_steps) > 0:
        extra.append(heldout.HeldoutEvalCallback(tokenizer, eval_rows, template=str(acfg.template),
                                                  verification=cfg.verification, every=int(acfg.eval_steps),
                                                  max_new_tokens=int(cfg.eval_max_new_tokens),
                                                  code=code_settings(cfg)))
    with trainers.colocated_engine_args(cfg.hardware):  # TRL builds its vLLM engine in the constructor
        trainer = trainers.build_trainer(GRPOTrainer, name="alignment", callbacks=[*extra, *(callbacks or [])],
                                         model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                                         processing_class=tokenizer)
    t0 = time.time()
    trainers.train(trainer, ckpt)
    metrics["train_seconds"] = time.time() - t0
    metrics["preference_rewards_from_step"] = from_step
    metrics.update(trainers.finish(output_dir, trainer.model, tokenizer, trainer, rl=True))
    if hardware.is_main_process():  # one writer into the artifact (several processes see one output directory)
        logs.write_log_history(sft_history, output_dir / SFT_LOG_HISTORY)
        plots.plot_loss(sft_history, output_dir / "sft_loss.png", title="merged SFT loss")

    after = measure(trainer.model, tokenizer, cfg, eval_rows, general_eval, rms, "after alignment")
    metrics.update({f"eval_{k}": v for k, v in after.items()})
    for key in ("accuracy", *(f"rm_{n}" for n in rms)):
        if key in before and key in after:
            metrics[f"delta_{key}"] = after[key] - before[key]
    metrics.update(rewards.verification_metrics(verified_before))
    return logs.clean_metrics(metrics)
