"""End to end through the real command line: Hydra config, Prefect flow, stage subprocesses, TRL, vLLM.

One store for the module: the r1 smoke run, its fully cached rerun, distillation from its stage-3 dataset, and a
SIGKILL in the middle of GRPO followed by a resume. Evaluations use the HF backend here to keep `make test` short;
rejection sampling uses vLLM (the generation, evaluate and rejection-sampling tests start vLLM once each).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

pytestmark = pytest.mark.e2e
R1FLOW = [sys.executable, "-m", "pipeline.cli"]
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("e2e")
    return [f"artifacts_root={root}/artifacts", f"work_root={root}/work", "size=smoke", "evaluate.backend=hf"], root


def r1flow(*args, timeout=900):
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    proc = subprocess.run(R1FLOW + list(args), cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def summary_rows(stdout):
    """The CLI's closing table: `stage version state seconds s`."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] in ("ran", "cached") and parts[4] == "s":
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def flow_runs(client, overrides):
    """The flow runs of `r1flow run OVERRIDES`, oldest first."""
    runs = [r for r in client.read_flow_runs() if r.parameters.get("overrides") == list(overrides)]
    return sorted(runs, key=lambda r: r.created)


@pytest.fixture(scope="module")
def r1_run(store):
    """The r1 smoke run; meanwhile the Prefect API is polled for cold_start_sft's progress artifact, as the UI does."""
    overrides, root = store
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen(R1FLOW + ["run", *overrides], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    with get_client(sync_client=True) as client:
        while proc.poll() is None:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=["progress-cold-start-sft"])))
            seen += [a.data for a in found]
            time.sleep(0.5)
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        flow_run = flow_runs(client, overrides)[-1]
    return summary_rows(out) | {"progress seen": seen, "flow run": flow_run}


def test_r1_recipe_runs_every_stage_and_ends_with_a_report(r1_run, store):
    overrides, root = store
    assert list(r1_run)[:-2] == ["base", "eval_base", "cold_start_sft", "eval_cold_start_sft", "reasoning_grpo",
                            "eval_reasoning_grpo", "rejection_sampling", "helpfulness_rm", "harmlessness_rm",
                            "merged_sft_alignment", "eval_final", "report"]
    assert {state for _, state in list(r1_run.values())[:-2]} == {"ran"}
    report_dir = root / "artifacts" / "report" / r1_run["report"][0]
    manifest = json.loads((report_dir / "manifest.json").read_text())
    assert manifest["kind"] == "report" and (report_dir / "report.md").exists()
    # The report's table holds the evaluation artifacts' own numbers.
    final_eval = json.loads((root / "artifacts" / "eval_final" / r1_run["eval_final"][0] / "manifest.json").read_text())
    assert "merged_sft_alignment" in (report_dir / "report.md").read_text()
    assert final_eval["metrics"]["backend"] == "hf"
    rejection = json.loads((root / "artifacts" / "rejection_sampling" / r1_run["rejection_sampling"][0]
                            / "manifest.json").read_text())
    assert rejection["metrics"]["backend"] == "vllm"
    # Stage 4 fine-tunes the base checkpoint, not the RL one.
    merged = json.loads((root / "artifacts" / "merged_sft_alignment" / r1_run["merged_sft_alignment"][0]
                         / "manifest.json").read_text())
    assert merged["inputs"]["base"] == {"name": "base", "version": r1_run["base"][0]}
    code, out, err = r1flow("report", *overrides)
    assert code == 0 and "merged_sft_alignment" in out and ".png" in out, err[-2000:]


def test_prefect_ui_shows_the_recipe_graph_plots_progress_and_tensorboard_curves(r1_run, store):
    """What the Prefect UI reads, read through its API: each task waits on its real input stages; the report and the
    stages embed their PNGs; cold_start_sft's progress artifact moved while it trained and ended at 100%; and the RL
    stage's TensorBoard event files parse."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.plan import compose_config

    overrides, root = store
    recipe = compose_config(overrides).recipe.stages
    run_id = r1_run["flow run"].id
    with get_client(sync_client=True) as client:
        tasks = {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}
        found = {a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}
    names = {t.id: name for name, t in tasks.items()}
    upstream = {name: {names[i.id] for inputs in t.task_inputs.values() for i in inputs if i.input_type == "task_run"}
                for name, t in tasks.items()}
    assert upstream == {name: set((spec.get("inputs") or {}).values()) for name, spec in recipe.items()}
    report = found["run-report"].data
    assert report.count("](data:image/png;base64,") >= 2 and ".png)" not in report
    for stage, plot in (("cold_start_sft", "loss.png"), ("reasoning_grpo", "rl_curves.png")):
        assert f"![{plot}](data:image/png;base64," in found[stage.replace("_", "-")].data
    assert found["progress-cold-start-sft"].data == 100.0
    # The stage reported its steps through the events file the flow follows (more than one before the end); how many
    # of them a poll of the API catches depends on the machine's speed (the toy flow test, whose stage sleeps between
    # steps, checks the artifact moving through intermediate values).
    events = [json.loads(line) for line in (root / "work" / "cold_start_sft" / r1_run["cold_start_sft"][0] /
                                            "events.jsonl").read_text().splitlines()]
    train = [e for e in events if e["phase"].endswith("training")]
    steps = [e["step"] for e in train]
    assert len([s for s in steps if 0 < s < train[-1]["total"]]) >= 1 and steps[-1] == train[-1]["total"], events
    assert all(0 <= p <= 100 for p in r1_run["progress seen"]) and r1_run["progress seen"], r1_run["progress seen"]
    assert "metrics-reasoning-grpo" in found and "reward" in found["metrics-reasoning-grpo"].data
    grpo = root / "artifacts" / "reasoning_grpo" / r1_run["reasoning_grpo"][0] / "tensorboard"
    board = EventAccumulator(str(next(grpo.rglob("events.out.tfevents.*")).parent)).Reload()
    assert len(board.Scalars("train/reward")) >= 2


def test_second_run_trains_nothing(r1_run, store):
    overrides, _ = store
    start = time.time()
    code, out, err = r1flow("run", *overrides)
    assert code == 0, err[-3000:]
    rows = summary_rows(out)
    assert rows == {name: (version, "cached") for name, (version, _) in list(r1_run.items())[:-2]}
    print(f"fully cached rerun: {time.time() - start:.1f} s")


def test_status_after_run(r1_run, store):
    overrides, _ = store
    code, out, _ = r1flow("status", *overrides)
    assert code == 0
    assert all(line.split()[2:] == ["done"] for line in out.splitlines()[1:]), out
    code, out, _ = r1flow("status", *overrides, "reasoning_grpo.learning_rate=1e-6")
    lines = {line.split()[0]: line.split(None, 2)[2] for line in out.splitlines()[1:]}
    assert lines["cold_start_sft"] == "done"
    assert lines["reasoning_grpo"] == "stale  (config: learning_rate)"
    assert lines["report"].startswith("stale") and "input: " in lines["report"]


def test_distill_from_an_existing_stage3_dataset(r1_run, store):
    overrides, root = store
    dataset_version = r1_run["rejection_sampling"][0]
    code, out, err = r1flow("run", *overrides, "recipe=distill", f"+recipe.pins.rejection_sampling={dataset_version}")
    assert code == 0, err[-3000:]
    rows = summary_rows(out)
    assert rows["rejection_sampling"] == (dataset_version, "cached")
    assert rows["student_base"][1] == rows["distill"][1] == rows["eval_distill"][1] == "ran"
    distill = json.loads((root / "artifacts" / "distill" / rows["distill"][0] / "manifest.json").read_text())
    assert distill["inputs"]["dataset"] == {"name": "rejection_sampling", "version": dataset_version}
    assert distill["inputs"]["model"]["name"] == "student_base"


def test_sigkill_during_grpo_then_rerun_resumes_from_checkpoint(store):
    overrides, root = store
    overrides = overrides + ["recipe=r1_zero", "reasoning_grpo.max_steps=8", "reasoning_grpo.save_steps=2"]
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    # its own session, so what the killed orchestrator orphans (Prefect's temporary API server) can be cleaned up
    proc = subprocess.Popen(R1FLOW + ["run", *overrides], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = root / "work" / "reasoning_grpo"
    before = set(checkpoints.glob("*")) if checkpoints.exists() else set()
    deadline, found = time.time() + 600, []
    while time.time() < deadline and not found:
        assert proc.poll() is None, "the run ended before GRPO saved a checkpoint"
        found = [p for p in checkpoints.glob("*/checkpoints/checkpoint-4/trainer_state.json")
                 if p.parents[2] not in before]
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: the stage process must die with it
    proc.wait()
    time.sleep(2)
    version_dir = found[0].parents[2]
    assert not (root / "artifacts" / "reasoning_grpo" / version_dir.name / "manifest.json").exists()
    ps = subprocess.run(["pgrep", "-f", f"pipeline.runner {version_dir}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the stage process outlived the killed orchestrator"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Prefect's temporary server outlives its killed parent: not ours to keep
    except ProcessLookupError:
        pass

    code, out, err = r1flow("run", *overrides)
    assert code == 0, err[-3000:]
    rows = summary_rows(out)
    assert rows["base"][1] == "cached" and rows["reasoning_grpo"][1] == "ran"
    with get_client(sync_client=True) as client:  # the next command marked the killed run Crashed
        killed, rerun = flow_runs(client, overrides)[-2:]
        assert killed.state.name == "Crashed" and rerun.state.name == "Completed"
    log = (root / "work" / "reasoning_grpo" / version_dir.name / "stage.log").read_text()
    assert "resuming from" in log and "checkpoint-" in log
    manifest = json.loads((root / "artifacts" / "reasoning_grpo" / version_dir.name / "manifest.json").read_text())
    history = [json.loads(line) for line in
               (root / "artifacts" / "reasoning_grpo" / version_dir.name / "log_history.jsonl").read_text().splitlines()]
    assert max(h.get("step", 0) for h in history) == 8
    assert manifest["metrics"]


def test_changing_grpo_config_reruns_it_and_what_follows_then_stage_reruns_one(store):
    overrides, root = store
    overrides = overrides + ["recipe=r1_zero", "reasoning_grpo.max_steps=2", "reasoning_grpo.save_steps=2"]
    code, out, err = r1flow("run", *overrides)
    assert code == 0, err[-3000:]
    first = summary_rows(out)
    code, out, err = r1flow("run", *overrides, "reasoning_grpo.learning_rate=1e-6")
    assert code == 0, err[-3000:]
    rows = summary_rows(out)
    assert {name: state for name, (_, state) in rows.items()} == {
        "base": "cached", "eval_base": "cached", "reasoning_grpo": "ran", "eval_reasoning_grpo": "ran", "report": "ran"}
    assert rows["base"][0] == first["base"][0] and rows["reasoning_grpo"][0] != first["reasoning_grpo"][0]
    # `r1flow stage NAME --force` reruns exactly that stage, in place, from the latest versions of its inputs.
    code, out, err = r1flow("stage", "eval_base", "--force", *overrides)
    assert code == 0, err[-3000:]
    assert summary_rows(out) == {"eval_base": (first["eval_base"][0], "ran")}
