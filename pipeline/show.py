"""`r1flow report [NAME[@VERSION]]`: a report artifact's evaluation table, rejection-sampling counts, wall times and
plots, or an evaluation artifact's summary, in the terminal. Reads the files the report and evaluate stages wrote."""

from __future__ import annotations

from pathlib import Path

from stages.report import (METRICS, REPORT_JSON, REPORT_MD, artifact_ref, evaluation_summary, fmt_value, read_json,
                           read_manifest, text_table)
from stages.shared.errors import UserError


def print_report(artifact_dir) -> int:
    """Print a report artifact's evaluation table and where its plots are, or an evaluation artifact's summary."""
    d = Path(artifact_dir)
    manifest = read_manifest(d)
    kind = manifest.get("kind")
    if kind == "report" or (d / REPORT_JSON).exists():
        data = read_json(d / REPORT_JSON, f"report {artifact_ref(manifest)}")
        print(f"{data.get('title', 'report')}  ({artifact_ref(manifest)})")
        table = data.get("table")
        if table:
            print()
            print(text_table(["benchmark (metric)"] + table["columns"], table["rows"]))
        else:
            print("\n(no evaluations among the report's inputs)")
        for rs in data.get("rejection") or []:
            rate = rs.get("acceptance_rate")
            print(f"\nrejection sampling {rs['artifact']}: acceptance rate "
                  f"{fmt_value(rate, True)}%  " + ", ".join(f"{label}={v}" for label, v in rs["table"]
                                                         if not label.startswith("acceptance rate")))
        times = [w for w in data.get("wall_times") or [] if w.get("seconds") is not None]
        if times:
            print("\nwall time: " + ", ".join(f"{w['stage']} {w['seconds']:.0f}s" for w in times)
                  + f" (total {sum(w['seconds'] for w in times):.0f}s)")
        print(f"\nreport: {d / REPORT_MD}")
        for p in data.get("plots") or []:
            print(f"plot:   {d / p}")
        return 0
    if kind == "evaluation":
        summary = evaluation_summary(d, manifest)
        model = (manifest.get("inputs") or {}).get("model") or {}
        print(f"evaluation {artifact_ref(manifest)} of {model.get('name', '?')}@{model.get('version', '?')}: "
              f"k={summary.get('k')}, backend {summary.get('backend')}, T={summary.get('temperature', '?')}, "
              f"top_p={summary.get('top_p', '?')}")
        benches = list(summary["benchmarks"])
        k = summary.get("k") or "k"
        rows = [[label.format(k=k)] + [fmt_value(summary["benchmarks"][b].get(key), pct) for b in benches]
                for key, label, pct in METRICS]
        rows.append(["questions"] + [str(summary["benchmarks"][b].get("n_questions", "–")) for b in benches])
        print()
        print(text_table(["metric"] + benches, rows))
        print(f"\nrecords: {d / 'records.jsonl'}")
        return 0
    raise UserError(f"{artifact_ref(manifest)} is a {kind} artifact: `r1flow report` shows a report or an evaluation "
                    f"(e.g. `r1flow report report` or `r1flow report eval_final`)")
