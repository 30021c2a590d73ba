"""Config composition and versioning: what runs is decided before anything runs."""

import pytest

from pipeline import plan as plan_module
from pipeline.plan import HASH_CACHE, code_files, compose_config, plan, versioned_view
from stages.shared.errors import UserError

RECIPES = ["r1", "r1_zero", "distill"]
MODELS = ["tiny", "qwen2.5-math-1.5b", "qwen2.5-math-7b", "qwen2.5-7b-instruct", "llama-3.1-8b"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_every_recipe_and_model_composes_without_downloading(recipe, model, tmp_path):
    cfg = compose_config([f"recipe={recipe}", f"model={model}", f"artifacts_root={tmp_path}"])
    stages = plan(cfg)
    assert [s.name for s in stages] == list(cfg.recipe.stages)
    assert all(len(s.version) == 12 for s in stages)
    if model != "tiny":  # real models carry the paper's values
        assert cfg.reasoning_grpo.beta == 0.001 and cfg.reasoning_grpo.epsilon == 10.0
        assert cfg.reasoning_grpo.num_generations == 16 and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("model", MODELS[1:])
def test_a_real_models_training_stages_leave_held_out_checks_to_the_vllm_evaluations(model):
    # In-stage checks go through HF generate. At the paper's lengths (8k new tokens) 200 questions before and after a
    # stage take hours on an H100; the eval_* stages measure the same checkpoints with vLLM.
    cfg = compose_config([f"model={model}"])
    for stage in ("cold_start_sft", "reasoning_grpo", "merged_sft_alignment", "distill"):
        assert cfg[stage].eval_samples == 0, stage
    general = cfg.merged_sft_alignment.alignment.eval_general_prompts
    assert general * cfg.merged_sft_alignment.eval_rm_samples <= 64  # the RM scores before/after: one batch


def test_r1_zero_uses_its_template_and_starts_grpo_from_base(tmp_path):
    stages = {s.name: s for s in plan(compose_config(["recipe=r1_zero", f"artifacts_root={tmp_path}"]))}
    assert stages["reasoning_grpo"].config["template"] == "r1_zero"
    assert stages["reasoning_grpo"].inputs == {"model": "base"}
    assert "cold_start_sft" not in stages
    # the paper's R1-Zero rewards: accuracy and format, no language consistency (that came with R1)
    from stages.shared import rewards

    weights = {k: float(v) for k, v in stages["reasoning_grpo"].config["rewards"].items()}
    funcs, _ = rewards.build_reward_functions(weights, template="r1_zero",
                                              verification=stages["reasoning_grpo"].config["verification"])
    assert sorted(f.__name__ for f in funcs) == ["accuracy", "format"]


def test_merged_sft_starts_from_the_base_not_the_rl_checkpoint(tmp_path):
    stages = {s.name: s for s in plan(compose_config([f"artifacts_root={tmp_path}"]))}
    merged = stages["merged_sft_alignment"]
    assert merged.inputs["base"] == "base"
    assert merged.input_versions["base"] == stages["base"].version
    assert "model" not in merged.inputs


def test_versions_are_deterministic_and_changes_propagate_downstream_only(tmp_path):
    root = f"artifacts_root={tmp_path}"
    a = {s.name: s.version for s in plan(compose_config([root]))}
    assert a == {s.name: s.version for s in plan(compose_config([root]))}
    b = {s.name: s.version for s in plan(compose_config([root, "reasoning_grpo.learning_rate=1e-5"]))}
    changed = {name for name in a if a[name] != b[name]}
    assert changed == {"reasoning_grpo", "eval_reasoning_grpo", "rejection_sampling", "merged_sft_alignment",
                       "eval_final", "report"}


def test_only_the_precision_keys_of_hardware_are_part_of_the_version(tmp_path):
    root = f"artifacts_root={tmp_path}"
    cpu = {s.name: s.version for s in plan(compose_config([root]))}
    how = ["hardware.torch_threads=1", "hardware.device=cuda", "hardware.launcher=accelerate",
           "hardware.num_processes=4", "hardware.dataloader_workers=3"]
    assert cpu == {s.name: s.version for s in plan(compose_config([root] + how))}
    for precision in ("hardware.bf16=true", "hardware.weights_dtype=bfloat16", "hardware.master_weights=optimizer"):
        other = {s.name: s.version for s in plan(compose_config([root, precision]))}
        assert other["reasoning_grpo"] != cpu["reasoning_grpo"] and other["base"] != cpu["base"], precision
    assert versioned_view({"hardware": {"bf16": True, "device": "cuda"}, "lr": 1}) == {"lr": 1,
                                                                                      "hardware": {"bf16": True}}


def test_a_local_model_directory_is_hashed_once_and_versioned(tmp_path, monkeypatch):
    model = tmp_path / "my-model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)
    overrides = [f"artifacts_root={tmp_path}/a", f"work_root={tmp_path}/w", f"model.source={model}"]
    first = {s.name: s for s in plan(compose_config(overrides))}
    assert str(model) in first["base"].fingerprints
    assert (tmp_path / "w" / HASH_CACHE).exists()

    hashed = []
    real = plan_module.sha256_file
    monkeypatch.setattr(plan_module, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    again = {s.name: s.version for s in plan(compose_config(overrides))}
    assert again == {name: s.version for name, s in first.items()}
    assert hashed == []  # nothing changed: every file's hash came from the cache

    (model / "sub" / "weights.bin").write_bytes(b"\x02" * 1000)
    changed = {s.name: s.version for s in plan(compose_config(overrides))}
    assert hashed == [str(model / "sub" / "weights.bin")]  # only the file that changed is read again
    assert changed["base"] != first["base"].version and changed["report"] != first["report"].version


def test_code_files_follow_project_imports_transitively(tmp_path):
    files = {
        "stages/__init__.py": "",
        "stages/my_stage.py": "import os\nfrom stages.shared import data\n\ndef run():\n    from .shared.rewards "
                              "import accuracy\n",
        "stages/shared/__init__.py": "",
        "stages/shared/data.py": "import json\nfrom . import templates\n",
        "stages/shared/templates.py": "X = 1\n",
        "stages/shared/rewards/__init__.py": "from stages.shared.rewards.format import check\n",
        "stages/shared/rewards/accuracy.py": "from ..errors import UserError\n",
        "stages/shared/rewards/format.py": "def check(): pass\n",
        "stages/shared/errors.py": "class UserError(Exception): pass\n",
        "stages/shared/unused.py": "",
        "stages/other_stage.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    code = code_files("my_stage", tmp_path)
    assert set(code) == set(files) - {"stages/shared/unused.py", "stages/other_stage.py"}
    (tmp_path / "stages/shared/errors.py").write_text("class UserError(ValueError): pass\n")
    after = code_files("my_stage", tmp_path)
    assert [k for k in code if code[k] != after[k]] == ["stages/shared/errors.py"]


def test_versions_cover_the_code_of_each_stage():
    stages = {s.name: s for s in plan(compose_config([]))}
    assert "stages/reasoning_grpo.py" in stages["reasoning_grpo"].code
    assert "stages/report.py" not in stages["reasoning_grpo"].code
    assert stages["eval_base"].code == stages["eval_final"].code  # one module, one set of sources


def test_smoke_size_shrinks_budgets(tmp_path):
    full = compose_config([])
    smoke = compose_config(["size=smoke"])
    assert smoke.reasoning_grpo.max_steps < full.reasoning_grpo.max_steps
    assert smoke.base.max_steps < full.base.max_steps
    assert smoke.evaluate.max_questions < full.evaluate.max_questions


def test_data_file_content_is_part_of_the_version(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    overrides = [f"artifacts_root={tmp_path}", f"data.files.rl_train={data}"]
    before = {s.name: s for s in plan(compose_config(overrides))}
    assert str(data) in before["reasoning_grpo"].fingerprints
    data.write_text('{"prompt": "1+2", "answer": "3"}\n')
    after = {s.name: s for s in plan(compose_config(overrides))}
    assert after["reasoning_grpo"].version != before["reasoning_grpo"].version
    assert after["cold_start_sft"].version == before["cold_start_sft"].version


@pytest.mark.parametrize("overrides, needle", [
    (["reasoning_grpo.lrr=1"], "reasoning_grpo.lrr"),
    (["recipe=nope"], "recipe/nope"),
    (["model=gpt-17"], "model/gpt-17"),
])
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(UserError, match="config error") as err:
        compose_config(overrides)
    assert needle in str(err.value)


def test_unknown_stage_and_bad_pin_are_clear(tmp_path):
    cfg = compose_config([f"artifacts_root={tmp_path}"])
    with pytest.raises(UserError, match="unknown stage 'nope'.*its stages are: base"):
        plan(cfg, latest_inputs_for="nope")
    cfg = compose_config([f"artifacts_root={tmp_path}", "+recipe.pins.nope=abc"])
    with pytest.raises(UserError, match="recipe.pins names 'nope'"):
        plan(cfg)


def test_rerunning_one_stage_needs_its_inputs_in_the_store(tmp_path):
    cfg = compose_config([f"artifacts_root={tmp_path}"])
    with pytest.raises(UserError, match="needs input 'model' from stage 'base'"):
        plan(cfg, latest_inputs_for="cold_start_sft")


def test_recipe_entry_overrides_reach_only_that_stage(tmp_path):
    stages = {s.name: s for s in plan(compose_config([f"artifacts_root={tmp_path}"]))}
    assert stages["eval_base"].config["template"] == "r1_zero"
    assert stages["eval_cold_start_sft"].config["template"] == "r1"


def test_override_of_an_unknown_key_is_refused(tmp_path):
    cfg = compose_config([f"artifacts_root={tmp_path}", "+recipe.stages.eval_base.overrides.tempalte=x"])
    with pytest.raises(UserError, match="tempalte"):
        plan(cfg)


# The typed schema (stages/shared/schema.py): every key has its one default in conf/, names and types are checked.

@pytest.mark.parametrize("overrides", [[], ["model=qwen2.5-math-1.5b"], ["model=qwen2.5-math-7b", "hardware=multi_gpu"],
                                       ["model=llama-3.1-8b", "data=openr1_math"], ["model=random_300m", "hardware=gpu"],
                                       ["recipe=r1_zero"], ["recipe=distill"], ["size=smoke"]])
def test_every_key_has_a_value_in_conf(overrides):
    from omegaconf import OmegaConf

    assert OmegaConf.missing_keys(compose_config(overrides)) == set()


def test_schema_names_the_key_of_a_wrong_type_or_a_misspelt_key():
    with pytest.raises(UserError, match="reasoning_grpo.max_steps"):
        compose_config(["reasoning_grpo.max_steps=many"])
    with pytest.raises(UserError, match="lrr"):
        compose_config(["reasoning_grpo.lrr=1e-5"])
    with pytest.raises(UserError, match="weights_dtype"):
        compose_config(["hardware.weights_dtype=[1]"])


def test_trl_fields_pass_through_under_their_own_names(tmp_path):
    """A GRPOConfig field that conf/ sets reaches TRL without a line of stage code (here one TRL knob that changes the
    objective, pinned in conf/reasoning_grpo/default.yaml against TRL's default)."""
    from stages.shared import trainers

    cfg = compose_config(["reasoning_grpo.use_bias_correction_kl=true", "reasoning_grpo.top_p=0.9"]).reasoning_grpo
    args = trainers.grpo_args(cfg, tmp_path)
    assert args.use_bias_correction_kl is True and args.top_p == 0.9
    default = trainers.grpo_args(compose_config([]).reasoning_grpo, tmp_path)
    assert default.use_bias_correction_kl is False and default.vllm_importance_sampling_correction is False


def test_a_real_student_brings_no_preset_and_a_real_model_and_student_compose():
    """The paper preset follows `model` (conf/preset/<model>.yaml), not `model@student`: a real student alone leaves
    the embedded budgets, and a real teacher with a real student composes (the preset was included twice before)."""
    tiny_teacher = compose_config(["model@student=qwen2.5-math-1.5b"])
    assert tiny_teacher.student.name == "qwen2.5-math-1.5b"
    assert tiny_teacher.cold_start_sft.learning_rate == compose_config([]).cold_start_sft.learning_rate
    both = compose_config(["model=llama-3.1-8b", "model@student=qwen2.5-math-1.5b", "recipe=distill"])
    assert both.cold_start_sft.learning_rate == 5.0e-5 and both.student.source == "Qwen/Qwen2.5-Math-1.5B"
