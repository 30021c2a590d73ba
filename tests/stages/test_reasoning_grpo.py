"""Stage `reasoning_grpo`: the config reaches TRL's GRPOConfig, a real smoke run saves a plain checkpoint with its RL
curves, and a crash after a checkpoint resumes from that checkpoint's step."""
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from pipeline.plan import compose_config
from stages.shared import trainers
from stages import reasoning_grpo
from stages.shared.errors import UserError


def test_grpo_config_carries_every_rl_knob_from_conf(tmp_path):
    cfg = compose_config(["model=qwen2.5-math-1.5b"]).reasoning_grpo  # the paper preset
    args = trainers.grpo_args(cfg, tmp_path, [1.0, 1.0, 0.1])
    assert (args.beta, args.epsilon, args.num_generations, args.loss_type) == (0.001, 10.0, 16, "grpo")
    assert args.epsilon_high == 10.0  # TRL: None means the same as epsilon
    assert args.learning_rate == 3e-6 and args.temperature == 1.0 and args.max_completion_length == 8192
    assert args.scale_rewards == "group" and args.sync_ref_model and args.ref_model_sync_steps == 400
    assert args.ref_model_mixup_alpha == 1.0
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32 * 16  # 32 prompts x G
    assert args.generation_batch_size == 16 * 512 and args.steps_per_generation == 16 * 32  # 16 minibatches
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert args.generation_kwargs == {"detokenize": False}  # colocated vLLM: token ids only, no detokenization
    assert args.reward_weights == [1.0, 1.0, 0.1]
    assert args.save_steps == 100 and args.output_dir == str(tmp_path)

    tiny = compose_config([]).reasoning_grpo
    args = trainers.grpo_args(tiny, tmp_path)
    assert not args.bf16 and args.use_cpu and not args.gradient_checkpointing and not args.dataloader_pin_memory
    assert args.disable_tqdm and args.report_to == ["tensorboard"]  # run.report_to, the default tracker
    assert args.generation_kwargs is None  # HF generate: TRL's own generation config
    for key in ("beta", "epsilon", "num_generations", "loss_type", "temperature", "max_completion_length",
                "learning_rate"):
        assert getattr(args, key) == tiny[key], key


def test_enforce_eager_reaches_trls_colocated_engine(monkeypatch):
    """TRL builds its colocated engine with trl.generation.vllm_generation.LLM(...) and takes no enforce_eager: inside
    colocated_engine_args that constructor gets hardware.vllm.enforce_eager, and only there."""
    import trl.generation.vllm_generation as trl_vllm

    seen = []
    monkeypatch.setattr(trl_vllm, "LLM", lambda **kw: seen.append(kw), raising=False)
    with trainers.colocated_engine_args({"vllm": {"enforce_eager": True}}):
        trl_vllm.LLM(model="m", gpu_memory_utilization=0.3)
    trl_vllm.LLM(model="m")
    with trainers.colocated_engine_args({"vllm": {"enforce_eager": False}}):
        trl_vllm.LLM(model="m")
    assert seen == [{"enforce_eager": True, "model": "m", "gpu_memory_utilization": 0.3}, {"model": "m"},
                    {"model": "m"}]


def test_memory_the_trainer_no_longer_uses_is_released_before_trls_engine_starts(monkeypatch):
    """vLLM sizes the colocated engine from the driver's free memory: garbage in reference cycles (a finished trainer's
    model) and the CUDA allocator's cached blocks would count as used. Both go before the constructor runs."""
    import gc
    import weakref

    import trl.generation.vllm_generation as trl_vllm

    class Model:  # a finished trainer's model: reachable from its own reference cycle only
        pass

    model = Model()
    model.self = model
    gone = weakref.ref(model)
    del model
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(trl_vllm, "LLM", lambda **kw: (gone() is None, list(emptied)), raising=False)
    gc.disable()  # only the release may collect the cycle
    try:
        with trainers.colocated_engine_args({"vllm": {"enforce_eager": False}}):
            assert trl_vllm.LLM(model="m") == (True, [True])
    finally:
        gc.enable()


def test_bad_knobs_are_user_errors(tmp_path):
    for override, match in [("reasoning_grpo.loss_type=ppo", "loss_type"),
                            ("reasoning_grpo.sync_ref_model=true", "beta"),
                            ("reasoning_grpo.num_generations=1", "num_generations")]:
        with pytest.raises(UserError, match=match):
            trainers.grpo_args(compose_config([override, "reasoning_grpo.beta=0.0"]).reasoning_grpo, tmp_path)
    with pytest.raises(UserError, match="GPU|vLLM"):
        trainers.check_vllm(compose_config(["reasoning_grpo.use_vllm=true"]).reasoning_grpo)


class Capture(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.args = args


class CrashAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after the checkpoint of step {self.step}")


def test_smoke_run_with_paper_objective_then_crash_and_resume(smoke_base, tmp_path):
    """A real GRPO run with β>0 (reference model, k3 KL), ε=10, loss grpo, the reference reset every 2 steps:
    it crashes after the step-2 checkpoint, the rerun resumes there and ends at step 4 with a plain checkpoint."""
    cfg = compose_config(["size=smoke", "reasoning_grpo.beta=0.001", "reasoning_grpo.epsilon=10",
                          "reasoning_grpo.loss_type=grpo", "reasoning_grpo.sync_ref_model=true",
                          "reasoning_grpo.ref_model_sync_steps=2", "reasoning_grpo.eval_steps=2"]).reasoning_grpo
    assert cfg.max_steps == 4 and cfg.save_steps == 2
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        reasoning_grpo.run(cfg, {"model": smoke_base}, out, work, callbacks=[CrashAfterSave(2)])
    assert (work / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert not (work / "checkpoints" / "checkpoint-4").exists()

    capture = Capture()
    metrics = reasoning_grpo.run(cfg, {"model": smoke_base}, out, work, callbacks=[capture])
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    # the last step's checkpoint: the weights only (nothing trains on; no AdamW state, no reference)
    final = work / "checkpoints" / "checkpoint-4"
    assert (final / "model.safetensors").exists() and (final / "trainer_state.json").exists()
    assert not (final / "optimizer.pt").exists() and not (final / trainers.REFERENCE_FILE).exists()
    a = capture.args
    assert (a.beta, a.epsilon, a.num_generations, a.loss_type) == (0.001, 10.0, cfg.num_generations, "grpo")
    assert a.sync_ref_model and a.max_completion_length == cfg.max_completion_length

    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in history if "reward" in e]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's state, 3-4 after the resume
    logged = {k for e in history for k in e}
    for key in ("reward", "rewards/accuracy/mean", "rewards/format/mean", "rewards/language_consistency/mean",
                "kl", "entropy", "completions/mean_length", "clip_ratio/region_mean", "frac_reward_zero_std",
                "heldout/accuracy"):
        assert key in logged, key
    for key in ("last_reward", "last_kl", "last_entropy", "last_completions_mean_length", "eval_accuracy",
                "eval_format_rate"):
        assert math.isfinite(metrics[key]), key
    assert (out / "rl_curves.png").stat().st_size > 5000
    # the answer checks of this run, counted by the verification pool (a timeout would be retried, then None)
    assert metrics["verify_checks"] > 0 and metrics["verify_pool_calls"] >= metrics["verify_checks"]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft, no TRL patches
    assert model.config.model_type == "qwen3"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


def _kl_by_step(out):
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return {e["step"]: e["kl"] for e in history if "kl" in e}


def test_resume_mid_interval_keeps_the_synced_reference(smoke_base, tmp_path):
    """sync_ref_model resets the reference to the policy every 2 steps. A run that crashes after the step-2
    checkpoint and resumes measures step 3's KL against the policy of step 2, as the uninterrupted run does (there it
    is ~0: the policy that samples step 3 is the reference), not against the initial model, which is what a resume
    without the saved reference (TRL alone, the control) gives."""
    cfg = compose_config(["size=smoke", "reasoning_grpo.beta=0.04", "reasoning_grpo.sync_ref_model=true",
                          "reasoning_grpo.ref_model_sync_steps=2", "reasoning_grpo.max_steps=3",
                          "reasoning_grpo.eval_samples=0"]).reasoning_grpo
    assert cfg.save_steps == 2 and cfg.logging_steps == 1
    straight = tmp_path / "straight"
    straight.mkdir()
    reasoning_grpo.run(cfg, {"model": smoke_base}, straight, tmp_path / "work_straight")
    expected = _kl_by_step(straight)

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        reasoning_grpo.run(cfg, {"model": smoke_base}, tmp_path / "crashed", work, callbacks=[CrashAfterSave(2)])
    checkpoint = work / "checkpoints" / "checkpoint-2"
    assert (checkpoint / trainers.REFERENCE_FILE).exists()
    control_work = tmp_path / "work_control"
    shutil.copytree(work, control_work)
    (control_work / "checkpoints" / "checkpoint-2" / trainers.REFERENCE_FILE).unlink()

    resumed, control = tmp_path / "resumed", tmp_path / "control"
    resumed.mkdir()
    control.mkdir()
    assert reasoning_grpo.run(cfg, {"model": smoke_base}, resumed, work)["resumed_from_step"] == 2
    assert reasoning_grpo.run(cfg, {"model": smoke_base}, control, control_work)["resumed_from_step"] == 2
    got, lost = _kl_by_step(resumed), _kl_by_step(control)
    print(f"kl by step: uninterrupted {expected}, resumed {got}, resumed without the reference {lost}")
    assert expected[3] < 1e-6 and got[3] == pytest.approx(expected[3], abs=1e-6)
    assert lost[3] > 100 * max(expected[3], 1e-8)  # the control shows the check can fail
