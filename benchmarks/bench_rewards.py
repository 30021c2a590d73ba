"""Throughput of the accuracy reward (extract + math-verify): completions verified per second, parallel path on/off.

    .venv/bin/python benchmarks/bench_rewards.py [--n 2000] [--runs 3] [--batch 0] [--workers N]

Each run scores fresh, distinct completions (new random answers, caches cleared), so neither our result cache nor
math-verify's parse caches help; half are correct in another form (0.5 vs 1/2, 1,000 vs 1000, ...), half are wrong.
"off": inline on the main thread (``verify_parallel=False``); "on": the persistent worker pool
(``verify_parallel=True``). ``--batch 64`` splits the completions into TRL-sized calls. Prints the median of the runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.shared import rewards  # noqa: E402


def make_batch(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        a, b = rng.randint(1, 10**6), rng.randint(2, 999)
        kind = i % 6
        if kind == 0:
            gold, right, wrong = f"{a}", f"{a:,}", f"{a + 1}"
        elif kind == 1:
            gold, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"{a}/{b + 1}"
        elif kind == 2:
            gold, right, wrong = f"{a / 8:.3f}", f"\\frac{{{a}}}{{8}}", f"\\frac{{{a}}}{{7}}"
        elif kind == 3:
            gold, right, wrong = f"-{a}", f"-{a}.0", f"{a}"
        elif kind == 4:
            gold, right, wrong = f"{a % 100}\\%", f"{a % 100}", f"{a % 100 + 3}"
        else:
            gold, right, wrong = f"{b}\\sqrt{{2}}", f"\\sqrt{{{2 * b * b}}}", f"{b}\\sqrt{{3}}"
        answer = right if rng.random() < 0.5 else wrong
        completions.append(f"<think>Some reasoning about case {i} ({seed}).</think> The answer is \\boxed{{{answer}}}.")
        golds.append(gold)
    return completions, golds


def one_run(n: int, seed: int, parallel: bool, batch: int) -> float:
    completions, golds = make_batch(n, seed)
    rewards.clear_verify_cache()
    step = batch or n
    start = time.perf_counter()
    scores = []
    for i in range(0, n, step):
        scores += rewards.accuracy_reward(completions[i : i + step], answer=golds[i : i + step],
                                          verify_parallel=parallel)
    elapsed = time.perf_counter() - start
    assert len(scores) == n and all(s in (0.0, 1.0) for s in scores), "unexpected scores"
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="completions per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="completions per reward call (0: all in one call)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: R1FLOW_VERIFY_WORKERS or "
                                                                 "min(4, CPUs))")
    args = parser.parse_args()
    if args.workers:
        os.environ["R1FLOW_VERIFY_WORKERS"] = str(args.workers)
    rewards.start_verifier_pool()
    pool = rewards.get_verifier_pool()
    one_run(50, 999, False, 0)  # warm up math-verify in this process
    one_run(50, 998, True, 0)  # and the workers
    print(f"accuracy_reward throughput: {args.n} completions per run, median of {args.runs}, "
          f"batch {args.batch or args.n}, {pool.size} worker(s), {os.cpu_count()} CPU(s), "
          f"timeout {rewards._timeout_value(None)} s")
    results = {}
    for label, parallel in (("off (inline)", False), ("on (pool)", True)):
        rates = [one_run(args.n, 1000 * run + (1 if parallel else 0), parallel, args.batch) for run in range(args.runs)]
        results[label] = statistics.median(rates)
        print(f"  parallel {label:13s} {results[label]:8.0f} completions/s   runs: "
              + ", ".join(f"{r:.0f}" for r in rates), flush=True)
    off, on = results["off (inline)"], results["on (pool)"]
    print(f"  speed-up {on / off:.2f}x; stats {rewards.verifier_stats()}")
    rewards.shutdown_verifier_pool()


if __name__ == "__main__":
    main()
