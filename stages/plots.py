"""PNG plots of a training run's log history (matplotlib, Agg backend: no display needed).

- plot_rl: one figure per RL run: total reward and each reward function, held-out and batch accuracy, response
  length, and the health signals (KL, entropy, share of zero-variance groups, clipped ratio) over steps.
- plot_loss: training loss (and token accuracy where logged) over steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in history:
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(v))
    return steps, values


def _reward_names(history: list[dict]) -> list[str]:
    names = []
    for entry in history:
        for key in entry:
            if key.startswith("rewards/") and key.endswith("/mean"):
                name = key.split("/")[1]
                if name not in names:
                    names.append(name)
    return names


def plot_rl(history: list[dict], path: str | Path, title: str = "GRPO") -> Path | None:
    """Reward (total and per function), accuracy, response length and RL health over steps."""
    if not _series(history, "reward")[0]:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.plot(*_series(history, "reward"), label="total reward", color="black", lw=2)
    for name in _reward_names(history):
        ax.plot(*_series(history, f"rewards/{name}/mean"), label=name)
    ax.set_title("reward (batch mean)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for key, label in [("heldout/accuracy", "held-out accuracy"), ("heldout/strict_accuracy", "held-out, formatted"),
                       ("heldout/format_rate", "held-out format rate"), ("rewards/accuracy/mean", "batch accuracy")]:
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, marker="o" if key.startswith("heldout") else None, ms=3, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.plot(*_series(history, "completions/mean_length"), label="batch mean")
    steps, values = _series(history, "heldout/mean_length")
    if steps:
        ax.plot(steps, values, marker="o", ms=3, label="held-out (greedy)")
    ax.set_title("response length (tokens)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    for key, label in [("kl", "KL (k3)"), ("entropy", "entropy"), ("frac_reward_zero_std", "zero-std groups"),
                       ("clip_ratio/region_mean", "clipped ratio"), ("completions/clipped_ratio", "truncated")]:
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, label=label)
    ax.set_title("RL health")
    ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_loss(history: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    steps, values = _series(history, "loss")
    if not steps:
        return None
    acc_steps, acc = _series(history, "mean_token_accuracy")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, values, label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if acc_steps:
        ax2 = ax.twinx()
        ax2.plot(acc_steps, acc, label="token accuracy", color="tab:orange")
        ax2.set_ylabel("token accuracy")
        ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
