"""Stage `merged_sft_alignment`: SFT from the BASE checkpoint, then GRPO where rule rewards score reasoning prompts and
reward models score general ones (helpfulness on the summary only), the paper's schedule, and a resumable smoke run."""
import json
from pathlib import Path
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.plan import compose_config, plan
from stages.shared import reward_models
from stages import merged_sft_alignment as msa
from stages.shared import models
from stages import reward_model
from stages.shared.errors import UserError


@pytest.fixture(scope="module")
def rm_artifacts(smoke_base, tmp_path_factory):
    """Both reward-model artifacts, trained for 2 steps from the smoke base."""
    cfg = compose_config(["size=smoke", "reward_model.helpfulness.max_steps=2",
                          "reward_model.harmlessness.max_steps=2"]).reward_model
    out = {}
    for name in ("helpfulness", "harmlessness"):
        out[name] = tmp_path_factory.mktemp(f"{name}_rm")
        reward_model.run(cfg[name], {"model": smoke_base}, out[name], tmp_path_factory.mktemp(f"{name}_work"))
    return out


@pytest.fixture(scope="module")
def rms(rm_artifacts):
    hardware = compose_config([]).hardware
    return {name: reward_models.load(path, hardware) for name, path in rm_artifacts.items()}


@pytest.fixture(scope="module")
def stage3_dataset(tmp_path_factory):
    """A small stage-3 dataset artifact: reasoning conversations and general ones, as rejection_sampling writes."""
    out = tmp_path_factory.mktemp("stage3")
    rows = []
    for path, kind, n in (("data/arith/cold_start.jsonl", "reasoning", 48), ("data/arith/general_sft.jsonl",
                                                                             "general", 16)):
        for line in open(path).readlines()[:n]:
            rows.append({"messages": json.loads(line)["messages"], "kind": kind})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


class Recorder:
    """Wraps a reward model's tokenizer and model and keeps every text that reaches them."""

    def __init__(self, model, tokenizer):
        self.texts, self.decoded = [], []
        outer = self

        class Tok:
            def __getattr__(self, name):
                return getattr(tokenizer, name)

            def __setattr__(self, name, value):
                setattr(tokenizer, name, value)

            def __call__(self, text, **kw):
                outer.texts.extend(text)
                return tokenizer(text, **kw)

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, input_ids, attention_mask):
                outer.decoded.extend(tokenizer.batch_decode(input_ids))
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        self.tokenizer, self.model = Tok(), Model()


RESPONSE = "<think>\nzebra plan: secret reasoning words\n</think>\nA kind and useful summary."


def test_helpfulness_scores_the_summary_only_and_harmlessness_the_whole_response(rms):
    state = SimpleNamespace(global_step=10)
    seen = {}
    for name, scope in (("helpfulness", "summary"), ("harmlessness", "whole")):
        model, tok, meta = rms[name]
        assert meta["scope"] == scope  # the scope travels with the artifact
        rec = Recorder(model, tok)
        fn = reward_models.rm_reward(name, rec.model, rec.tokenizer, scope=meta["scope"])
        scores = fn(completions=[[{"role": "assistant", "content": RESPONSE}]] * 2, question=["Hi?", "Hello?"],
                    prompts=[[{"role": "user", "content": "Hi?"}]] * 2, trainer_state=state)
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
        seen[name] = (rec.texts, rec.decoded)
    texts, decoded = seen["helpfulness"]
    assert texts and decoded
    for text in texts + decoded:
        assert "A kind and useful summary." in text
        assert "<think>" not in text and "</think>" not in text and "zebra" not in text and "secret" not in text
    texts, decoded = seen["harmlessness"]
    assert all("zebra" in t and "<think>" in t for t in texts + decoded)


def test_rewards_are_routed_by_prompt_kind_and_rms_wait_for_their_step(rms):
    cfg = compose_config(["size=smoke"]).merged_sft_alignment
    acfg = msa._node(cfg, "alignment")
    funcs, weights = msa.reward_functions(acfg, rms, from_step=3, row_kinds={"math"})  # code_format: no code rows
    names = [f.__name__ for f in funcs]
    assert names == ["accuracy", "format", "language_consistency", "helpfulness", "harmlessness"]
    assert weights == [1.0, 1.0, 0.1, 1.0, 1.0]
    good = "<think>\n2+2=4\n</think>\nThe answer is \\boxed{4}"
    batch = dict(prompts=[[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Hello!")] * 2,
                 completions=[[{"role": "assistant", "content": c}] for c in (good, RESPONSE)] * 2,
                 completion_ids=[[1]] * 4, kind=["reasoning", "general"] * 2, answer=["4", None] * 2,
                 question=["What is 2 + 2?", "Hello!"] * 2, language=["en"] * 4)
    late, early = SimpleNamespace(global_step=3), SimpleNamespace(global_step=2)
    out = {f.__name__: f(trainer_state=late, **batch) for f in funcs}
    for name in ("accuracy", "format", "language_consistency"):
        assert out[name][1] is None and out[name][3] is None, name  # general rows: not applicable
        assert out[name][0] == pytest.approx(1.0), name
    for name in ("helpfulness", "harmlessness"):
        assert out[name][0] is None and out[name][2] is None, name  # reasoning rows: not applicable
        assert isinstance(out[name][1], float), name
        assert all(v is None for v in funcs[names.index(name)](trainer_state=early, **batch)), name

    # a process whose completions are all of one kind still calls the other kind's functions, with no rows: a reward
    # model sharded over the processes must run its forwards on every process (reward_models.most_batches)
    reasoning_only = {k: v[::2] if isinstance(v, list) else v for k, v in batch.items()}
    calls = []
    spy = msa.ForKind(lambda completions, **kw: calls.append(len(completions)) or [0.5] * len(completions), "general")
    assert spy(trainer_state=late, **reasoning_only) == [None, None] and calls == [0]
    for f in funcs:  # every real reward takes the empty call
        got = f(trainer_state=late, **reasoning_only)
        if f.__name__ in ("helpfulness", "harmlessness"):
            assert got == [None, None], f.__name__
        else:
            assert all(isinstance(v, float) for v in got), f.__name__


def test_prompts_follow_the_schedule_reasoning_first_then_the_mix():
    cfg = compose_config(["merged_sft_alignment.alignment.max_steps=20",
                          "merged_sft_alignment.alignment.prompts_per_step=4"]).merged_sft_alignment
    acfg = msa._node(cfg, "alignment")
    train, held_out = msa.general_prompts(acfg)
    assert len(held_out) == acfg.eval_general_prompts and not {r["id"] for r in train} & {r["id"] for r in held_out}
    dataset, counts = msa.rl_dataset(acfg, train, from_step=15)
    kinds = dataset["kind"]
    assert len(kinds) == 20 * 4
    assert set(kinds[:60]) == {"reasoning"}  # steps 0-14: reasoning only
    assert kinds[60:].count("general") == counts["general_prompts"] == 9  # 45% of the last 5 steps x 4 prompts
    general = [r for r in dataset if r["kind"] == "general"]
    assert all(r["answer"] is None and r["question"] for r in general)


def test_r1_plan_feeds_the_base_checkpoint_not_the_rl_one():
    stages = {s.name: s for s in plan(compose_config([]))}
    stage = stages["merged_sft_alignment"]
    assert stage.inputs == {"base": "base", "dataset": "rejection_sampling", "helpfulness_rm": "helpfulness_rm",
                            "harmlessness_rm": "harmlessness_rm"}
    assert stage.input_versions["base"] == stages["base"].version
    assert stages["rejection_sampling"].inputs == {"model": "reasoning_grpo"}
    assert stages["helpfulness_rm"].inputs == {"model": "base"}
    assert stages["harmlessness_rm"].config["scope"] == "whole"


def test_without_a_base_input_the_stage_refuses(tmp_path):
    cfg = compose_config(["size=smoke"]).merged_sft_alignment
    with pytest.raises(UserError, match="base"):
        msa.run(cfg, {"model": tmp_path}, tmp_path / "out", tmp_path / "work")


def test_vllm_on_the_cpu_is_refused_naming_the_alignment_key_before_the_sft(tmp_path):
    """The paper preset turns vLLM on for the alignment RL; a CPU try must be told which key to turn off (not
    reasoning_grpo's), before the merged SFT spends its time."""
    cfg = compose_config(["size=smoke", "hardware=cpu", "merged_sft_alignment.alignment.use_vllm=true"])
    with pytest.raises(UserError, match=r"merged_sft_alignment\.alignment\.use_vllm=false"):
        msa.run(cfg.merged_sft_alignment, {"base": tmp_path / "none"}, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_the_merged_sfts_model_is_gone_before_the_rl_loads_its_policy(smoke_base, stage3_dataset, tmp_path,
                                                                      monkeypatch):
    """The finished SFT's model sits in reference cycles until the collector runs: under FSDP its fp32 shards and, in
    the allocator's cache, its AdamW state stayed on the GPUs beside the RL's policy, reference and reward models (the
    eleventh lease's 7B alignment RL started vLLM beside 56 GB per GPU). It is collected before the RL's policy
    loads, without waiting for the collector."""
    import gc
    import weakref

    cfg = compose_config(["size=smoke"]).merged_sft_alignment
    sft, load_policy, alive = msa.trainers.sft, msa.trainers.load_policy, []
    refs = {}

    def spy_sft(*args, **kwargs):
        model, trainer = sft(*args, **kwargs)
        refs.update(model=weakref.ref(model), optimizer=weakref.ref(trainer.optimizer))
        return model, trainer

    def spy_load(path, hw):
        alive.append({k: r() is not None for k, r in refs.items()})
        return load_policy(path, hw)

    monkeypatch.setattr(msa.trainers, "sft", spy_sft)
    monkeypatch.setattr(msa.trainers, "load_policy", spy_load)
    gc.disable()  # only the stage may collect
    try:
        msa.merged_sft(cfg, {"base": smoke_base, "dataset": stage3_dataset}, tmp_path / "work")
    finally:
        gc.enable()
    assert alive == [{}, {"model": False, "optimizer": False}]


def test_smoke_run_sft_from_base_then_alignment_resumes(smoke_base, stage3_dataset, rm_artifacts, tmp_path,
                                                       monkeypatch):
    # preference rewards from 3/4 of the 4 smoke steps: the first RM-scored step (3) differs from the first step
    cfg = compose_config(["size=smoke", "merged_sft_alignment.alignment.preference_rewards_from=0.75"]).merged_sft_alignment
    inputs = {"base": smoke_base, "dataset": stage3_dataset, "helpfulness_rm": rm_artifacts["helpfulness"],
              "harmlessness_rm": rm_artifacts["harmlessness"]}  # no "model": the RL checkpoint is not an input
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    loaded = []
    load_policy = msa.trainers.load_policy
    monkeypatch.setattr(msa.trainers, "load_policy", lambda path, hw: loaded.append(Path(path)) or load_policy(path, hw))
    metrics = msa.run(cfg, inputs, out, work)
    # RL starts from the saved SFT model, not the SFT trainer's object (under FSDP that one is wrapped, and the RL
    # trainer's FSDP wrap then fails: "Could not find the transformer layer class", on 2 and 4 H100s)
    assert loaded == [Path(smoke_base), work / "sft" / "model"]
    # the SFT's resume checkpoints are gone once its model is saved (they would sit beside the RL's on the disk)
    assert (work / "sft" / "model" / "metrics.json").is_file() and not (work / "sft" / "checkpoints").exists()
    assert list((work / "alignment" / "checkpoints").glob("checkpoint-*"))

    assert metrics["sft_samples"] == 64 and metrics["sft_global_step"] == cfg.sft.max_steps
    assert metrics["global_step"] == cfg.alignment.max_steps and metrics["preference_rewards_from_step"] == 3
    for key in ("before_accuracy", "eval_accuracy", "before_format_rate", "eval_format_rate", "before_rm_helpfulness",
                "eval_rm_helpfulness", "before_rm_harmlessness", "eval_rm_harmlessness", "delta_rm_helpfulness"):
        assert math.isfinite(metrics[key]), key
    # the merged SFT started from the base weights
    sft_model = AutoModelForCausalLM.from_pretrained(work / "sft" / "model")
    base_model = AutoModelForCausalLM.from_pretrained(smoke_base)
    assert sft_model.config.hidden_size == base_model.config.hidden_size
    assert not torch.equal(sft_model.lm_head.weight, base_model.lm_head.weight)
    # a plain checkpoint, RL log history with the RM scores from the preference step on, plots
    AutoModelForCausalLM.from_pretrained(out)
    assert not (out / "adapter_config.json").exists() and (out / "rl_curves.png").exists()
    assert (out / "sft_loss.png").exists() and (out / msa.SFT_LOG_HISTORY).exists()
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    rm_steps = [e["step"] for e in history if e.get("rewards/helpfulness/mean") is not None]
    assert rm_steps and min(rm_steps) == 4  # logged after step 4, which generated at global_step 3
    assert any(e.get("rewards/accuracy/mean") is not None for e in history)
    assert any("heldout/accuracy" in e for e in history)

    # a second attempt in the same work_dir: the SFT is not redone, the RL resumes from its last checkpoint
    out2 = tmp_path / "out2"
    out2.mkdir()
    again = msa.run(cfg, inputs, out2, work)
    assert again["resumed_from_step"] == cfg.alignment.max_steps
    assert again["before_accuracy"] == metrics["before_accuracy"]
    assert again["sft_train_seconds"] == pytest.approx(metrics["sft_train_seconds"])
    assert models.model_source(out2)[0] == str(out2)
