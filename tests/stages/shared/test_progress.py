"""Progress of long steps: events for the orchestrator only when the runner asks for them, plain lines off a
terminal."""

import json

from stages.shared import progress
from stages.shared.progress import Progress, emit


def test_events_go_to_the_file_the_runner_names(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.EVENTS_ENV, str(path))
    monkeypatch.setattr(progress, "MIN_EVENT_INTERVAL_S", 3600.0)  # between first and last, only what emit() forces
    with Progress(5, "generation", "generate") as bar:
        for _ in range(5):
            bar.update()
    emit("train", 3, 10, {"loss": 0.5, "reward": float("nan"), "epoch": 1, "done": True})
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["phase"], e["step"], e["total"]) for e in events] == [("generation", 0, 5), ("generation", 1, 5),
                                                                      ("generation", 5, 5), ("train", 3, 10)]
    assert events[-1]["metrics"] == {"loss": 0.5, "epoch": 1.0}  # finite numbers only


def test_without_the_variable_nothing_is_written_and_lines_are_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(progress.EVENTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with Progress(20, "verification", "verify answers") as bar:  # stderr is not a terminal under pytest
        for _ in range(20):
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and lines[0].startswith("verify answers: 1/20") and lines[-1].startswith(
        "verify answers: 20/20")
    assert list(tmp_path.iterdir()) == []
