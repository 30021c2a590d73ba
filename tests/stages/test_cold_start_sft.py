"""Stage `cold_start_sft`: SFTTrainer on the cold-start CoT, loss on the assistant part, LoRA merged to a plain model."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.plan import compose_config
from stages.shared import trainers
from stages import cold_start_sft


def test_trains_on_messages_and_saves_a_plain_checkpoint(smoke_base, tmp_path, monkeypatch):
    """... and, as every trainer does, reports to TensorBoard (run.report_to's default) into the artifact and writes
    progress events with the loss for the orchestrator (pipeline/runner.py sets both variables)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("R1FLOW_EVENTS", str(tmp_path / "events.jsonl"))
    monkeypatch.setenv("R1FLOW_RUN_NAME", "cold_start_sft-0123456789ab")
    cfg = compose_config(["size=smoke"]).cold_start_sft
    assert cfg.hardware.report_to == "tensorboard"
    out = tmp_path / "out"
    out.mkdir()
    metrics = cold_start_sft.run(cfg, {"model": smoke_base}, out, tmp_path / "work")
    event_files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1
    board = EventAccumulator(str(event_files[0].parent)).Reload()
    losses = board.Scalars("train/loss")
    assert len(losses) >= 2 and [s.step for s in losses] == sorted(s.step for s in losses)
    assert "cold_start_sft-0123456789ab" in board.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    training = [e for e in events if e["phase"] == "cold_start_sft training"]
    assert training[-1]["step"] == training[-1]["total"] == metrics["global_step"]
    logged = [e["metrics"]["loss"] for e in training if "loss" in e.get("metrics", {})]
    assert logged == pytest.approx([s.value for s in losses], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert not (out / "adapter_config.json").exists()
    assert metrics["samples"] == cfg.max_samples
    for key in ("first_loss", "last_loss", "last_mean_token_accuracy", "eval_accuracy", "eval_format_rate",
                "eval_mean_length", "before_accuracy", "before_format_rate"):
        assert math.isfinite(metrics[key]), key
    assert metrics["last_loss"] < metrics["first_loss"]
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert any("mean_token_accuracy" in e for e in history)
    # the input model's weights moved
    before = AutoModelForCausalLM.from_pretrained(smoke_base)
    assert not torch.equal(before.lm_head.weight, model.lm_head.weight)


def test_loss_is_on_the_assistant_part_only(smoke_base):
    """The collated labels mask the user turn and the chat markup; the assistant's text and its <|end|> are learnt."""
    from trl import SFTTrainer

    cfg = compose_config(["size=smoke"]).cold_start_sft
    model, tok = trainers.load_policy(smoke_base, cfg.hardware)
    ds = cold_start_sft.build_dataset(cfg)[0].select(range(2))
    args = trainers.trainer_args(__import__("trl").SFTConfig, cfg, "/tmp/unused", max_steps=1,
                                 assistant_only_loss=True, max_length=256)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    learnt = tok.decode(ids[labels != -100])
    masked = tok.decode(ids[labels == -100])
    assistant = ds[0]["messages"][-1]["content"]
    assert learnt.startswith("<think>") and learnt.endswith("<|end|>") and "boxed" in learnt
    assert ds[0]["messages"][0]["content"] in masked and "<think>" not in masked
    assert learnt.replace("<|end|>", "") == assistant


def test_lora_is_merged_into_a_plain_checkpoint(smoke_base, tmp_path):
    cfg = compose_config(["size=smoke", "cold_start_sft.lora.enabled=true", "cold_start_sft.max_samples=64",
                          "cold_start_sft.eval_samples=0"]).cold_start_sft
    out = tmp_path / "out"
    out.mkdir()
    metrics = cold_start_sft.run(cfg, {"model": smoke_base}, out, tmp_path / "work")
    assert math.isfinite(metrics["last_loss"])
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    before = AutoModelForCausalLM.from_pretrained(smoke_base)
    assert not torch.equal(before.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
