"""stages/shared/precision.py: bf16 weights in the model, fp32 master weights in the optimizer (SFT on one GPU)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.plan import compose_config
from stages.shared import precision, trainers
from stages.shared.errors import UserError

GPU = {"device": "cuda", "bf16": True, "master_weights": "optimizer"}


@pytest.fixture
def gpu(monkeypatch):
    """The CPU stands in for the GPU: precision.py sees one, the trainer still computes on the CPU."""
    monkeypatch.setattr(precision, "on_cpu", lambda hardware: False)


def test_master_weights_keep_the_updates_that_bf16_weights_round_away(gpu):
    """Five AdamW steps at an RL learning rate: the fp32 masters follow fp32 AdamW exactly, the model's weights are
    their bf16 rounding, and restore puts the fp32 weights back. Pure bf16 weights do not move."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64)
    for p in model.parameters():  # weights of ordinary size (|w| ~ 0.5): an update of 1e-5 is below their last bit
        torch.nn.init.normal_(p, std=0.5)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = torch.nn.Linear(256, 64)
    reference.load_state_dict(model.state_dict())
    pure = torch.nn.Linear(256, 64).to(torch.bfloat16)
    pure.load_state_dict(model.state_dict())

    masters = precision.bf16_weights_for_training(model, GPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and len(masters) == 2
    assert all(torch.equal(masters[p], init[n]) for n, p in model.named_parameters())
    opt = precision.MasterWeightsAdamW(list(model.parameters()), lr=1e-5, weight_decay=0.0)
    masters = precision.master_weights(model)  # now views into the optimizer's flat fp32 tensor
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-5, weight_decay=0.0)
    pure_opt = torch.optim.AdamW(pure.parameters(), lr=1e-5, weight_decay=0.0)
    for _ in range(5):
        grads = [torch.randn_like(p, dtype=torch.float32).bfloat16() for p in reference.parameters()]
        for net, o in ((model, opt), (reference, ref_opt), (pure, pure_opt)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.to(p.dtype)
            o.step()
            o.zero_grad()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(masters[p], ref.detach(), rtol=0, atol=1e-7, msg=name)
        assert torch.equal(p.detach(), ref.detach().bfloat16()), name
        assert (ref.detach() != init[name]).float().mean() > 0.99  # fp32 AdamW moved every weight
    assert all((p.detach().float() != init[n].bfloat16().float()).float().mean() < 0.05
               for n, p in pure.named_parameters())  # pure bf16: rounded away
    assert all(p.grad is None for p in model.parameters())  # zero_grad clears the model's bf16 gradients too

    precision.restore_master_weights(model)
    for p, ref in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), ref.detach())
    assert precision.master_weights(model) == {}


def test_gradient_accumulation_sums_in_fp32_and_rounds_once(gpu):
    """Four micro-batches (the Trainer sets accelerate's sync_gradients on the last): a gradient of 1 plus three of
    2^-9 sums to 1.0078 in fp32 rounded once, where bf16 accumulation stays at 1 (each 2^-9 is below 1's last bit)."""
    from accelerate.state import GradientState

    model = torch.nn.Linear(1, 1, bias=False)
    precision.bf16_weights_for_training(model, GPU)
    precision.MasterWeightsAdamW(list(model.parameters()), accumulation_steps=4, lr=1e-3)
    state = GradientState()
    try:
        for i, scale in enumerate([1.0, 2.0**-9, 2.0**-9, 2.0**-9]):
            state._set_sync_gradients(i == 3)
            model(torch.full((1, 1), scale, dtype=torch.bfloat16)).sum().backward()
            assert (model.weight.grad is None) == (i < 3)  # summed in fp32 meanwhile, not held in bf16
    finally:
        state._set_sync_gradients(True)
    assert model.weight.grad.item() == torch.tensor(1 + 3 * 2.0**-9).bfloat16().item() == 1.0078125
    plain = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    for scale in [1.0, 2.0**-9, 2.0**-9, 2.0**-9]:
        plain(torch.full((1, 1), scale, dtype=torch.bfloat16)).sum().backward()
    assert plain.weight.grad.item() == 1.0


def test_the_setting_is_checked_and_stays_out_where_it_does_not_apply(gpu):
    from trl import SFTConfig

    model = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match="hardware.master_weights='fp32'.*optimizer.*model"):
        precision.bf16_weights_for_training(model, {**GPU, "master_weights": "fp32"})
    for hardware, sharded in (({**GPU, "master_weights": "model"}, False), ({**GPU, "bf16": False}, False),
                              (GPU, True)):
        assert precision.bf16_weights_for_training(model, hardware, sharded=sharded) == {}
        assert model.weight.dtype == torch.float32
    assert precision.master_weights_optimizer(SFTConfig(output_dir="/tmp/x", use_cpu=True), {}) is None
    masters = precision.bf16_weights_for_training(model, GPU)
    assert set(masters) == set(model.parameters())
    with pytest.raises(UserError, match="hardware.optim=adafactor.*hardware.master_weights=model"):
        precision.master_weights_optimizer(SFTConfig(output_dir="/tmp/x", use_cpu=True, optim="adafactor"), masters)
    cls, kwargs = precision.master_weights_optimizer(
        SFTConfig(output_dir="/tmp/x", use_cpu=True, learning_rate=3e-4, gradient_accumulation_steps=8), masters)
    assert cls is precision.MasterWeightsAdamW and kwargs["lr"] == 3e-4 and kwargs["accumulation_steps"] == 8


class StopAfter(trainers.TrainerCallback):
    """A crash after `step` steps (their checkpoint written)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("crash")


def _sft(smoke_base, work_dir, master_weights="optimizer", **overrides):
    """The SFT stage's trainer on the smoke base (CPU: bf16 weights without autocast) and the model it trains."""
    from datasets import Dataset

    from stages.shared import models

    model, tok = models.load_model(smoke_base), models.load_tokenizer(smoke_base)
    cfg = compose_config(["size=smoke", "cold_start_sft.eval_samples=0", "hardware.bf16=true",
                          f"hardware.master_weights={master_weights}", "cold_start_sft.learning_rate=1e-3",
                          *[f"cold_start_sft.{k}={v}" for k, v in overrides.items()]]).cold_start_sft
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i}+3?"},
                                            {"role": "assistant", "content": f"<think>{i}+3={i + 3}</think> {i + 3}"}]}
                              for i in range(8)])
    return trainers.sft_trainer(cfg, model, tok, data, work_dir, name="cold_start_sft"), model


def test_sft_trains_bf16_weights_and_resumes_and_saves_the_fp32_masters(gpu, smoke_base, tmp_path):
    """Through TRL's SFTTrainer: the model trains in bf16 while AdamW steps the fp32 masters; the final checkpoint
    and the model afterwards hold the fp32 weights; a run that crashed after step 1 resumes from that checkpoint's
    masters (its model file holds only their bf16 rounding) to the same weights as a run that did not crash."""
    straight, model = _sft(smoke_base, tmp_path / "a", max_steps=3, save_steps=1)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert isinstance(straight.create_optimizer(), precision.MasterWeightsAdamW)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    trainers.train(straight, tmp_path / "a" / trainers.CHECKPOINT_DIR)
    final = load_file(tmp_path / "a" / trainers.CHECKPOINT_DIR / "checkpoint-3" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert max((trained[n] - init[n]).abs().max().item() for n in init) > 1e-4
    for name, value in trained.items():
        assert torch.equal(value, final[name]), name

    crashed, _ = _sft(smoke_base, tmp_path / "b", max_steps=3, save_steps=1)
    crashed.add_callback(StopAfter(1))
    with pytest.raises(RuntimeError, match="crash"):
        trainers.train(crashed, tmp_path / "b" / trainers.CHECKPOINT_DIR)
    saved = load_file(tmp_path / "b" / trainers.CHECKPOINT_DIR / "checkpoint-1" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    resumed, model = _sft(smoke_base, tmp_path / "b", max_steps=3, save_steps=1)
    assert trainers.train(resumed, tmp_path / "b" / trainers.CHECKPOINT_DIR) == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), trained[name], rtol=0, atol=1e-6, msg=name)

    # a rerun after the finished run (a crash before publishing) loads the fp32 weights, not their bf16 rounding
    rerun, model = _sft(smoke_base, tmp_path / "a", max_steps=3, save_steps=1)
    assert trainers.train(rerun, tmp_path / "a" / trainers.CHECKPOINT_DIR) == 3
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), trained[name]), name


class FirstCheckpointSize(trainers.TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            path = Path(args.output_dir) / "checkpoint-1"
            self.size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_the_checkpoint_estimate_counts_the_fp32_masters(gpu, smoke_base, tmp_path):
    """bf16 weights, then the fp32 masters and AdamW's two fp32 states: 14 bytes per weight, within 10% of the mid-run
    checkpoint the trainer writes (the rest is the scheduler, RNG and JSON)."""
    trainer, model = _sft(smoke_base, tmp_path, max_steps=2, save_steps=1)
    n = sum(p.numel() for p in model.parameters())
    estimate = trainers.checkpoint_bytes(trainer)
    assert estimate == 14 * n
    first = FirstCheckpointSize()
    trainer.add_callback(first)
    trainers.train(trainer, tmp_path / trainers.CHECKPOINT_DIR)
    assert first.size == pytest.approx(estimate, rel=0.10)


def test_lora_leaves_the_frozen_base_as_loaded(gpu, smoke_base, tmp_path):
    """LoRA trains fp32 adapters on a frozen base: no bf16 cast, no masters, PyTorch's AdamW."""
    trainer, model = _sft(smoke_base, tmp_path, max_steps=1, **{"lora.enabled": "true"})
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert precision.master_weights(trainer.model) == {}
    assert type(trainer.create_optimizer()) is torch.optim.AdamW
