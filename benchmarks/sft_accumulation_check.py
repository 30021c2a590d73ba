"""Gradient accumulation against one big batch, through the real stages: `cold_start_sft` trained twice on the same
samples, once as `--batch` rows per step and once as 4 micro-batches of a quarter, then their losses side by side.

    python benchmarks/sft_accumulation_check.py [--batch 32] [--json PATH] hardware=gpu [OVERRIDES...]

On a GPU (hardware.master_weights=optimizer) the accumulated run goes through `MasterWeightsAdamW`'s fp32 sum of the
micro-batches' bf16 gradients, the path of the paper preset's 128-step accumulation. Each step sees the same rows in
both runs (the sampler's order does not depend on the batch size), so the losses should agree to bf16 rounding. Also
printed: the dtype of the saved weights (fp32: the masters were put back before the final checkpoint). `base` is
trained first, shortly, where the store lacks it (`pipeline.runner.run_stage`, each stage in its own process).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACCUMULATION = 4


def losses(path: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (path / "log_history.jsonl").read_text().splitlines() if line.strip()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def weights_dtypes(path: Path) -> list[str]:
    from safetensors import safe_open

    dtypes = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return sorted(dtypes)


def main(argv: list[str]) -> int:
    from pipeline import artifacts, runner
    from pipeline.plan import artifacts_root, compose_config, plan, work_root

    json_path = argv[argv.index("--json") + 1] if "--json" in argv else None
    batch = int(argv[argv.index("--batch") + 1]) if "--batch" in argv else 32
    if batch % ACCUMULATION:  # else the micro-batches hold fewer rows than the batch, and the losses part for that
        raise SystemExit(f"--batch {batch}: use a multiple of {ACCUMULATION}, so that both runs see the same rows per "
                         f"step")
    overrides = [a for a in argv if "=" in a]
    common = [*overrides, "cold_start_sft.logging_steps=1", "cold_start_sft.eval_samples=0"]
    runs = {"one batch": [f"cold_start_sft.per_device_train_batch_size={batch}",
                          "cold_start_sft.gradient_accumulation_steps=1"],
            f"{ACCUMULATION} micro-batches": [f"cold_start_sft.per_device_train_batch_size={batch // ACCUMULATION}",
                                              f"cold_start_sft.gradient_accumulation_steps={ACCUMULATION}"]}
    result = {}
    for name, extra in runs.items():
        cfg = compose_config(common + extra)
        root, work = artifacts_root(cfg), work_root(cfg)
        stages = {s.name: s for s in plan(cfg)}
        for stage in (stages["base"], stages["cold_start_sft"]):
            start = time.time()
            done = runner.run_stage(stage, root=root, work_root=work, log=print)
            print(f"== {name}: {stage.name}@{stage.version} {'cached' if done['cached'] else 'ran'} in "
                  f"{time.time() - start:.1f} s", flush=True)
        path = artifacts.load(root, "cold_start_sft", stages["cold_start_sft"].version, verify=False)
        result[name] = {"losses": losses(path), "dtypes": weights_dtypes(path)}
    (a, ra), (b, rb) = result.items()
    steps = sorted(set(ra["losses"]) & set(rb["losses"]))
    print(f"\n{'step':>5s} {a:>14s} {b:>18s} {'rel. diff':>10s}")
    worst = 0.0
    for step in steps:
        x, y = ra["losses"][step], rb["losses"][step]
        worst = max(worst, abs(x - y) / abs(x))
        print(f"{step:5d} {x:14.5f} {y:18.5f} {abs(x - y) / abs(x):10.2e}")
    print(f"largest relative difference {worst:.2e} over {len(steps)} steps; saved weights: {a} {ra['dtypes']}, "
          f"{b} {rb['dtypes']}")
    if json_path:
        Path(json_path).write_text(json.dumps(result | {"largest_relative_difference": worst}, indent=1))
    return 0 if steps else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
