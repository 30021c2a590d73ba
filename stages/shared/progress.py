"""Progress of long steps (training, generation, verification): a tqdm bar on a terminal, a plain line every tenth of
the way otherwise, and the same progress as JSON lines for whoever runs the stage.

The events are the stage's only channel to the orchestrator, and they know nothing of it: when the environment
variable R1FLOW_EVENTS names a file (pipeline/runner.py sets it), each event is appended there as one line
`{"t": unix time, "phase": "train", "step": 40, "total": 150, "metrics": {...}}`; the flow turns them into the Prefect
UI's progress bar and metrics table. Without the variable (a stage called in a notebook or a test) nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm.auto import tqdm

EVENTS_ENV = "R1FLOW_EVENTS"
MIN_EVENT_INTERVAL_S = 1.0  # progress without metrics at most once a second: the file stays small, the UI current


def emit(phase: str, step: int, total: int, metrics: dict | None = None) -> None:
    """Append one progress event (metrics: finite numbers only) to the events file, if the runner asked for one."""
    path = os.environ.get(EVENTS_ENV)
    if not path or int(os.environ.get("RANK", "0")) != 0:  # several processes (accelerate): the main one reports
        return
    event = {"t": time.time(), "phase": phase, "step": int(step), "total": int(total)}
    if metrics:
        event["metrics"] = {k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    with open(path, "a") as f:  # one write of one line: a reader never sees half an event
        f.write(json.dumps(event) + "\n")


class Progress:
    """`with Progress(total, "generation", "generate [vllm]") as p: ... p.update(n)`: a tqdm bar when stderr is a
    terminal, else (with `lines`) a plain `desc: i/N` line every tenth of the way; and events for the orchestrator.
    Loops that already log a line per batch pass lines=False."""

    def __init__(self, total: int, phase: str, desc: str, unit: str = "it", lines: bool = True):
        self.total, self.phase, self.desc, self.done, self.lines = int(total), phase, desc, 0, lines
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, disable=not sys.stderr.isatty())
        self.last_event, self.next_line = 0.0, 0
        self.t0 = time.time()
        emit(phase, 0, self.total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.time()
        if self.done >= self.total or now - self.last_event >= MIN_EVENT_INTERVAL_S:
            emit(self.phase, self.done, self.total)
            self.last_event = now
        if self.lines and self.bar.disable and self.total and self.done * 10 // self.total >= self.next_line:
            self.next_line = self.done * 10 // self.total + 1
            print(f"{self.desc}: {self.done}/{self.total} ({time.time() - self.t0:.0f} s)", flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
