"""The recipes through checkpoints shaped like the real families (tests/fixtures/real_models) and the real data sets'
schemas (tests/fixtures/real_data, pointed at by `data=openr1_math` with the hub ids replaced by the local copies).

Each recipe runs in this process, stage after stage as the plan orders them (pipeline.plan), at size=smoke with
budgets cut further (a 152k-token vocabulary on 2 CPU cores): what is checked is that every stage runs on the real
tokenizers, templates and data layouts, and what each stage must do with them -- stop at the end of the turn, one
BOS, decontaminated training prompts, hh-rlhf transcripts split, lengths within the model's context.
"""
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.plan import compose_config, plan

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
# The fixtures hold 12 OpenR1 rows: the last 4 are the held-out split (the real config holds out 500).
DATA_OVERRIDES = [
    f"data.files.rl_train.hub={DATA}/open-r1/OpenR1-Math-220k", "data.files.rl_train.split='train[:-4]'",
    f"data.files.rl_eval.hub={DATA}/open-r1/OpenR1-Math-220k", "data.files.rl_eval.split='train[-4:]'",
    f"data.files.cold_start.hub={DATA}/open-r1/OpenR1-Math-220k", "data.files.cold_start.split='train[:-4]'",
    f"data.files.general_sft.hub={DATA}/HuggingFaceH4/ultrachat_200k",
    f"data.files.general_prompts.hub={DATA}/HuggingFaceH4/ultrachat_200k",
    *[f"data.files.{k}.hub={DATA}/Anthropic/hh-rlhf" for k in ("pref_helpfulness", "pref_helpfulness_eval",
                                                                "pref_harmlessness", "pref_harmlessness_eval")],
    f"data.benchmarks.math500.hub={DATA}/HuggingFaceH4/MATH-500",
    f"data.benchmarks.aime24.hub={DATA}/HuggingFaceH4/aime_2024",
]
# size=smoke cut further: a few steps of everything, short generations, the HF backend except where vLLM is the point
TINY = [
    "size=smoke", "evaluate.backend=hf", "evaluate.num_samples=1", "evaluate.max_questions=3", "evaluate.max_tokens=8",
    "cold_start_sft.max_samples=4", "cold_start_sft.per_device_train_batch_size=2", "cold_start_sft.eval_samples=2",
    "cold_start_sft.eval_max_new_tokens=8", "cold_start_sft.max_length=512",
    "reasoning_grpo.use_vllm=false", "merged_sft_alignment.alignment.use_vllm=false", "reasoning_grpo.max_steps=1",
    "reasoning_grpo.prompts_per_step=2", "reasoning_grpo.num_generations=2",
    "reasoning_grpo.max_completion_length=8", "reasoning_grpo.eval_samples=2",
    "rejection_sampling.backend=hf", "rejection_sampling.max_prompts=3", "rejection_sampling.samples_per_prompt=2",
    "rejection_sampling.max_tokens=8",
    *[f"reward_model.{rm}.{k}" for rm in ("helpfulness", "harmlessness")
      for k in ("max_steps=1", "per_device_train_batch_size=2")],
    "merged_sft_alignment.sft.max_steps=1", "merged_sft_alignment.sft.per_device_train_batch_size=2",
    "merged_sft_alignment.sft.max_length=512", "merged_sft_alignment.alignment.max_steps=2",
    "merged_sft_alignment.alignment.prompts_per_step=2", "merged_sft_alignment.alignment.num_generations=2",
    "merged_sft_alignment.alignment.max_completion_length=8", "merged_sft_alignment.alignment.eval_steps=0",
    "merged_sft_alignment.alignment.eval_general_prompts=1", "merged_sft_alignment.eval_samples=2",
    "merged_sft_alignment.eval_max_new_tokens=8", "merged_sft_alignment.eval_rm_samples=1",
    "distill.max_steps=1", "distill.per_device_train_batch_size=2", "distill.max_length=512", "distill.eval_samples=2",
    "distill.eval_max_new_tokens=8",
]


def run_recipe(root: Path, overrides: list[str]) -> dict[str, tuple[Path, dict]]:
    """Every stage of the composed recipe, in plan order, in this process (the runner's subprocesses and Prefect are
    what tests/e2e/test_pipeline.py covers), published as the runner publishes: {stage: (artifact dir, metrics)}."""
    import importlib
    from datetime import datetime, timezone

    from pipeline import artifacts

    now = lambda: datetime.now(timezone.utc)  # noqa: E731

    cfg = compose_config([*TINY, *DATA_OVERRIDES, f"artifacts_root={root}/a", f"work_root={root}/w", *overrides])
    done: dict[str, tuple[Path, dict]] = {}
    for stage in plan(cfg):
        module = importlib.import_module(f"stages.{stage.module}")
        out, work = artifacts.staging_dir(str(root / "a"), stage.name, stage.version), root / "work" / stage.name
        work.mkdir(parents=True)
        inputs = {role: done[producer][0] for role, producer in stage.inputs.items()}
        metrics = module.run(OmegaConf.create(stage.config), inputs, out, work)
        path = artifacts.publish(str(root / "a"), stage.name, stage.version, out, kind=stage.kind,
                                 stage=stage.module, inputs={role: {"name": stage.inputs[role], "version": v}
                                                             for role, v in stage.input_versions.items()},
                                 config=stage.config, metrics=metrics, started_at=now(), ended_at=now())
        done[stage.name] = (Path(path), metrics)
    return done


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE")
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def r1_qwen_math(real_models, tmp_path_factory):
    return run_recipe(tmp_path_factory.mktemp("r1_qwen_math"),
                      ["model=qwen2.5-math-1.5b", f"model.source={real_models('qwen2.5-math-1.5b')}",
                       "data=openr1_math", "recipe=r1"])


def test_r1_recipe_runs_through_qwen25_math(r1_qwen_math):
    assert list(r1_qwen_math) == ["base", "eval_base", "cold_start_sft", "eval_cold_start_sft", "reasoning_grpo",
                                  "eval_reasoning_grpo", "rejection_sampling", "helpfulness_rm", "harmlessness_rm",
                                  "merged_sft_alignment", "eval_final", "report"]


def test_chat_sft_makes_the_end_of_turn_token_the_eos(r1_qwen_math):
    from transformers import AutoTokenizer, GenerationConfig

    for stage in ("cold_start_sft", "merged_sft_alignment"):
        path = r1_qwen_math[stage][0]
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.eos_token == "<|im_end|>"
        assert 151645 in GenerationConfig.from_pretrained(path).eos_token_id  # vLLM and generate stop there


def test_training_prompts_are_decontaminated_against_every_benchmark(r1_qwen_math):
    # the OpenR1 fixture repeats a MATH-500 problem and an AIME 2024 one among its first 8 (training) rows
    for stage in ("cold_start_sft", "reasoning_grpo", "rejection_sampling"):
        metrics = r1_qwen_math[stage][1]
        assert metrics["decontaminated_math500"] == 1 and metrics["decontaminated_aime24"] == 1, stage


def test_hh_rlhf_transcripts_train_the_reward_models_with_their_test_split_held_out(r1_qwen_math):
    for stage in ("helpfulness_rm", "harmlessness_rm"):
        metrics = r1_qwen_math[stage][1]
        assert (metrics["train_pairs"], metrics["eval_pairs"]) == {"helpfulness_rm": (6, 2),
                                                                   "harmlessness_rm": (4, 1)}[stage]


def test_evaluation_sets_differ_from_the_rl_prompts(r1_qwen_math):
    summary = json.loads((r1_qwen_math["eval_final"][0] / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"heldout", "math500", "aime24"}
    assert (r1_qwen_math["report"][0] / "report.md").is_file()


def test_r1_zero_recipe_runs_through_qwen25_instruct(real_models, tmp_path_factory):
    done = run_recipe(tmp_path_factory.mktemp("r1_zero"),
                      ["model=qwen2.5-7b-instruct", f"model.source={real_models('qwen2.5-7b-instruct')}",
                       "data=openr1_math", "recipe=r1_zero"])
    assert list(done) == ["base", "eval_base", "reasoning_grpo", "eval_reasoning_grpo", "report"]
    assert done["reasoning_grpo"][1]["decontaminated"] == 2


def test_distill_recipe_runs_from_llama_31_into_an_r1_distill_student(real_models, tmp_path_factory):
    """The teacher chain through Llama 3.1 (a template TRL cannot patch: prompt/completion SFT, <|eot_id|> as EOS),
    the student a think-prefilled R1-Distill-Qwen (TRL's patched template keeps the reasoning in the target)."""
    from transformers import AutoTokenizer, GenerationConfig

    done = run_recipe(tmp_path_factory.mktemp("distill"),
                      ["model=llama-3.1-8b", f"model.source={real_models('llama-3.1-8b')}",
                       "model@student=qwen2.5-math-1.5b",  # the paper's student family, with R1-Distill's files
                       f"student.source={real_models('deepseek-r1-distill-qwen-1.5b')}",
                       "data=openr1_math", "recipe=distill"])
    assert list(done) == ["base", "cold_start_sft", "reasoning_grpo", "rejection_sampling", "student_base", "distill",
                          "eval_distill", "report"]
    teacher = done["cold_start_sft"][0]
    assert AutoTokenizer.from_pretrained(teacher).eos_token == "<|eot_id|>"
    assert 128009 in GenerationConfig.from_pretrained(teacher).eos_token_id
    assert AutoTokenizer.from_pretrained(done["distill"][0]).eos_token == "<｜end▁of▁sentence｜>"


# ---------------------------------------------------------------------------------------------------------------------
# Stopping at the end of the turn, behaviourally: a checkpoint whose every next token is <|im_end|>

IM_END = 151645


def always_emits(src: Path, token_id: int, dst: Path) -> Path:
    """A copy of the (untied) checkpoint `src` that always predicts `token_id`: attention and MLP outputs are zero,
    so the last hidden state is the token's embedding; every embedding is the same vector, and only `token_id`'s
    lm_head row points along it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    model.to(torch.bfloat16).save_pretrained(dst)
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")  # eos <|endoftext|>, as the hub's
    return dst


def run_stage(module_name: str, key: str, overrides: list[str], inputs: dict, out: Path, model_source: str) -> dict:
    import importlib

    cfg = compose_config([*TINY, *DATA_OVERRIDES, "model=qwen2.5-math-7b", f"model.source={model_source}",
                          "data=openr1_math", *overrides])
    out.mkdir(parents=True)
    return importlib.import_module(f"stages.{module_name}").run(OmegaConf.select(cfg, key), inputs, out,
                                                                out.parent / f"{out.name}-work")


@pytest.fixture(scope="module")
def im_end_bot(real_models, tmp_path_factory):
    """(root, base checkpoint that always says <|im_end|>, its cold-start SFT at learning rate 0: same weights, the
    EOS fix applied)."""
    root = tmp_path_factory.mktemp("im_end_bot")
    base = always_emits(real_models("qwen2.5-math-7b"), IM_END, root / "base")
    sft = root / "sft"
    run_stage("cold_start_sft", "cold_start_sft", ["cold_start_sft.learning_rate=0", "cold_start_sft.max_steps=1",
                                                   "cold_start_sft.eval_samples=0"], {"model": base}, sft, str(base))
    return root, base, sft


def _eval_lengths(root, model, name, backend):
    run_stage("evaluate", "evaluate", [f"evaluate.backend={backend}", "evaluate.max_tokens=6"], {"model": model},
              root / name, str(model))
    return [length for line in (root / name / "records.jsonl").read_text().splitlines()
            for length in json.loads(line)["lengths"]]


def test_without_the_sft_eos_fix_generation_runs_past_the_turn(im_end_bot):
    root, base, _ = im_end_bot
    assert set(_eval_lengths(root, base, "eval_base", "hf")) == {6}  # the base's EOS is <|endoftext|>: no stop


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_evaluation_samples_stop_at_the_end_of_turn(im_end_bot, backend):
    root, _, sft = im_end_bot
    assert set(_eval_lengths(root, sft, f"eval_sft_{backend}", backend)) == {1}


def test_rejection_samples_stop_at_the_end_of_turn(im_end_bot):
    root, _, sft = im_end_bot
    metrics = run_stage("rejection_sampling", "rejection_sampling",
                        ["rejection_sampling.backend=vllm", "rejection_sampling.max_tokens=6"], {"model": sft},
                        root / "rejection", str(sft))
    assert metrics["samples_drawn"] > 0 and metrics["dropped_truncated"] == 0


def test_grpo_rollouts_stop_at_the_end_of_turn(im_end_bot):
    root, _, sft = im_end_bot
    run_stage("reasoning_grpo", "reasoning_grpo", ["reasoning_grpo.max_completion_length=6"], {"model": sft},
              root / "grpo", str(sft))
    history = [json.loads(line) for line in (root / "grpo" / "log_history.jsonl").read_text().splitlines()]
    step = next(e for e in history if "completions/mean_length" in e)
    assert step["completions/mean_length"] == 1 and step["completions/clipped_ratio"] == 0
