"""Per-stage wall time and training throughput of a recipe run, read from the artifact store (manifests and each
checkpoint's log_history.jsonl).

    python benchmarks/stage_times.py hardware=gpu model=random_300m size=smoke          # after `r1flow run <same>`
    python benchmarks/stage_times.py --run hardware=gpu model=random_300m size=smoke    # run missing stages first
    python benchmarks/stage_times.py --run --stages base,cold_start_sft,reasoning_grpo hardware=multi_gpu ...

`--run` runs the planned stages that are not in the store with pipeline.runner.run_stage, in recipe order: the same
function the Prefect flow's tasks call (each stage in its own `python -m pipeline.runner spec.json` process, or
`accelerate launch` for hardware=multi_gpu), for machines where Prefect is not installed. `--stages a,b,...` runs and
reports only those stages of the recipe (their inputs must be in the store or among them).

Columns: seconds (the runner's wall time for the stage, process start to artifact published), train_s (the trainer's
train_runtime), tokens (TRL's num_tokens: tokens the trainer consumed, SFT stages), tok/s = tokens / train_s, and the
step count. Output also as JSON with --json PATH.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage_row(root: str, stage) -> dict:
    from pipeline import artifacts

    row = {"stage": stage.name, "version": stage.version, "module": stage.module}
    if not artifacts.exists(root, stage.name, stage.version):
        row["state"] = "missing"
        return row
    manifest = artifacts.read_manifest(root, stage.name, stage.version)
    metrics = manifest.get("metrics") or {}
    row.update(state="done", seconds=manifest.get("seconds"), train_s=metrics.get("train_runtime"),
               steps=metrics.get("global_step"))
    path = artifacts.load(root, stage.name, stage.version, verify=False)
    history = path / "log_history.jsonl"
    if history.is_file():
        entries = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        tokens = [e["num_tokens"] for e in entries if isinstance(e.get("num_tokens"), (int, float))]
        runtime = next((e["train_runtime"] for e in reversed(entries) if "train_runtime" in e), None)
        if tokens:
            row["tokens"] = int(max(tokens))
        if runtime:
            row["train_s"] = round(float(runtime), 2)
        if tokens and runtime:
            row["tok_per_s"] = round(max(tokens) / float(runtime))
    return row


def main(argv: list[str]) -> int:
    from pipeline import runner
    from pipeline.plan import artifacts_root, compose_config, plan, work_root

    run = "--run" in argv
    json_path = only = None
    if "--json" in argv:
        json_path = argv[argv.index("--json") + 1]
        argv = [a for a in argv if a != json_path]
    if "--stages" in argv:
        only = argv[argv.index("--stages") + 1]
        argv = [a for a in argv if a != only]
    overrides = [a for a in argv if not a.startswith("--")]
    cfg = compose_config(overrides)
    root, work = artifacts_root(cfg), work_root(cfg)
    stages = plan(cfg)
    if only:
        names = only.split(",")
        unknown = sorted(set(names) - {s.name for s in stages})
        if unknown:
            raise SystemExit(f"--stages: {unknown} not in the recipe ({', '.join(s.name for s in stages)})")
        stages = [s for s in stages if s.name in names]
    if run:
        for stage in stages:
            t = time.time()
            result = runner.run_stage(stage, root=root, work_root=work, log=print)
            print(f"== {stage.name}@{stage.version}: {'cached' if result['cached'] else 'ran'} "
                  f"in {time.time() - t:.1f} s", flush=True)
    rows = [stage_row(root, s) for s in stages]
    print(f"\n{'stage':24s} {'state':7s} {'seconds':>8s} {'train_s':>8s} {'steps':>6s} {'tokens':>9s} {'tok/s':>8s}")
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
    for r in rows:
        print(f"{r['stage']:24s} {r['state']:7s} {fmt(r.get('seconds'), '8.1f')} {fmt(r.get('train_s'), '8.1f')} "
              f"{fmt(r.get('steps'), '6d')} {fmt(r.get('tokens'), '9d')} {fmt(r.get('tok_per_s'), '8d')}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["state"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
