"""PNG plots of a training run's log history (matplotlib, Agg backend: no display needed).

- plot_rl: one figure per RL run: total reward and each reward function, held-out and batch accuracy, response
  length, and the health signals (KL, entropy, share of zero-variance groups, clipped ratio) over steps.
- plot_loss: training loss (and token accuracy where logged) over steps.
- the report's figures: plot_accuracy_by_stage, plot_rejection, plot_wall_times.
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


def plot_accuracy_by_stage(table: dict, evaluations: list, path: Path) -> Path | None:
    """pass@1 and cons@k per checkpoint in stage order, one panel per benchmark."""
    if not evaluations:
        return None
    benches = table["benchmarks"]
    cols = table["columns"]
    ks = {s.get("k") for *_, s in evaluations}
    k = next(iter(ks)) if len(ks) == 1 and None not in ks else "k"
    fig, axes = plt.subplots(1, len(benches), figsize=(max(5.5, 1.3 * len(cols) + 2) * len(benches), 4.2),
                             squeeze=False)
    x = list(range(len(cols)))
    for ax, bench in zip(axes[0], benches):
        p1 = [s["benchmarks"].get(bench, {}).get("pass@1") for *_, s in evaluations]
        ck = [s["benchmarks"].get(bench, {}).get("cons@k") for *_, s in evaluations]
        pct = lambda vs: [100 * v if isinstance(v, (int, float)) else float("nan") for v in vs]  # noqa: E731
        w = 0.38
        ax.bar([i - w / 2 for i in x], pct(p1), w, label="pass@1", color="tab:blue")
        ax.bar([i + w / 2 for i in x], pct(ck), w, label=f"cons@{k}", color="tab:orange")
        ax.plot([i - w / 2 for i in x], pct(p1), color="tab:blue", marker="o", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels(cols, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(bench)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("accuracy by stage")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_rejection(bars: list[tuple[str, int]], path: Path, title: str) -> Path | None:
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(bars) + 1.5))
    labels = [b[0] for b in bars][::-1]
    counts = [b[1] for b in bars][::-1]
    colors = ["tab:green" if lab == "accepted" else "tab:gray" if lab == "drawn" else "tab:red" for lab in labels]
    ax.barh(labels, counts, color=colors)
    for i, c in enumerate(counts):
        ax.text(c, i, f" {c:g}", va="center", fontsize=8)
    ax.set_xlabel("samples")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_wall_times(rows: list[tuple[str, float]], path: Path) -> Path | None:
    rows = [(n, s) for n, s in rows if s is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    ax.barh([n for n, _ in rows][::-1], [s for _, s in rows][::-1], color="tab:purple")
    ax.set_xlabel("seconds")
    ax.set_title("wall time per stage")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
