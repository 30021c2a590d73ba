"""Stage `base`: the tiny model built and pre-trained for real (smoke budget), hub/local sources recorded and pinned."""
import json
import math
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.plan import compose_config
from stages.shared import models
from stages import base
from stages.shared.errors import UserError


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    cfg = compose_config(["size=smoke"]).base
    out, work = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("base_work")
    t0 = time.time()
    metrics = base.run(cfg, {}, out, work)
    return cfg, out, work, metrics, time.time() - t0


def test_builds_pretrains_and_saves_a_plain_checkpoint(smoke_base):
    cfg, out, _, metrics, seconds = smoke_base
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert model.config.model_type == "qwen3" and len(tok) == cfg.model.tokenizer.vocab_size
    assert metrics["global_step"] == cfg.max_steps
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["last_loss"] < metrics["first_loss"]  # it learnt something
    for key in ("eval_r1_zero_accuracy", "eval_r1_zero_format_rate", "eval_r1_zero_mean_length"):
        assert 0 <= metrics[key] and math.isfinite(metrics[key])
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in history)
    assert (out / "loss.png").stat().st_size > 1000


def test_rerun_resumes_from_the_finished_checkpoint(smoke_base, tmp_path):
    cfg, _, work, metrics, _ = smoke_base
    again = base.run(cfg, {}, tmp_path, work)  # same work dir: the last checkpoint holds the final step
    assert again["resumed_from_step"] == cfg.max_steps == again["global_step"]


def test_hub_id_not_in_cache_fails_fast_naming_model_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["model=qwen2.5-math-1.5b", "model.source=r1flow-test/definitely-not-cached"]).base
    with pytest.raises(UserError, match="model.source='r1flow-test/definitely-not-cached'"):
        base.run(cfg, {}, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_directory_is_recorded_with_file_hashes(smoke_base, tmp_path):
    _, trained, _, _, _ = smoke_base
    cfg = compose_config(["model=qwen2.5-math-1.5b", f"model.source={trained}"]).base
    assert cfg.max_steps == 0  # the paper preset: real base models are only recorded
    out = tmp_path / "out"
    out.mkdir()
    metrics = base.run(cfg, {}, out, tmp_path / "work")
    assert metrics["source_kind"] == "local" and len(metrics["content_sha256"]) == 64
    assert models.model_source(out) == (str(trained.resolve()), None)
    hashes = json.loads((out / "source_files.json").read_text())
    assert "model.safetensors" in hashes and "config.json" in hashes


def test_missing_local_directory_is_a_user_error(tmp_path):
    cfg = compose_config(["model=qwen2.5-math-1.5b", f"model.source={tmp_path}/nope"]).base
    with pytest.raises(UserError, match="model.source"):
        base.run(cfg, {}, tmp_path / "out", tmp_path / "work")
