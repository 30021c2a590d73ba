"""Throughput of the accuracy reward (extract + math-verify): completions verified per second.

    .venv/bin/python benchmarks/bench_rewards.py [--n 2000] [--runs 3] [--batch 0] [--workers N]
    .venv/bin/python benchmarks/bench_rewards.py --language [--runs 5]

Each run scores fresh, distinct completions (new random answers, caches cleared), so neither our result cache nor
math-verify's parse caches help; half are correct in another form (0.5 vs 1/2, 1,000 vs 1000, ...), half are wrong.
"serial": `check_answer` in a loop in this process (math-verify's own cost, no time bound, no pool); "pool":
`accuracy_reward` through the bounded verification pool (conf/config.yaml `verification`, `--workers` overriding).
``--batch 64`` splits the completions into TRL-sized calls. Prints the median of the runs.
``--language``: instead, the language-consistency reward on one ~200k-character mixed-script completion (the
regex scan must stay linear: a GRPO step scores G long completions on the trainer's critical path).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.plan import compose_config  # noqa: E402
from stages.shared import rewards  # noqa: E402
from stages.shared.rewards import accuracy, verification  # noqa: E402
from stages.shared.rewards.language import language_consistency  # noqa: E402
from stages.shared.templates import extract_answer_with_kind  # noqa: E402


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


def serial_check(text: str, gold: str, settings: dict) -> float | None:
    pred, kind = extract_answer_with_kind(text)
    try:
        verdict = accuracy.check_answer(gold, pred, kind, settings["math_verify_timeout_s"])
    except TimeoutError:  # math-verify's own alarm (a busy machine): "cannot tell", as in the pool
        return None
    return float(verdict)


def one_run(n: int, seed: int, mode: str, batch: int, settings: dict) -> tuple[float, int]:
    """(completions per second, checks that did not finish)."""
    completions, golds = make_batch(n, seed)
    accuracy.clear_cache()
    step = batch or n
    start = time.perf_counter()
    scores = []
    for i in range(0, n, step):
        texts, answers = completions[i : i + step], golds[i : i + step]
        if mode == "serial":
            scores += [serial_check(text, gold, settings) for text, gold in zip(texts, answers)]
        else:
            scores += rewards.accuracy_reward(texts, answer=answers, verification=settings)
    elapsed = time.perf_counter() - start
    assert len(scores) == n and all(s in (0.0, 1.0, None) for s in scores), "unexpected scores"
    return n / elapsed, scores.count(None)


def language_speed(runs: int) -> None:
    text = "We add the numbers and carry the one, then 我们 check. " * 4000
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        score = language_consistency(text, "en")
        seconds.append(time.perf_counter() - start)
    print(f"language_consistency on {len(text)} characters: median {statistics.median(seconds) * 1000:.1f} ms "
          f"of {runs} runs ({', '.join(f'{s * 1000:.1f}' for s in seconds)} ms), score {score:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="completions per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="completions per reward call (0: all in one call)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: verification.workers)")
    parser.add_argument("--language", action="store_true", help="time the language-consistency reward instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.language:
        language_speed(args.runs)
        return
    settings = dict(compose_config([]).verification)
    if args.workers:
        settings["workers"] = args.workers
    one_run(50, 999, "serial", 0, settings)  # warm up math-verify in this process
    one_run(50, 998, "pool", 0, settings)  # and the workers
    workers = verification.worker_count(verification.settings(settings))
    print(f"accuracy_reward throughput: {args.n} completions per run, median of {args.runs}, "
          f"batch {args.batch or args.n}, {workers} worker(s), {os.cpu_count()} CPU(s), "
          f"timeout {settings['timeout_s']} s")
    results = {}
    for mode in ("serial", "pool"):
        runs = [one_run(args.n, 1000 * run + (mode == "pool"), mode, args.batch, settings) for run in range(args.runs)]
        rates = [rate for rate, _ in runs]
        results[mode] = statistics.median(rates)
        print(f"  {mode:7s} {results[mode]:8.0f} completions/s   runs: " + ", ".join(f"{r:.0f}" for r in rates)
              + f"   unfinished checks (None): {sum(u for _, u in runs)}", flush=True)
    print(f"  pool / serial {results['pool'] / results['serial']:.2f}x; stats {rewards.verifier_stats()}")
    verification.shutdown()


if __name__ == "__main__":
    main()
