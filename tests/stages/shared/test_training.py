"""stages/trainers.py and stages/shared/plots.py: argument building, checkpoints, progress lines, summaries, plots."""
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState
from trl import GRPOConfig, SFTConfig

from pipeline.plan import compose_config
from stages.shared import hardware, logs, plots, trainers
from stages.shared.errors import UserError


def test_trainer_args_follow_the_hardware_node(tmp_path):
    cfg = compose_config([]).cold_start_sft
    args = trainers.trainer_args(SFTConfig, cfg, tmp_path, learning_rate=1e-3, warmup_ratio=0.1, max_steps=10)
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert not args.gradient_checkpointing and not args.dataloader_pin_memory
    assert args.optim == "adamw_torch" and args.disable_tqdm  # no terminal under pytest: lines, not a bar
    assert args.report_to == ["tensorboard"]  # run.report_to's default
    assert args.save_steps == cfg.save_steps and args.logging_steps == cfg.logging_steps
    assert args.seed == cfg.seed and args.output_dir == str(tmp_path)
    assert args.warmup_steps == 0.1  # transformers 5: a ratio below 1
    with pytest.raises(UserError, match="no_such_knob"):
        trainers.trainer_args(SFTConfig, cfg, tmp_path, no_such_knob=1)


def test_run_report_to_reaches_the_trainer_args(tmp_path, monkeypatch):
    monkeypatch.setenv(trainers.RUN_NAME_ENV, "reasoning_grpo-0123456789ab")
    for report_to, expected in (("none", []), ("[tensorboard,mlflow]", ["tensorboard", "mlflow"])):
        cfg = compose_config([f"run.report_to={report_to}"]).reasoning_grpo
        args = trainers.trainer_args(SFTConfig, cfg, tmp_path)
        assert args.report_to == expected and args.run_name == "reasoning_grpo-0123456789ab"
    with pytest.raises(UserError, match="run.report_to=.*'comet'.*unknown"):
        trainers.trainer_args(SFTConfig, compose_config(["run.report_to=comet"]).reasoning_grpo, tmp_path)


def test_gpu_hardware_gives_bf16_and_the_fused_optimizer(tmp_path):
    hw = dict(compose_config(["hardware=gpu"]).hardware)
    args = hardware.hardware_args(hw)
    if hardware.on_cpu(hw):  # no GPU here: still never bf16 on a CPU
        assert args["use_cpu"] and not args["bf16"]
    else:  # pragma: no cover
        assert args["bf16"] and not args["use_cpu"]
    assert args["optim"] == "adamw_torch_fused" and args["gradient_checkpointing"] is False


def test_thread_choice(monkeypatch):
    monkeypatch.setattr(hardware, "busy_cores", lambda: 0.1)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("R1FLOW_TORCH_THREADS", raising=False)
    assert hardware.pick_threads(2, cpu=True) == 2
    monkeypatch.setattr(hardware, "busy_cores", lambda: 0.9)
    assert hardware.pick_threads(2, cpu=True) == 1  # one core busy elsewhere: one thread
    assert hardware.pick_threads(2, cpu=False) == 2
    monkeypatch.setenv("R1FLOW_TORCH_THREADS", "2")
    assert hardware.pick_threads(2, cpu=True) == 2


def test_busy_cores_sees_a_spinning_process():
    import multiprocessing

    idle = hardware.busy_cores(0.3)
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.2)
        busy = hardware.busy_cores(0.5)
    finally:
        stop.set()
        spinner.join()
    assert 0.0 <= idle <= hardware.os.cpu_count()
    assert busy >= 0.7, (idle, busy)  # one core fully taken by the spinner


def _spin(stop):
    while not stop.is_set():
        pass


def test_last_checkpoint_skips_and_removes_incomplete_ones(tmp_path):
    assert trainers.last_checkpoint(tmp_path / "none") is None
    for step, complete in [(2, True), (4, True), (6, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-x").mkdir()
    assert trainers.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()


HISTORY = [{"step": s, "loss": 2.0 / s, "reward": 0.1 * s, "rewards/accuracy/mean": 0.05 * s,
            "rewards/format/mean": 0.1 * s, "completions/mean_length": 10 + s, "kl": 0.001 * s, "entropy": 1.0,
            "frac_reward_zero_std": 0.5, "clip_ratio/region_mean": 0.0, "grad_norm": float("nan")}
           for s in range(1, 11)] + [{"step": 5, "heldout/accuracy": 0.2, "heldout/format_rate": 0.5},
                                      {"step": 10, "heldout/accuracy": 0.4, "heldout/format_rate": 0.9},
                                      {"step": 10, "train_runtime": 12.5, "train_loss": 0.7}]


def test_log_history_roundtrip_and_summary(tmp_path):
    path = tmp_path / "log_history.jsonl"
    logs.write_log_history(HISTORY, path)
    back = logs.read_log_history(path)
    assert len(back) == len(HISTORY) and back[0]["grad_norm"] is None  # NaN is not JSON: null
    summary = logs.summarize(back)
    assert summary["first_reward"] == pytest.approx(0.1) and summary["last_reward"] == pytest.approx(1.0)
    assert summary["last_heldout_accuracy"] == 0.4 and summary["train_runtime"] == 12.5
    assert "first_grad_norm" not in summary and all(math.isfinite(v) for v in summary.values())
    assert logs.clean_metrics({"a": float("nan"), "b": 1, "c": True, "d": "x"}) == {"b": 1, "c": 1, "d": "x"}


def test_progress_line(caplog):
    caplog.set_level("INFO", logger="stages.shared.trainers")
    cb = trainers.ProgressCallback("grpo")
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 10, 0
    cb.on_train_begin(None, state, control)
    state.global_step = 5
    cb.on_log(None, state, control, logs={"reward": 0.5, "rewards/format/mean": 0.25, "kl": None,
                                          "completions/mean_length": 31.0})
    out = [r.getMessage() for r in caplog.records]
    assert out[0] == "grpo: training to step 10"
    assert out[1].startswith("step 5/10 reward=0.5 len=31 format=0.25 s/step=")
    caplog.clear()
    cb.on_log(None, state, control, logs={"train_runtime": 3.0})  # nothing worth a line
    assert caplog.records == []


def test_progress_line_times_steps_not_the_checkpoint_write_after_them(caplog, monkeypatch):
    """The line of the summary logged at the end of training comes after the last checkpoint is written: its s/step
    counts up to the end of the last step."""
    caplog.set_level("INFO", logger="stages.shared.trainers")
    now = [0.0]
    monkeypatch.setattr(trainers.time, "time", lambda: now[0])
    cb = trainers.ProgressCallback("sft")
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 2, 0
    cb.on_train_begin(None, state, control)
    for step in (1, 2):  # 10 s a step
        now[0], state.global_step = 10.0 * step, step
        cb.on_step_end(None, state, control)
    now[0] = 160.0  # then the checkpoint write
    cb.on_log(None, state, control, logs={"loss": 1.5, "train_runtime": 160.0})
    assert caplog.records[-1].getMessage().endswith("s/step=10.00")


def test_progress_line_and_metrics_show_the_trainings_peak_gpu_memory(caplog, monkeypatch, tmp_path):
    """On a GPU every line ends with this process's peak memory since training began (live / with the allocator's
    cache), and the artifact's metrics hold it: nvidia-smi's reading alone could not say whether a step fits.
    CUDA's counters are faked: this machine has none."""
    caplog.set_level("INFO", logger="stages.shared.trainers")
    peaks = {"allocated": 0, "reserved": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peaks.update(allocated=0, reserved=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: peaks["reserved"])
    cb = trainers.ProgressCallback("grpo")
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 4, 0
    peaks.update(allocated=50 * 2 ** 30, reserved=60 * 2 ** 30)  # the stage's loading, before training
    cb.on_train_begin(None, state, control)
    assert peaks == {"allocated": 0, "reserved": 0}
    peaks.update(allocated=int(12.25 * 2 ** 30), reserved=20 * 2 ** 30)
    state.global_step = 2
    cb.on_log(None, state, control, logs={"reward": 0.5})
    assert caplog.records[-1].getMessage().endswith("mem=12.2/20.0GiB")

    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"step": 2, "reward": 0.5}], global_step=2),
                              args=SimpleNamespace(output_dir=str(tmp_path / "ckpt")))
    monkeypatch.setattr(trainers, "save_model",  # the save gathers weights after the read: not the training's
                        lambda model, tokenizer, out: (Path(out).mkdir(parents=True),
                                                       peaks.update(allocated=70 * 2 ** 30)))
    metrics = trainers.finish(tmp_path / "out", None, None, trainer)
    assert metrics["gpu_peak_allocated_gib"] == 12.25 and metrics["gpu_peak_reserved_gib"] == 20.0
    trainer.resumed_from = 2  # a rerun that resumed at the last step trains nothing: no peak to report (not ~0)
    metrics = trainers.finish(tmp_path / "again", None, None, trainer)
    assert "gpu_peak_allocated_gib" not in metrics and metrics["resumed_from_step"] == 2


def test_plots_write_pngs(tmp_path):
    assert plots.plot_rl(HISTORY, tmp_path / "rl.png").stat().st_size > 5000
    assert plots.plot_loss(HISTORY, tmp_path / "loss.png").stat().st_size > 2000
    assert plots.plot_rl([{"step": 1, "loss": 1.0}], tmp_path / "none.png") is None


def test_grpo_batch_must_hold_whole_groups(tmp_path):
    cfg = compose_config(["reasoning_grpo.prompts_per_step=3", "reasoning_grpo.num_generations=4"]).reasoning_grpo
    from stages import reasoning_grpo

    args = trainers.grpo_args(cfg, tmp_path)
    assert isinstance(args, GRPOConfig) and args.generation_batch_size == 12


def _smoke_sft_trainer(smoke_base, work_dir, **overrides):
    from datasets import Dataset

    from stages.shared import models

    model, tok = models.load_model(smoke_base), models.load_tokenizer(smoke_base)
    cfg = compose_config(["size=smoke", "cold_start_sft.eval_samples=0",
                          *[f"cold_start_sft.{k}={v}" for k, v in overrides.items()]]).cold_start_sft
    data = Dataset.from_list([{"messages": [{"role": "user", "content": "What is 2+3?"},
                                            {"role": "assistant", "content": "<think>2+3=5</think> 5"}]}] * 4)
    return trainers.sft_trainer(cfg, model, tok, data, work_dir, name="cold_start_sft")


def test_padding_free_batches_are_drawn_at_random_padded_ones_grouped_by_length(smoke_base, tmp_path, monkeypatch):
    """Grouping by length saves padding only where batches are padded. Padding-free rows (a GPU's default) are drawn at
    random: grouped, the SFT benchmark's steps on an H100 ran from ~4k tokens to ~65k, 17% slower, 20 GB more."""
    from stages.shared import attention

    padded = _smoke_sft_trainer(smoke_base, tmp_path / "padded", max_steps=1)
    assert padded.args.train_sampling_strategy == "group_by_length"
    assert not getattr(padded.data_collator, "padding_free", False)
    monkeypatch.setattr(attention, "use_padding_free", lambda hardware, model=None: True)
    free = _smoke_sft_trainer(smoke_base, tmp_path / "free", max_steps=1)
    assert free.args.train_sampling_strategy == "random" and free.data_collator.padding_free
    packed = _smoke_sft_trainer(smoke_base, tmp_path / "packed", max_steps=1, packing=True)
    assert packed.args.train_sampling_strategy == "random" and packed.args.packing_strategy == "bfd"


class CheckpointSizes(TrainerCallback):
    """The bytes and files of each checkpoint as it is saved (before the next one replaces it)."""

    def __init__(self):
        self.sizes, self.files = {}, {}

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.sizes[state.global_step] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        self.files[state.global_step] = {f.name for f in path.iterdir()}


def test_the_checkpoint_estimate_is_what_the_trainer_writes(smoke_base, tmp_path):
    """checkpoint_bytes against a real checkpoint of the SFT trainer, one written before the last step: weights plus
    AdamW state, within 10% (the rest is the scheduler, RNG and JSON)."""
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=2, save_steps=1)
    sizes = CheckpointSizes()
    trainer.add_callback(sizes)
    estimate = trainers.checkpoint_bytes(trainer)
    trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    assert sizes.sizes[1] == pytest.approx(estimate, rel=0.10), (sizes.sizes, estimate)


def test_the_checkpoint_estimate_counts_fsdps_second_copy_of_the_weights(smoke_base, tmp_path):
    """Under FSDP transformers writes the weights twice per checkpoint (model.safetensors, then pytorch_model_fsdp.bin
    with the optimizer state): the estimate that guards the disk counts both."""
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=1, save_steps=1)
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    alone = trainers.checkpoint_bytes(trainer)
    trainer.is_fsdp_enabled = True  # what accelerate's FSDP plugin sets; the trainer is otherwise the same
    assert trainers.checkpoint_bytes(trainer) == alone + weights


def test_the_last_steps_checkpoint_holds_the_weights_and_a_rerun_loads_them(smoke_base, tmp_path):
    """After the last step nothing trains on, so its checkpoint skips AdamW, scheduler and RNG state (at 7B: 28 of
    ~114 GiB); a rerun in the same work dir (a crash before publishing) loads the final weights from it."""
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=2, save_steps=1)
    sizes = CheckpointSizes()
    trainer.add_callback(sizes)
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    assert {"optimizer.pt", "scheduler.pt"} <= sizes.files[1]  # mid-run: everything a resume needs
    assert not {"optimizer.pt", "scheduler.pt"} & sizes.files[2] and "trainer_state.json" in sizes.files[2]
    assert sizes.sizes[2] == pytest.approx(weights, rel=0.10) and sizes.sizes[2] < sizes.sizes[1] / 2
    assert not trainer.args.save_only_model  # the trainer's own setting is left as it was for a later train()
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    again = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=2, save_steps=1)
    assert trainers.train(again, tmp_path / trainers.CHECKPOINT_DIR) == 2 and again.state.global_step == 2
    for name, value in again.model.state_dict().items():
        torch.testing.assert_close(value, final[name], msg=name)

    # under FSDP (accelerate sets is_fsdp_enabled; the model is wrapped only inside trainer.train(), which a finished
    # run skips) transformers' loader would look for FSDP's own copy, which this checkpoint does not hold
    under_fsdp = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=2, save_steps=1)
    under_fsdp.is_fsdp_enabled = True
    assert trainers.train(under_fsdp, tmp_path / trainers.CHECKPOINT_DIR) == 2
    for name, value in under_fsdp.model.state_dict().items():
        torch.testing.assert_close(value, final[name], msg=name)


def test_training_refuses_to_start_where_one_checkpoint_does_not_fit(smoke_base, tmp_path, monkeypatch, caplog):
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=1, save_steps=1)
    one = trainers.checkpoint_bytes(trainer)
    usage = trainers.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(trainers.shutil, "disk_usage", lambda path: usage._replace(free=one // 2))
    with pytest.raises(UserError) as refused:
        trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    message = str(refused.value)
    assert str(tmp_path / trainers.CHECKPOINT_DIR) in message and "the first save would fail" in message
    assert "work_root=" in message and f"{one / 2**30:.1f} GiB" in message
    assert trainer.state.global_step == 0  # nothing trained

    # room for one checkpoint but not for the two the trainer holds while rotating: it trains, with a warning
    monkeypatch.setattr(trainers.shutil, "disk_usage", lambda path: usage._replace(free=3 * one // 2))
    with caplog.at_level("WARNING", logger=trainers.log.name):
        trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    assert trainer.state.global_step == 1
    assert any("holds up to 2 at a time" in r.getMessage() and "a later save may fail" in r.getMessage()
               for r in caplog.records)


def test_training_keeps_the_last_checkpoint_only(smoke_base, tmp_path):
    """Two at most on the disk while saving (the new one is complete before the old one goes), one after."""
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=3, save_steps=1)
    trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    assert [p.name for p in (tmp_path / trainers.CHECKPOINT_DIR).glob("checkpoint-*")] == ["checkpoint-3"]


def test_a_nan_loss_is_logged_as_nan_not_hidden(smoke_base, tmp_path, monkeypatch):
    """transformers' default (logging_nan_inf_filter) logs a NaN or inf step as the mean of the earlier ones: 0.0 for
    a first step. A diverging run must show its NaN in the log and the Prefect UI."""
    trainer = _smoke_sft_trainer(smoke_base, tmp_path, max_steps=2, save_steps=100, logging_steps=1)
    compute_loss = trainer.compute_loss

    def nan_on_the_second_step(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        if trainer.state.global_step == 1:
            return out * float("nan") if not isinstance(out, tuple) else (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(trainer, "compute_loss", nan_on_the_second_step)
    trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])
