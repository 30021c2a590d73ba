"""Two processes on the cores at once, each with 1 or 2 torch threads: why the test workers use one thread each.

    .venv/bin/python benchmarks/bench_cpu_threads.py [--steps 3000]

Each process runs the same small MLP forward+backward loop (the size of the embedded world's models' layers). Prints
the seconds of each process: alone with 1 and with 2 threads, then two at once with 1 thread each and with 2 each
(the slower of the pair). On a machine with as many cores as threads in all, both pairs take about as long as alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def work(threads: int, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    x = torch.randn(64, 256)
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    return time.perf_counter() - start


def run(threads: int, steps: int, copies: int) -> float:
    """Seconds of the slowest of ``copies`` processes started together."""
    cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    return max(float(p.communicate()[0]) for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(work(args.child, args.steps))
        return
    print(f"{os.cpu_count()} CPU(s), {args.steps} steps per process")
    for copies in (1, 2):
        for threads in (1, 2):
            print(f"  {copies} process(es) x {threads} thread(s): {run(threads, args.steps, copies):6.2f} s", flush=True)


if __name__ == "__main__":
    main()
