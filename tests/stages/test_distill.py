"""Recipe `distill`: SFT of the student on a stage-3 dataset of this run or pinned by version from an earlier one."""
import json
import math

import pytest
from transformers import AutoModelForCausalLM

from pipeline.plan import compose_config, plan
from stages.shared import data
from stages import distill
from stages.shared.errors import UserError


@pytest.fixture(scope="module")
def student(smoke_base):
    """The size=smoke base checkpoint as the student."""
    return smoke_base


@pytest.fixture(scope="module")
def stage3_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage3")
    rows = [{"messages": json.loads(line)["messages"], "kind": "reasoning"}
            for line in open("data/arith/cold_start.jsonl").readlines()[:40]]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_plan_student_and_dataset_inputs_and_a_pinned_dataset():
    stages = {s.name: s for s in plan(compose_config(["recipe=distill"]))}
    assert stages["distill"].inputs == {"model": "student_base", "dataset": "rejection_sampling"}
    assert stages["student_base"].config["model"]["name"] == "tiny_student"
    assert stages["distill"].input_versions["dataset"] == stages["rejection_sampling"].version
    pinned = {s.name: s for s in plan(compose_config(["recipe=distill", "+recipe.pins.rejection_sampling=abc123"]))}
    assert pinned["rejection_sampling"].pinned and pinned["distill"].input_versions["dataset"] == "abc123"
    assert pinned["distill"].version != stages["distill"].version


def test_smoke_run_trains_the_student_on_the_dataset(student, stage3_dataset, tmp_path):
    cfg = compose_config(["recipe=distill", "size=smoke"]).distill
    out = tmp_path / "out"
    out.mkdir()
    metrics = distill.run(cfg, {"model": student, "dataset": stage3_dataset}, out, tmp_path / "work")
    AutoModelForCausalLM.from_pretrained(out)
    assert metrics["samples"] == metrics["samples_reasoning"] == 40
    assert metrics["global_step"] == cfg.max_steps
    for key in ("first_loss", "last_loss", "before_accuracy", "eval_accuracy", "eval_format_rate"):
        assert math.isfinite(metrics[key]), key
    assert metrics["last_loss"] < metrics["first_loss"]


def test_a_dataset_without_reasoning_samples_is_warned_about(student, tmp_path, caplog):
    # rejection sampling of a weak teacher keeps its general rows only (the eighth lease's 1.5B run)
    dataset = tmp_path / "stage3"
    dataset.mkdir()
    row = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
           "kind": "general"}
    (dataset / "train.jsonl").write_text((json.dumps(row) + "\n") * 8)
    cfg = compose_config(["recipe=distill", "size=smoke", "distill.max_steps=1", "distill.eval_samples=0"]).distill
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level("WARNING", logger="stages.distill"):
        metrics = distill.run(cfg, {"model": student, "dataset": dataset}, out, tmp_path / "work")
    assert metrics["samples_general"] == 8 and "samples_reasoning" not in metrics
    assert "holds no reasoning samples" in caplog.text


def test_not_a_dataset_artifact_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train.jsonl"):
        data.sft_dataset(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="assistant"):
        data.sft_dataset(tmp_path)
