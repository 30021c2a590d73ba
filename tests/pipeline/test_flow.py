"""The Prefect flow over toy stages, checked through the API of a Prefect server like the UI's (tests/conftest.py):
caching, reruns, failures, the recipe's graph, concurrency, embedded pictures, live progress, crashed runs."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from pipeline import artifacts
from pipeline.flow import r1flow_pipeline
from stages.shared.errors import UserError

TEST_CONF = Path(__file__).parent / "conf"
PROJECT = Path(__file__).resolve().parents[2]
TOY_INPUTS = {"first": set(), "second": {"first"}, "side": {"first"}, "third": {"second", "side"}}


@pytest.fixture
def overrides(tmp_path, prefect_server):
    return [f"hydra.searchpath=[file://{TEST_CONF}]", "recipe=toy", f"artifacts_root={tmp_path}/artifacts",
            f"work_root={tmp_path}/work"]


def states(rows):
    return {row["stage"]: row["state"] for row in rows}


def run_flow(overrides):
    """(rows, flow run id)."""
    state = r1flow_pipeline(overrides=overrides, return_state=True)
    return state.result(), state.state_details.flow_run_id


def task_runs(client, flow_run_id):
    return {t.name: t for t in client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}


def artifacts_with_key(client, key):
    return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_second_run_is_fully_cached(overrides, tmp_path):
    first = r1flow_pipeline(overrides=overrides)
    assert states(first) == {"first": "ran", "second": "ran", "side": "ran", "third": "ran"}
    root = tmp_path / "artifacts"
    third = artifacts.load(str(root), "third", first[3]["version"])
    assert (third / "value.txt").read_text() == "1112"
    again = r1flow_pipeline(overrides=overrides)
    assert states(again) == {"first": "cached", "second": "cached", "side": "cached", "third": "cached"}
    assert [r["version"] for r in again] == [r["version"] for r in first]


def test_changing_one_stage_reruns_it_and_the_ones_after(overrides):
    r1flow_pipeline(overrides=overrides)
    rows = r1flow_pipeline(overrides=overrides + ["toy.second.value=20"])
    assert states(rows) == {"first": "cached", "second": "ran", "side": "cached", "third": "ran"}


def test_stage_reruns_one_stage_from_latest_inputs(overrides, tmp_path):
    first = r1flow_pipeline(overrides=overrides)
    rows = r1flow_pipeline(overrides=overrides, only="second")
    assert states(rows) == {"second": "cached"}
    rows = r1flow_pipeline(overrides=overrides, only="second", force=True)
    assert states(rows) == {"second": "ran"} and rows[0]["version"] == first[1]["version"]
    assert artifacts.exists(str(tmp_path / "artifacts"), "second", first[1]["version"])


def test_failing_stage_fails_the_flow_and_leaves_nothing_complete(overrides, tmp_path):
    with pytest.raises(RuntimeError, match="toy stage failed on purpose"):
        r1flow_pipeline(overrides=overrides + ["toy.second.fail=true"])
    root = str(tmp_path / "artifacts")
    assert artifacts.latest(root, "first") is not None
    assert artifacts.latest(root, "second") is None and artifacts.latest(root, "third") is None


def test_user_error_in_a_stage_keeps_its_message(overrides):
    with pytest.raises(UserError, match="line 3: field 'answer' is missing"):
        r1flow_pipeline(overrides=overrides + ["toy.first.user_error=true"])


@pytest.mark.parametrize("concurrent", [False, True])
def test_task_dependencies_are_the_recipe_inputs(overrides, concurrent):
    """Each task run's upstream task runs (its task_inputs) are exactly the stages the recipe names as its inputs, in
    both modes; run.concurrent=true runs `second` and `side` (independent) side by side, the default one at a time."""
    rows, flow_run_id = run_flow(overrides + [f"run.concurrent={str(concurrent).lower()}", "toy.second.sleep_s=1",
                                              "toy.side.sleep_s=1"])
    assert set(states(rows).values()) == {"ran"}
    with get_client(sync_client=True) as client:
        runs = task_runs(client, flow_run_id)
    names = {run.id: name for name, run in runs.items()}
    upstream = {name: {names[i.id] for inputs in run.task_inputs.values() for i in inputs if i.input_type == "task_run"}
                for name, run in runs.items()}
    assert upstream == TOY_INPUTS
    second, side = runs["second"], runs["side"]
    overlap = second.start_time < side.end_time and side.start_time < second.end_time
    assert overlap == concurrent


def test_stage_and_report_artifacts_embed_their_pngs(overrides):
    _, flow_run_id = run_flow(overrides)
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
    for key in ("first", "second", "side", "third", "run-report"):
        markdown = found[key].data
        assert "toy_plot.png" not in markdown.replace("**toy_plot.png**", "").replace("![toy_plot.png]", "")
        encoded = markdown.split("(data:image/png;base64,", 1)[1].split(")", 1)[0]
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "PNG" and image.size == (900, 300)  # 1800 x 600 downscaled to the configured width
    assert found["run-report"].data.startswith("# toy report") and "![toy plot](data:image/png;base64," in \
        found["run-report"].data


def test_progress_artifact_follows_the_stage_to_100_percent(overrides):
    """The stage's progress events (tests/pipeline/toy_stage.py, as a trainer's callback writes them) move the
    stage's Prefect progress artifact while it runs; each log step's metrics extend its metrics table (both are
    updated in place, so the run's graph shows one of each per stage)."""
    seen, rows_seen, stop, start = [], [], threading.Event(), datetime.now(timezone.utc)

    def poll():
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                seen.extend(a.data for a in artifacts_with_key(client, "progress-second") if a.created >= start)
                rows_seen.extend(len(json.loads(a.data)) for a in artifacts_with_key(client, "metrics-second")
                                 if a.created >= start)
                time.sleep(0.2)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        _, flow_run_id = run_flow(overrides + ["toy.second.steps=4", "toy.second.sleep_s=1.5"])
    finally:
        stop.set()
        watcher.join()
    with get_client(sync_client=True) as client:
        progress = [a for a in artifacts_with_key(client, "progress-second") if a.flow_run_id == flow_run_id]
        tables = [a for a in artifacts_with_key(client, "metrics-second") if a.flow_run_id == flow_run_id]
    assert [a.data for a in progress] == [100.0] and "done in" in progress[0].description
    assert len({p for p in seen if 0 < p < 100}) >= 2, seen  # updated while running, more than once
    assert len(tables) == 1 and len({n for n in rows_seen if n < 4}) >= 2, rows_seen  # one table, updated in place
    rows = json.loads(tables[0].data)
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == pytest.approx(0.25)


def test_killed_run_is_crashed_after_the_next_command_and_project_prefect_untouched(overrides, tmp_path):
    """SIGKILL the r1flow process in the middle of a stage: the next r1flow command (here `status`) marks its flow
    run Crashed. Both commands report to the test server, never to the project's .prefect."""
    project_prefect = PROJECT / ".prefect"
    before = sorted((p, p.stat().st_mtime) for p in project_prefect.rglob("*")) if project_prefect.exists() else None
    cli = [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.Popen(cli + ["run", *overrides, "toy.second.steps=1", "toy.second.sleep_s=600"], cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "work" / "second").glob("*/started")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before stage `second` started"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with get_client(sync_client=True) as client:
        run = next(r for r in client.read_flow_runs() if r.parameters.get("overrides") == overrides +
                   ["toy.second.steps=1", "toy.second.sleep_s=600"])
        assert run.state.name == "Running"
        done = subprocess.run(cli + ["status", *overrides], cwd=PROJECT, capture_output=True, text=True)
        assert done.returncode == 0 and "marked Crashed" in done.stderr, done.stderr
        assert client.read_flow_run(run.id).state.name == "Crashed"
        assert task_runs(client, run.id)["second"].state.name == "Crashed"
    after = sorted((p, p.stat().st_mtime) for p in project_prefect.rglob("*")) if project_prefect.exists() else None
    assert after == before
    assert Path(os.environ["PREFECT_HOME"]) != project_prefect
