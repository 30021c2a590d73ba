"""GRPOConfig from conf/: every field that changes the objective follows the config, the step batch is global over
processes, lengths fit the model."""
import pytest

from pipeline.plan import compose_config
from stages.shared import trainers
from stages.shared.errors import UserError

# a value unlike TRL's default for every objective field
CHANGED = {"beta": 0.01, "epsilon": 10.0, "epsilon_high": 12.0, "delta": 1.5, "loss_type": "grpo",
           "scale_rewards": "batch", "num_iterations": 2, "mask_truncated_completions": True,
           "top_entropy_quantile": 0.5, "importance_sampling_level": "sequence", "use_bias_correction_kl": True,
           "off_policy_mask_threshold": 0.5, "vllm_importance_sampling_correction": True,
           "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 2.0,
           "vllm_importance_sampling_clip_min": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 7,
           "ref_model_mixup_alpha": 0.5, "temperature": 0.7, "top_p": 0.9, "max_completion_length": 40}


def _args(tmp_path, overrides=(), **kwargs):
    cfg = compose_config([f"reasoning_grpo.{k}={v}" for k, v in overrides]).reasoning_grpo
    return trainers.grpo_args(cfg, tmp_path, **kwargs)


def test_every_objective_field_is_set_from_the_config(tmp_path):
    assert set(CHANGED) == set(trainers.OBJECTIVE_FIELDS)
    args = _args(tmp_path, CHANGED.items())
    for field, value in CHANGED.items():
        assert getattr(args, field) == value, field


def test_the_r1_objective_pins_trls_moving_defaults(tmp_path):
    from trl import GRPOConfig

    args = _args(tmp_path)
    assert args.use_bias_correction_kl is False and GRPOConfig.use_bias_correction_kl is True  # TRL's default differs
    assert args.importance_sampling_level == "token"


def test_prompts_per_step_is_global_over_processes(tmp_path, monkeypatch):
    over = [("prompts_per_step", 8), ("num_generations", 4), ("gradient_accumulation_steps", 2)]
    assert _args(tmp_path, over).per_device_train_batch_size == 16
    monkeypatch.setattr(trainers, "world_size", lambda: 4)  # what WORLD_SIZE says under accelerate launch
    assert _args(tmp_path, over).per_device_train_batch_size == 4  # 8 x 4 samples over 2 x 4 passes
    monkeypatch.setattr(trainers, "world_size", lambda: 3)
    with pytest.raises(UserError, match=r"prompts_per_step x num_generations = 32 .* 2 x 3"):
        _args(tmp_path, over)


def test_the_reference_model_loads_whole_on_each_process_under_several(tmp_path, monkeypatch):
    kl = [("beta", 0.001), ("gradient_accumulation_steps", 1)]  # beta > 0: TRL loads a reference model
    assert "device_map" not in (_args(tmp_path, kl).model_init_kwargs or {})  # one process: TRL's "auto", the GPU
    monkeypatch.setattr(trainers, "world_size", lambda: 4)
    # TRL's "auto" would spread it over every GPU of the host in each FSDP process
    assert _args(tmp_path, kl, revision="abc123").model_init_kwargs == {"revision": "abc123", "device_map": None}
    assert _args(tmp_path, [("gradient_accumulation_steps", 1)], revision="abc123").model_init_kwargs is None  # beta 0


def test_under_fsdp_with_bf16_the_reference_is_stored_in_bf16(tmp_path, monkeypatch):
    """FSDP's bf16 mixed precision computes the reference in bf16 whatever it is stored in (the two-process test in
    tests/stages/test_fsdp_save.py: the same logits bit for bit), so it loads in bf16: half its memory. One process
    (fp32 weights under autocast) and fp32 compute keep TRL's fp32 reference."""
    kl = ["reasoning_grpo.beta=0.001", "reasoning_grpo.gradient_accumulation_steps=1"]

    def reference(*overrides):
        cfg = compose_config([*kl, *overrides]).reasoning_grpo
        return trainers.grpo_args(cfg, tmp_path).model_init_kwargs or {}

    assert "dtype" not in reference("hardware=gpu")
    monkeypatch.setattr(trainers, "world_size", lambda: 4)
    assert reference("hardware=multi_gpu") == {"device_map": None, "dtype": "bfloat16"}
    assert "dtype" not in reference("hardware=multi_gpu", "hardware.bf16=false")
    assert "dtype" not in reference("hardware=multi_gpu", "hardware.fsdp=''")  # several processes without FSDP: DDP
    reset = reference("hardware=multi_gpu", "reasoning_grpo.sync_ref_model=true")  # alpha 1: the policy copied over
    assert reset["dtype"] == "bfloat16"
    mixed = ("hardware=multi_gpu", "reasoning_grpo.sync_ref_model=true", "reasoning_grpo.ref_model_mixup_alpha=0.6")
    assert "dtype" not in reference(*mixed)  # each mix of the policy into it would round to bf16


def test_completions_are_capped_at_the_context_after_the_prompt(tmp_path):
    args = _args(tmp_path, [("max_completion_length", 8192)], longest_prompt=200, context=4096)
    assert args.max_completion_length == 3896


def test_the_paper_preset_puts_colocated_vllm_to_sleep_on_a_gpu_only(tmp_path):
    # one 80 GB GPU holds the 1.5B trainer and vLLM at the paper's lengths only in turn (conf/preset/paper.yaml)
    for hardware, asleep in (("gpu", True), ("cpu", False)):  # vLLM's CPU build has no sleep mode
        cfg = compose_config(["model=qwen2.5-math-1.5b", f"hardware={hardware}"]).reasoning_grpo
        assert cfg.hardware.vllm.enable_sleep_mode is True
        assert trainers.grpo_args(cfg, tmp_path / hardware).vllm_enable_sleep_mode is asleep
