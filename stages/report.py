"""Stage `report` (kind report): one self-contained markdown report of a run, with PNG plots beside it.

Everything comes from the input artifacts' own files -- `manifest.json` (metrics, times, inputs), an evaluation's
`summary.json`, a checkpoint's `log_history.jsonl`, a rejection-sampling dataset's `filter_counts.json` -- never
recomputed. Inputs are recognised by their manifests (kind) and files, in the recipe's input order:

- evaluation artifacts (roles eval_*): the table of pass@1, cons@k, format rate, language consistency and mean length,
  benchmarks as rows and checkpoints as columns, stage by stage (the shape of the paper's per-stage table), and
  `accuracy_by_stage.png`;
- checkpoints with a `log_history.jsonl` holding RL entries (reasoning_grpo, merged_sft_alignment): reward (total and
  per function), accuracy and response length over steps (`rl_<role>.png`, drawn by stages/shared/plots.py), plus the first
  and last logged values;
- a dataset with `filter_counts.json` (rejection_sampling): acceptance rate, counts per filter (table and
  `rejection_<role>.png`);
- wall time of every stage of the run: the inputs and their ancestors, from the `upstream` list the store records in
  every manifest (`wall_times.png`), so the report needs nothing but its inputs' manifests, whatever the store. Which
  stages were cached in a given run only the flow knows (its run-summary).

Files: report.md (relative image links), report.json (the same numbers, which `r1flow report` prints: pipeline/show.py),
the PNGs.
"""

from __future__ import annotations

import logging
import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

from stages.shared.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
METRICS = [  # (summary key, row label, percent?)
    ("pass@1", "pass@1", True),
    ("cons@k", "cons@{k}", True),
    ("format_rate", "format rate", True),
    ("language_consistency", "language consistency", True),
    ("mean_length", "mean length", False),
]
RL_KEYS = [  # (log key, label) shown first/last in the RL table, when logged
    ("reward", "reward (total)"),
    ("heldout/accuracy", "held-out accuracy"),
    ("rewards/accuracy/mean", "batch accuracy"),
    ("completions/mean_length", "response length (tokens)"),
    ("kl", "KL"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Reading input artifacts


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"report: {what}: {path} is missing; rerun the stage that made it "
                        f"(`r1flow stage <name> --force`)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"report: {what}: {path} is not valid JSON ({e}); the artifact is damaged, rerun its "
                        f"stage with --force") from None


def read_manifest(artifact_dir: Path) -> dict:
    return read_json(Path(artifact_dir) / MANIFEST, f"manifest of {artifact_dir}")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"report: {path}:{lineno} is not valid JSON ({e})") from None
    return rows


def artifact_ref(manifest: dict) -> str:
    return f"{manifest.get('name', '?')}@{manifest.get('version', '?')}"


def _seconds(manifest: dict) -> float | None:
    """The stage's wall time: the runner's `seconds`, else ended_at - started_at."""
    s = manifest.get("seconds")
    if isinstance(s, (int, float)) and math.isfinite(s):
        return float(s)
    try:
        t0 = datetime.datetime.fromisoformat(str(manifest["started_at"]).replace("Z", "+00:00"))
        t1 = datetime.datetime.fromisoformat(str(manifest["ended_at"]).replace("Z", "+00:00"))
        return (t1 - t0).total_seconds()
    except (KeyError, ValueError):
        return None


def evaluation_summary(artifact_dir: Path, manifest: dict) -> dict:
    """{"benchmarks": {name: metrics}, "k", "backend", ...} from an evaluation artifact's summary.json, else rebuilt
    from its manifest metrics (held-out unprefixed, `<benchmark>/<metric>` for the others)."""
    path = Path(artifact_dir) / "summary.json"
    if path.exists():
        summary = read_json(path, f"evaluation {artifact_ref(manifest)}")
        if isinstance(summary.get("benchmarks"), dict):
            return summary
    metrics = manifest.get("metrics") or {}
    benches: dict[str, dict] = {}
    for key, value in metrics.items():
        name, sep, metric = key.rpartition("/")
        if metric in {m for m, _, _ in METRICS} | {"n_questions"}:
            benches.setdefault(name if sep else "heldout", {})[metric] = value
    if not benches:
        raise UserError(f"report: evaluation {artifact_ref(manifest)} at {artifact_dir} has neither summary.json nor "
                        f"evaluation metrics in its manifest")
    return {"benchmarks": benches, "k": metrics.get("k"), "backend": metrics.get("backend")}


def _rl_histories(artifact_dir: Path) -> list[tuple[str, list[dict]]]:
    """(file name, RL entries) for each log history file of a checkpoint that logged rewards; SFT-phase entries
    (merged_sft_alignment tags them phase=sft) are left out."""
    out = []
    for path in sorted(Path(artifact_dir).glob("*log_history*.jsonl")):
        entries = [e for e in read_jsonl(path) if e.get("phase") != "sft"]
        if any(isinstance(e.get("reward"), (int, float)) for e in entries):
            out.append((path.name, entries))
    return out


def collect(inputs: dict[str, Path]) -> dict:
    """Classify the inputs by their manifests and files (in input order)."""
    found = {"evaluations": [], "rl": [], "rejection": [], "manifests": {}}
    for role, d in inputs.items():
        d = Path(d)
        manifest = read_manifest(d)
        found["manifests"][role] = (d, manifest)
        kind = manifest.get("kind")
        if kind == "evaluation" or (role.startswith("eval_") and (d / "summary.json").exists()):
            found["evaluations"].append((role, d, manifest, evaluation_summary(d, manifest)))
            continue
        if (d / "filter_counts.json").exists():
            found["rejection"].append((role, d, manifest, read_json(d / "filter_counts.json",
                                                                     f"filter counts of {artifact_ref(manifest)}")))
        if kind == "checkpoint":
            for fname, history in _rl_histories(d):
                found["rl"].append((role, d, manifest, fname, history))
    return found


def ancestry(inputs: dict[str, Path]) -> list[dict]:
    """Name, version, kind, times of the inputs and of their ancestors (each manifest's `upstream`, written by the
    store), deduplicated, in order of start time."""
    seen: dict[str, dict] = {}
    for d in inputs.values():
        m = read_manifest(Path(d))
        for entry in [m] + list(m.get("upstream") or []):
            seen.setdefault(artifact_ref(entry), entry)
    return sorted(seen.values(), key=lambda m: (str(m.get("started_at", "")), artifact_ref(m)))


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def fmt_value(value: Any, percent: bool) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else "–"


def _column_names(evaluations: list) -> list[str]:
    """Column header per evaluation: the evaluated checkpoint's stage name (the `model` input), else the role."""
    names = []
    for role, _, manifest, _ in evaluations:
        model = (manifest.get("inputs") or {}).get("model") or {}
        names.append(str(model.get("name") or role))
    if len(set(names)) < len(names):
        names = [role for role, *_ in evaluations]
    return names


def evaluation_table(evaluations: list) -> dict:
    """{"columns": [...], "rows": [[label, cell, ...], ...], "values": [[label, value, ...]]}: benchmarks x metrics
    as rows (held-out first, then benchmarks in order of appearance), checkpoints in stage order as columns."""
    columns = _column_names(evaluations)
    benches: list[str] = []
    for *_, summary in evaluations:
        for name in summary["benchmarks"]:
            if name not in benches:
                benches.append(name)
    ks = {summary.get("k") for *_, summary in evaluations}
    k_label = str(next(iter(ks))) if len(ks) == 1 and None not in ks else "k"
    rows, values = [], []
    for bench in benches:
        for key, label, percent in METRICS:
            label = f"{bench} ({label.format(k=k_label)})"
            vals = [summary["benchmarks"].get(bench, {}).get(key) for *_, summary in evaluations]
            rows.append([label] + [fmt_value(v, percent) for v in vals])
            values.append([label] + vals)
    for key, label in (("k", "samples per question (k)"), ("backend", "generation backend")):
        vals = [summary.get(key) for *_, summary in evaluations]
        rows.append([label] + ["–" if v is None else str(v) for v in vals])
        values.append([label] + vals)
    for bench in benches:
        label = f"{bench}: questions"
        vals = [summary["benchmarks"].get(bench, {}).get("n_questions") for *_, summary in evaluations]
        rows.append([label] + ["–" if v is None else str(v) for v in vals])
        values.append([label] + vals)
    return {"columns": columns, "rows": rows, "values": values, "benchmarks": benches}


def markdown_table(header: list[str], rows: list[list[str]], align_right_from: int = 1) -> str:
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


# ---------------------------------------------------------------------------------------------------------------------
# What the plots show (drawn by stages/shared/plots.py)


def rejection_counts(filter_counts: dict) -> list[tuple[str, int]]:
    """(label, count) bars: drawn, accepted, then each filter's drops (filter_counts.json as written)."""
    bars = []
    for key in ("drawn", "accepted"):
        if isinstance(filter_counts.get(key), (int, float)):
            bars.append((key, filter_counts[key]))
    for reason, count in (filter_counts.get("dropped") or {}).items():
        if isinstance(count, (int, float)):
            bars.append((f"dropped: {reason}", count))
    for key, value in filter_counts.items():  # any other flat count a later version may add
        if key not in ("drawn", "accepted", "dropped") and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            bars.append((key, value))
    return bars


def _first_last(history: list[dict], key: str) -> tuple[Any, Any, int]:
    vals = [(e["step"], e[key]) for e in history
            if "step" in e and isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)
            and math.isfinite(e[key])]
    if not vals:
        return None, None, 0
    return vals[0], vals[-1], len(vals)


def _reward_keys(history: list[dict]) -> list[tuple[str, str]]:
    keys: dict[str, str] = {}
    for e in history:
        for k in e:
            if k.startswith("rewards/") and k.endswith("/mean") and k != "rewards/accuracy/mean":
                keys.setdefault(k, f"reward: {k.split('/')[1]}")
    return list(keys.items())


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path) -> dict:
    from stages.shared import plots

    output_dir = Path(output_dir)
    inputs = {role: Path(d) for role, d in inputs.items()}
    found = collect(inputs)
    evaluations, rl, rejection = found["evaluations"], found["rl"], found["rejection"]
    title = str(cfg.title)
    md: list[str] = [f"# {title}", ""]
    recipe = cfg.recipe
    md += [(f"Recipe `{recipe}`. " if recipe else "") + "The plots below are PNG files beside this report.",
           "", f"Inputs: {', '.join(f'{role}=`{artifact_ref(m)}`' for role, (_, m) in found['manifests'].items())}", ""]
    plots_written: list[str] = []
    data: dict[str, Any] = {"title": title, "evaluations": [], "rl": [],
                            "rejection": [], "wall_times": []}
    metrics: dict[str, Any] = {"evaluations": len(evaluations), "rl_stages": len(rl)}

    # -- evaluations ---------------------------------------------------------------------------------------------
    md += ["## Evaluation, stage by stage", ""]
    if evaluations:
        table = evaluation_table(evaluations)
        data["table"] = {k: table[k] for k in ("columns", "rows", "benchmarks")}
        md.append(markdown_table(["benchmark (metric)"] + table["columns"], table["rows"]))
        md += ["", "Rates in %, mean length in generated tokens. pass@1: mean correctness over the k samples of a "
                   "question at the evaluation's temperature and top-p; cons@k: majority vote over the extracted "
                   "answers (a sample without an answer casts no vote; ties go to the answer voted first). Code "
                   "rows: a sample is correct when its program passes every test, and cons@k votes over identical "
                   "normalised programs; `<split>-math` / `<split>-code` rows split a mixed benchmark by kind.", ""]
        md.append("Columns: " + "; ".join(
            f"**{col}**: `{(m.get('inputs') or {}).get('model', {}).get('name', '?')}"
            f"@{(m.get('inputs') or {}).get('model', {}).get('version', '?')}` (evaluation `{artifact_ref(m)}`)"
            for col, (role, _, m, _) in zip(table["columns"], evaluations)) + ".")
        md.append("")
        for col, (role, d, m, summary) in zip(table["columns"], evaluations):
            data["evaluations"].append({"role": role, "column": col, "artifact": artifact_ref(m), "dir": str(d),
                                        "model": (m.get("inputs") or {}).get("model"), "summary": summary})
            for bench, s in summary["benchmarks"].items():
                for key in ("pass@1", "cons@k"):
                    if isinstance(s.get(key), (int, float)):
                        metrics[f"{col}/{bench}/{key}"] = s[key]
        if plots.plot_accuracy_by_stage(table, evaluations, output_dir / "accuracy_by_stage.png"):
            plots_written.append("accuracy_by_stage.png")
            md += ["![accuracy by stage](accuracy_by_stage.png)", ""]
    else:
        md += ["No evaluation artifacts among the inputs.", ""]

    # -- RL curves -----------------------------------------------------------------------------------------------
    if rl:
        md += ["## RL training curves", ""]
    for role, d, m, fname, history in rl:
        name = f"rl_{_safe(role)}" + ("" if fname == "log_history.jsonl" else f"_{_safe(Path(fname).stem)}") + ".png"
        md += [f"### {role} (`{artifact_ref(m)}`)", ""]
        rows = []
        for key, label in RL_KEYS[:1] + _reward_keys(history) + RL_KEYS[1:]:
            first, last, n = _first_last(history, key)
            if n:
                rows.append([label, f"{first[1]:.4g} (step {first[0]})", f"{last[1]:.4g} (step {last[0]})", str(n)])
        if rows:
            md += [markdown_table(["logged value", "first", "last", "points"], rows), ""]
        path = plots.plot_rl(history, output_dir / name, title=f"{role}: {artifact_ref(m)}")
        if path:
            plots_written.append(name)
            md += [f"![{role} RL curves]({name})", ""]
        data["rl"].append({"role": role, "artifact": artifact_ref(m), "file": fname, "plot": name if path else None,
                           "table": rows})

    # -- rejection sampling --------------------------------------------------------------------------------------
    for role, d, m, counts in rejection:
        md += [f"## Rejection sampling: {role} (`{artifact_ref(m)}`)", ""]
        mm = m.get("metrics") or {}
        bars = rejection_counts(counts)
        rows = [[label, _fmt_num(c)] for label, c in bars]
        if isinstance(mm.get("acceptance_rate"), (int, float)):
            rows.insert(0, ["acceptance rate (%)", fmt_value(mm["acceptance_rate"], True)])
            metrics[f"{role}/acceptance_rate"] = mm["acceptance_rate"]
        for key in ("prompts", "pass_rate", "prompts_with_accepted", "general_used", "rows"):
            if key in mm:
                rows.append([key.replace("_", " "), _fmt_num(mm[key])])
        md += [markdown_table(["", "value"], rows), ""]
        name = f"rejection_{_safe(role)}.png"
        if plots.plot_rejection(bars, output_dir / name, f"{role}: samples per filter"):
            plots_written.append(name)
            md += [f"![{role} filter counts]({name})", ""]
        data["rejection"].append({"role": role, "artifact": artifact_ref(m), "filter_counts": counts,
                                  "acceptance_rate": mm.get("acceptance_rate"), "table": rows})

    # -- wall times ----------------------------------------------------------------------------------------------
    md += ["## Wall time per stage", "",
           "From each artifact's manifest (the inputs and their ancestors in the store), i.e. when it was made; a "
           "stage found in the store is not rerun, so these are the times of the runs that produced the artifacts. "
           "Which stages ran or were cached in a given run is in the flow's `run-summary` artifact.", ""]
    rows, bars = [], []
    total = 0.0
    for m in ancestry(inputs):
        secs = _seconds(m)
        total += secs or 0.0
        rows.append([str(m.get("name")), f"`{m.get('version')}`", str(m.get("kind", "")),
                     str(m.get("started_at", ""))[:19].replace("T", " "), "–" if secs is None else f"{secs:.1f}"])
        bars.append((str(m.get("name")), secs))
        data["wall_times"].append({"stage": m.get("name"), "version": m.get("version"), "kind": m.get("kind"),
                                   "started_at": m.get("started_at"), "seconds": secs})
    if rows:
        rows.append(["**total**", "", "", "", f"{total:.1f}"])
        md += [markdown_table(["stage", "version", "kind", "started (UTC)", "seconds"], rows, align_right_from=4), ""]
        if plots.plot_wall_times(bars, output_dir / "wall_times.png"):
            plots_written.append("wall_times.png")
            md += ["![wall time per stage](wall_times.png)", ""]
    metrics["stages_timed"] = len(data["wall_times"])
    metrics["total_stage_seconds"] = round(total, 2)

    data["plots"] = plots_written
    metrics["plots"] = len(plots_written)
    (output_dir / REPORT_MD).write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    (output_dir / REPORT_JSON).write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")
    log.info(f"report: {len(evaluations)} evaluation(s), {len(rl)} RL run(s), {len(rejection)} rejection-sampling "
             f"set(s), {len(plots_written)} plot(s) -> {output_dir / REPORT_MD}")
    return metrics
