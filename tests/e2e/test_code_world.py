"""End to end on the code world: the r1 recipe with `data=code size=smoke` through the real command line.

Test-case rewards run in the sandbox during GRPO, rejection sampling keeps only programs that pass, and every
evaluation scores code by running the held-out tests. The smoke budgets leave the model weak: this checks the
plumbing (every stage runs, code metrics and rewards are there, what is kept passes its tests), not the learning.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.shared.rewards.code import extract_program
from stages.shared.sandbox import default_sandbox, parse_tests, run_tests

pytestmark = pytest.mark.e2e
PROJECT = Path(__file__).resolve().parents[2]
STAGES = ["base", "eval_base", "cold_start_sft", "eval_cold_start_sft", "reasoning_grpo", "eval_reasoning_grpo",
          "rejection_sampling", "helpfulness_rm", "harmlessness_rm", "merged_sft_alignment", "eval_final", "report"]


@pytest.fixture(scope="module")
def code_run(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("code_e2e")
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "data=code", "size=smoke",
                           "evaluate.backend=hf", f"artifacts_root={root}/artifacts", f"work_root={root}/work"],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "artifacts"


def only(path_glob):
    found = [p for p in path_glob if not p.name.startswith(".")]  # not a lease of the store
    assert len(found) == 1, found
    return found[0]


def test_every_stage_runs_on_the_code_world(code_run):
    assert sorted(p.name for p in code_run.iterdir()) == sorted(STAGES)


def test_grpo_pays_code_rewards(code_run):
    grpo = only((code_run / "reasoning_grpo").iterdir())
    history = [json.loads(line) for line in (grpo / "log_history.jsonl").read_text().splitlines()]
    steps = [e for e in history if "reward" in e]
    assert steps and all("rewards/accuracy/mean" in e and "rewards/code_format/mean" in e for e in steps)


def test_evaluations_score_code_by_its_tests(code_run):
    for stage in ("eval_base", "eval_cold_start_sft", "eval_reasoning_grpo", "eval_final"):
        evaluation = only((code_run / stage).iterdir())
        summary = json.loads((evaluation / "summary.json").read_text())["benchmarks"]["heldout"]
        assert 0.0 <= summary["pass@1"] <= 1.0 and summary["n_questions"] == 16
        records = [json.loads(line) for line in (evaluation / "records.jsonl").read_text().splitlines()]
        assert {r["kind"] for r in records} == {"code"} and all(r["tests"] for r in records)
        # an answer is a normalised program (or none); a correct sample has one
        assert all(a is None or a.startswith("program:") for r in records for a in r["answers"])
        assert all(a is not None for r in records for a, ok in zip(r["answers"], r["correct"]) if ok)


def test_rejection_sampling_keeps_only_passing_programs(code_run):
    rs = only((code_run / "rejection_sampling").iterdir())
    counts = json.loads((rs / "filter_counts.json").read_text())
    assert counts["drawn"] == 16 * 4
    prompts = {r["id"]: r for r in map(json.loads, (PROJECT / "data/code/rl_train.jsonl").read_text().splitlines())}
    kept = [json.loads(line) for line in (rs / "train.jsonl").read_text().splitlines()]
    box = default_sandbox()
    for row in (r for r in kept if r["kind"] == "reasoning"):
        program = extract_program(row["messages"][1]["content"])
        tests = parse_tests(prompts[row["prompt_id"]]["tests"], row["prompt_id"])
        assert program is not None and all(run_tests(box, program, tests))
