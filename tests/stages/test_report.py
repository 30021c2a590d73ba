"""stages/report.py on small but real-shaped artifacts (manifest.json, summary.json, log_history.jsonl,
filter_counts.json in a store layout): the table cells are the evaluation artifacts' numbers, the plots are PNGs, the
wall times come from the manifests (ancestors too), and `pipeline.show.print_report` shows reports and evaluations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import artifacts, show
from stages import report
from stages.shared.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALS = {  # role -> (evaluated stage, {benchmark: metrics})
    "eval_base": ("base", {"heldout": {"pass@1": 0.0625, "cons@k": 0.125, "format_rate": 0.03125,
                                       "language_consistency": 0.9871, "mean_length": 41.25, "n_questions": 16},
                           "math500": {"pass@1": 0.0, "cons@k": 0.0, "format_rate": 0.0,
                                       "language_consistency": 1.0, "mean_length": 96.0, "n_questions": 6}}),
    "eval_cold_start_sft": ("cold_start_sft", {
        "heldout": {"pass@1": 0.40625, "cons@k": 0.4375, "format_rate": 0.96875, "language_consistency": 0.999,
                    "mean_length": 33.5, "n_questions": 16},
        "math500": {"pass@1": 0.1667, "cons@k": 0.1667, "format_rate": 0.5, "language_consistency": 0.75,
                    "mean_length": 80.25, "n_questions": 6}}),
    "eval_reasoning_grpo": ("reasoning_grpo", {
        "heldout": {"pass@1": 0.46875, "cons@k": 0.5, "format_rate": 1.0, "language_consistency": 1.0,
                    "mean_length": 38.0625, "n_questions": 16},
        "math500": {"pass@1": 0.25, "cons@k": 0.3333, "format_rate": 0.6667, "language_consistency": 0.8,
                    "mean_length": 77.0, "n_questions": 6}}),
    "eval_final": ("merged_sft_alignment", {
        "heldout": {"pass@1": 0.5, "cons@k": 0.5625, "format_rate": 1.0, "language_consistency": 1.0,
                    "mean_length": 35.75, "n_questions": 16}}),  # no math500 here: a missing cell
}
GRPO_HISTORY = [
    {"step": 0, "heldout/accuracy": 0.4, "heldout/format_rate": 0.9},
    {"step": 1, "reward": 1.25, "rewards/accuracy/mean": 0.375, "rewards/format/mean": 0.875,
     "rewards/language_consistency/mean": 0.99, "completions/mean_length": 30.5, "kl": 0.0, "loss": 0.01},
    {"step": 2, "reward": 1.5, "rewards/accuracy/mean": 0.5, "rewards/format/mean": 1.0,
     "rewards/language_consistency/mean": 1.0, "completions/mean_length": 34.0, "kl": 0.002, "loss": 0.02},
    {"step": 2, "heldout/accuracy": 0.45, "heldout/format_rate": 1.0},
]
MERGED_HISTORY = [{"step": 1, "loss": 2.0, "phase": "sft"}, {"step": 2, "loss": 1.5, "phase": "sft"},
                  {"step": 1, "reward": 0.5, "rewards/accuracy/mean": 0.5, "completions/mean_length": 20.0},
                  {"step": 2, "reward": 0.75, "rewards/accuracy/mean": 0.75, "completions/mean_length": 22.0}]
FILTER_COUNTS = {"drawn": 64, "accepted": 21, "dropped": {"truncated": 5, "format": 12, "incorrect": 20,
                                                          "unverifiable": 0, "language": 2, "long_paragraph": 0,
                                                          "code_block": 0, "repetition": 1, "duplicate": 3, "cap": 0}}


def publish(root: Path, name: str, version: str, kind: str, *, inputs: dict | None = None, metrics: dict | None = None,
            seconds: float | None = None, started: str = "2026-11-23T01:00:00.000000+00:00",
            files: dict | None = None) -> Path:
    d = root / name / version
    d.mkdir(parents=True)
    for fname, content in (files or {}).items():
        (d / fname).write_text(content)
    manifest = {"name": name, "kind": kind, "version": version, "stage": name, "config": {},
                "inputs": {role: {"name": n, "version": v} for role, (n, v) in (inputs or {}).items()},
                "files": [], "metrics": metrics or {}, "started_at": started,
                "ended_at": started.replace("01:00:00", "01:00:30")}
    if seconds is not None:
        manifest["seconds"] = seconds
    manifest["upstream"] = artifacts.upstream(str(root), manifest["inputs"])  # what the store records
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def store(tmp_path):
    """A store holding an r1 run's artifacts; returns (root, inputs of the report stage in recipe order)."""
    root = tmp_path / "artifacts"
    t = lambda i: f"2026-11-23T01:{i:02d}:00.000000+00:00"  # noqa: E731
    publish(root, "base", "b0", "checkpoint", seconds=12.5, started=t(1))
    publish(root, "cold_start_sft", "c1", "checkpoint", inputs={"model": ("base", "b0")}, seconds=30.0, started=t(3))
    grpo = publish(root, "reasoning_grpo", "g2", "checkpoint", inputs={"model": ("cold_start_sft", "c1")},
                   seconds=95.25, started=t(6), metrics={"last_reward": 1.5},
                   files={"log_history.jsonl": jsonl(GRPO_HISTORY)})
    rs = publish(root, "rejection_sampling", "r3", "dataset", inputs={"model": ("reasoning_grpo", "g2")},
                 seconds=20.0, started=t(9), metrics={"acceptance_rate": 21 / 64, "prompts": 16, "rows": 28,
                                                      "pass_rate": 0.4},
                 files={"filter_counts.json": json.dumps(FILTER_COUNTS)})
    merged = publish(root, "merged_sft_alignment", "m4", "checkpoint",
                     inputs={"base": ("base", "b0"), "dataset": ("rejection_sampling", "r3")}, seconds=50.0,
                     started=t(12), files={"log_history.jsonl": jsonl(MERGED_HISTORY)})
    inputs = {}
    versions = {"base": "b0", "cold_start_sft": "c1", "reasoning_grpo": "g2", "merged_sft_alignment": "m4"}
    for i, (role, (model, benches)) in enumerate(EVALS.items()):
        summary = {"benchmarks": benches, "k": 4, "backend": "vllm", "temperature": 0.6, "top_p": 0.95}
        inputs[role] = publish(root, role, f"e{i}", "evaluation", inputs={"model": (model, versions[model])},
                               seconds=7.0 + i, started=t(20 + i), metrics={"pass@1": benches["heldout"]["pass@1"]},
                               files={"summary.json": json.dumps(summary), "records.jsonl": ""})
    inputs.update(reasoning_grpo=grpo, rejection_sampling=rs, merged_sft_alignment=merged)
    return root, inputs


def parse_table(md: str, first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header[1:], rows


def assert_png(path: Path):
    assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def run_report(store, tmp_path):
    root, inputs = store
    out = root / "report" / ".staging-0123456789ab-x1y2"
    out.mkdir(parents=True)
    metrics = report.run(OmegaConf.create({"title": "smoke report", "recipe": "r1"}), inputs, out, tmp_path / "w")
    return out, metrics


def test_report_table_holds_the_evaluation_numbers(store, tmp_path):
    out, metrics = run_report(store, tmp_path)
    md = (out / "report.md").read_text()
    columns, rows = parse_table(md, "benchmark (metric)")
    assert columns == ["base", "cold_start_sft", "reasoning_grpo", "merged_sft_alignment"]
    labels = {"pass@1": "pass@1", "cons@k": "cons@4", "format_rate": "format rate",
              "language_consistency": "language consistency", "mean_length": "mean length"}
    checked = 0
    for col, (role, (_, benches)) in enumerate(EVALS.items()):
        for bench in ("heldout", "math500"):
            for key, label in labels.items():
                cell = rows[f"{bench} ({label})"][col]
                value = benches.get(bench, {}).get(key)
                if value is None:
                    assert cell == "–"
                    continue
                expected = value if key == "mean_length" else 100 * value
                assert float(cell) == pytest.approx(expected, abs=0.05), (role, bench, key)
                checked += 1
    assert checked == 35
    assert rows["samples per question (k)"] == ["4"] * 4 and rows["generation backend"] == ["vllm"] * 4
    assert rows["heldout: questions"] == ["16"] * 4 and rows["math500: questions"] == ["6", "6", "6", "–"]
    assert metrics["evaluations"] == 4 and metrics["rl_stages"] == 2
    assert metrics["merged_sft_alignment/heldout/cons@k"] == 0.5625
    assert metrics["reasoning_grpo/math500/pass@1"] == 0.25
    json.dumps(metrics, allow_nan=False)


def test_report_plots_links_and_location(store, tmp_path):
    out, metrics = run_report(store, tmp_path)
    md = (out / "report.md").read_text()
    root = store[0]
    assert ".staging-" not in md and str(root) not in md  # the report knows nothing of the store's layout
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"accuracy_by_stage.png", "rl_reasoning_grpo.png", "rl_merged_sft_alignment.png",
                          "rejection_rejection_sampling.png", "wall_times.png"}
    for link in links:
        assert not Path(link).is_absolute()
        assert_png(out / link)
    assert metrics["plots"] == 5
    data = json.loads((out / "report.json").read_text())
    assert data["plots"] == sorted(data["plots"], key=links.index)


def test_report_rl_rejection_and_wall_times(store, tmp_path):
    out, metrics = run_report(store, tmp_path)
    md = (out / "report.md").read_text()
    grpo = md[md.index("### reasoning_grpo"):md.index("### merged_sft_alignment")]
    _, rl = parse_table(grpo, "logged value")
    assert rl["reward (total)"][:2] == ["1.25 (step 1)", "1.5 (step 2)"]
    assert rl["reward: format"][:2] == ["0.875 (step 1)", "1 (step 2)"]
    assert rl["reward: language_consistency"][1] == "1 (step 2)"
    assert rl["held-out accuracy"] == ["0.4 (step 0)", "0.45 (step 2)", "2"]
    assert rl["response length (tokens)"][1] == "34 (step 2)"
    merged = md[md.index("### merged_sft_alignment"):]
    _, rl2 = parse_table(merged, "logged value")
    assert rl2["reward (total)"] == ["0.5 (step 1)", "0.75 (step 2)", "2"]  # SFT-phase entries left out

    rs = md[md.index("## Rejection sampling"):]
    _, counts = parse_table(rs, "")
    assert counts["acceptance rate (%)"] == [f"{100 * 21 / 64:.1f}"]
    assert counts["drawn"] == ["64"] and counts["accepted"] == ["21"]
    assert counts["dropped: incorrect"] == ["20"] and counts["dropped: format"] == ["12"]
    assert counts["prompts"] == ["16"] and counts["rows"] == ["28"]
    assert metrics["rejection_sampling/acceptance_rate"] == 21 / 64

    _, times = parse_table(md, "stage")
    # the inputs and their ancestors (base and cold_start_sft are no inputs of the report), in order of start
    assert list(times) == ["base", "cold_start_sft", "reasoning_grpo", "rejection_sampling",
                           "merged_sft_alignment", "eval_base", "eval_cold_start_sft", "eval_reasoning_grpo",
                           "eval_final", "**total**"]
    assert times["base"][-1] == "12.5" and times["reasoning_grpo"][-1] == f"{95.25:.1f}"
    assert times["eval_final"][:2] == ["`e3`", "evaluation"]
    total = 12.5 + 30 + 95.25 + 20 + 50 + 7 + 8 + 9 + 10
    assert times["**total**"][-1] == f"{total:.1f}" and metrics["total_stage_seconds"] == total
    assert metrics["stages_timed"] == 9


def test_wall_time_falls_back_to_manifest_times_and_missing_pieces(tmp_path):
    root = tmp_path / "a"
    ev = publish(root, "eval_x", "e", "evaluation", inputs={"model": ("gone", "zz")},
                 metrics={"pass@1": 0.5, "cons@k": 0.75, "format_rate": 1.0, "language_consistency": 1.0,
                          "mean_length": 9.0, "n_questions": 4, "k": 2, "backend": "hf", "aime24/pass@1": 0.25})
    out = tmp_path / "o"
    out.mkdir()
    metrics = report.run(OmegaConf.create({"title": "t", "recipe": None}), {"eval_x": ev}, out, tmp_path / "w")
    md = (out / "report.md").read_text()
    _, rows = parse_table(md, "benchmark (metric)")  # no summary.json: rebuilt from the manifest's metrics
    assert rows["heldout (cons@2)"] == ["75.0"] and rows["aime24 (pass@1)"] == ["25.0"]
    _, times = parse_table(md, "stage")
    assert times["eval_x"][-1] == "30.0"  # ended_at - started_at; the missing ancestor is skipped
    assert metrics["plots"] == 2
    with pytest.raises(UserError, match="manifest"):
        report.run(OmegaConf.create({"title": "t", "recipe": None}), {"eval_y": tmp_path / "nowhere"}, out, tmp_path / "w")


def test_print_report_and_print_evaluation(store, tmp_path, capsys):
    out, _ = run_report(store, tmp_path)
    (out / "manifest.json").write_text(json.dumps({"name": "report", "version": "0123456789ab", "kind": "report"}))
    assert show.print_report(out) == 0
    text = capsys.readouterr().out
    assert "heldout (pass@1)" in text and "merged_sft_alignment" in text
    line = next(l for l in text.splitlines() if l.startswith("heldout (cons@4)"))
    assert line.split()[-4:] == ["12.5", "43.8", "50.0", "56.2"]
    assert "acceptance rate 32.8%" in text and str(out / "wall_times.png") in text
    assert str(out / "report.md") in text

    ev = store[1]["eval_cold_start_sft"]
    assert show.print_report(ev) == 0
    text = capsys.readouterr().out
    assert "eval_cold_start_sft@e1 of cold_start_sft@c1" in text and "k=4" in text
    line = next(l for l in text.splitlines() if l.startswith("pass@1"))
    assert line.split()[1:] == ["40.6", "16.7"]
    with pytest.raises(UserError, match="dataset artifact"):
        show.print_report(store[1]["rejection_sampling"])
