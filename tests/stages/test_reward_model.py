"""Stage `reward_model` (helpfulness_rm / harmlessness_rm): RewardTrainer on preference pairs from the base checkpoint,
pairwise accuracy on the held-out pairs, responses cut to the RM's scope, and a named checkpoint recorded instead."""
import json
import math

import pytest
from transformers import AutoModelForSequenceClassification

from pipeline.plan import compose_config
from stages.shared import reward_models
from stages.shared import models
from stages import base, reward_model
from stages.shared.errors import UserError


@pytest.fixture(scope="module")
def helpfulness_rm(smoke_base, tmp_path_factory):
    cfg = compose_config(["size=smoke"]).reward_model.helpfulness
    out = tmp_path_factory.mktemp("helpfulness_rm")
    metrics = reward_model.run(cfg, {"model": smoke_base}, out, tmp_path_factory.mktemp("rm_work"))
    return out, metrics


def test_trained_rm_is_a_sequence_classifier_with_heldout_pairwise_accuracy(helpfulness_rm):
    out, metrics = helpfulness_rm
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert json.loads((out / reward_models.META_FILE).read_text())["scope"] == "summary"
    assert (out / "log_history.jsonl").exists()
    for key in ("eval_pairwise_accuracy", "before_pairwise_accuracy", "eval_margin", "first_loss"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["eval_pairwise_accuracy"] <= 1.0 and metrics["eval_pairs"] > 0
    assert metrics["global_step"] == 10
    # per-issue accuracies of the held-out pairs (unhelpful, off-topic, ...)
    assert any(k.startswith("eval_pairwise_accuracy_") for k in metrics)
    # what the stage loads for alignment scores like what it trained
    rm, tok, meta = reward_models.load(out, compose_config([]).hardware)
    good, bad = reward_models.score(rm, tok, ["What is 2 + 2?"] * 2, ["The answer is \\boxed{4}", "?"])
    assert isinstance(good, float) and isinstance(bad, float)


def test_reward_models_score_in_bf16_on_a_gpu(helpfulness_rm, monkeypatch):
    import torch

    out, _ = helpfulness_rm
    rm, _, _ = reward_models.load(out, compose_config([]).hardware)
    assert rm.dtype == torch.float32  # on the CPU
    # on a GPU (this machine has none: `.to("cuda")` stands still): bf16 weights, as the RM's forward in training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    rm, _, _ = reward_models.load(out, compose_config(["hardware=gpu"]).hardware)
    assert rm.dtype == torch.bfloat16
    rm, _, _ = reward_models.load(out, compose_config(["hardware=multi_gpu"]).hardware)
    assert rm.dtype == torch.bfloat16


def test_pairs_are_cut_to_the_scope():
    cfg = compose_config([]).reward_model
    helpful = reward_model.pairs(cfg.helpfulness)
    assert helpful["train"] and helpful["eval"]
    assert not any("<think>" in p["chosen"] or "<think>" in p["rejected"] or "</think>" in p["chosen"]
                   for split in helpful.values() for p in split)
    harmless = reward_model.pairs(cfg.harmlessness)
    assert any("<think>" in p["rejected"] for p in harmless["train"])  # the whole response, reasoning included
    assert reward_models.view("<think>\nplan\n</think>\nAnswer.", "summary") == "Answer."
    assert reward_models.view("<think>\nnever closed", "summary") == ""


def test_named_reward_model_is_recorded_not_copied(helpfulness_rm, tmp_path):
    trained, _ = helpfulness_rm
    cfg = compose_config([f"reward_model.harmlessness.source={trained}"]).reward_model.harmlessness
    out = tmp_path / "out"
    out.mkdir()
    metrics = reward_model.run(cfg, {"model": tmp_path / "unused"}, out, tmp_path / "work")
    assert metrics["source_kind"] == "local"
    assert not (out / "model.safetensors").exists()
    assert models.model_source(out) == (str(trained.resolve()), None)
    rm, _, meta = reward_models.load(out, cfg.hardware)
    assert meta["scope"] == "whole" and rm.config.num_labels == 1


def test_bad_scope_and_missing_pairs_are_user_errors(tmp_path):
    cfg = compose_config(["reward_model.helpfulness.scope=reasoning"]).reward_model.helpfulness
    with pytest.raises(UserError, match="scope"):
        reward_model.run(cfg, {"model": tmp_path}, tmp_path, tmp_path)
    cfg = compose_config([f"reward_model.helpfulness.pairs_file={tmp_path}/none.jsonl"]).reward_model.helpfulness
    with pytest.raises(UserError, match="not found"):
        reward_model.pairs(cfg)
