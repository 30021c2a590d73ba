"""A training run's log history (TRL's `state.log_history`): written as JSON lines beside the model, read back by the
report, summarised into first_/last_ metrics for the manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

LOG_HISTORY = "log_history.jsonl"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_log_history(log_history: list[dict], path: str | Path) -> None:
    with open(path, "w") as f:
        for entry in log_history:
            f.write(json.dumps({k: (v if v is None or not isinstance(v, float) or math.isfinite(v) else None)
                                for k, v in entry.items()}) + "\n")


def read_log_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if finite(entry.get(key)) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def summarize(log_history: list[dict], keys: Iterable[str] | None = None, window: float = 0.1) -> dict:
    """first_/last_ <key> (mean over the first/last `window` share of logged points) for the logged training keys."""
    if keys is None:
        keys = sorted({k for e in log_history for k, v in e.items()
                       if finite(v) and k not in ("step", "epoch", "total_flos", "train_runtime")
                       and not k.startswith(("train_", "eval_"))
                       and not k.endswith("_per_second")})
    out = {}
    for key in keys:
        _, values = series(log_history, key)
        if not values:
            continue
        n = max(1, int(round(len(values) * window)))
        name = key.replace("/", "_")
        out[f"first_{name}"] = sum(values[:n]) / n
        out[f"last_{name}"] = sum(values[-n:]) / n
    for entry in log_history:  # the trainer's own end-of-training summary
        for key in ("train_runtime", "train_loss"):
            if finite(entry.get(key)):
                out[key] = float(entry[key])
    return out



def clean_metrics(metrics: Mapping) -> dict:
    """Only finite numbers (and strings) go into the manifest."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif finite(v):
            out[k] = v
        elif isinstance(v, str):
            out[k] = v
    return out
