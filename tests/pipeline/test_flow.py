"""The Prefect flow over toy stages: caching, reruns, one-stage reruns, failures, names in the UI."""

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from pipeline import artifacts
from pipeline.flow import r1flow_pipeline
from stages.shared.errors import UserError

TEST_CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def prefect_backend(tmp_path_factory):
    # The harness isolates the database but not the result store: give this module its own.
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path_factory.mktemp("prefect-results")))
    with prefect_test_harness():
        yield
    mp.undo()


@pytest.fixture
def overrides(tmp_path, prefect_backend):
    return [f"hydra.searchpath=[file://{TEST_CONF}]", "recipe=toy", f"artifacts_root={tmp_path}/artifacts",
            f"work_root={tmp_path}/work"]


def states(rows):
    return {row["stage"]: row["state"] for row in rows}


def test_second_run_is_fully_cached(overrides, tmp_path):
    first = r1flow_pipeline(overrides=overrides)
    assert states(first) == {"first": "ran", "second": "ran", "third": "ran"}
    root = tmp_path / "artifacts"
    third = artifacts.load(str(root), "third", first[2]["version"])
    assert (third / "value.txt").read_text() == "111"
    again = r1flow_pipeline(overrides=overrides)
    assert states(again) == {"first": "cached", "second": "cached", "third": "cached"}
    assert [r["version"] for r in again] == [r["version"] for r in first]


def test_changing_one_stage_reruns_it_and_the_ones_after(overrides):
    r1flow_pipeline(overrides=overrides)
    rows = r1flow_pipeline(overrides=overrides + ["toy.second.value=20"])
    assert states(rows) == {"first": "cached", "second": "ran", "third": "ran"}


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


def test_task_runs_carry_stage_names_and_metrics_artifacts(overrides):
    r1flow_pipeline(overrides=overrides)
    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_task_runs()}
        keys = {a.key for a in client.read_artifacts()}
    assert {"first", "second", "third"} <= names
    assert {"first", "second", "third", "run-summary"} <= keys
