"""Engine start-up against generation speed: when does vLLM pay for its start over transformers' `generate`?

Each backend runs in a fresh process through the project's generation module (`open_generator`, what evaluate,
rejection_sampling and the held-out checks use) on `model=random_300m` (303M, random init, the task world's tokenizer):
start (import + engine, or model load for HF), then generation at two sizes, timed. vLLM runs three ways: its defaults
with a cold compile cache, the same again with the cache warm (VLLM_CACHE_ROOT kept), and enforce_eager (no
torch.compile, no CUDA graphs).

    python benchmarks/bench_engine_start.py                # all four processes, a table, $OUT/engine_start.json

Break-even: vLLM wins once start_vllm + T / rate_vllm < start_hf + T / rate_hf, i.e. for
T > (start_vllm - start_hf) / (1 / rate_hf - 1 / rate_vllm) generated tokens (rates at the larger size).

Not run yet (2026-11-26: the session's device time went to the recipe runs; benchmarks/README.md derives the
break-even from those runs' engine starts and the earlier HF rates instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="engine_start_"))
MODEL = Path(os.environ.get("ENGINE_BENCH_MODEL", "/tmp/engine_start_random_300m"))
CACHE = os.environ.get("ENGINE_BENCH_CACHE", "/tmp/engine_start_vllm_cache")
SIZES = [(8, 4, 96), (64, 4, 256)]          # prompts x samples x max tokens
RUNS = {"hf": ("hf", {}), "vllm_cold": ("vllm", {}), "vllm_warm": ("vllm", {}),
        "vllm_eager": ("vllm", {"enforce_eager": True})}


def modules():
    from stages.shared import data, generation, models

    return data, generation, models


def build_model():
    import torch
    from omegaconf import OmegaConf

    from pipeline.plan import compose_config

    data, _, models = modules()
    if (MODEL / "config.json").is_file():
        return
    cfg = compose_config(["hardware=gpu", "model=random_300m"])
    tok = models.build_tokenizer([str(data.resolve_path(p)) for p in cfg.model.tokenizer.corpus],
                                 int(cfg.model.tokenizer.vocab_size))
    torch.manual_seed(0)
    m = models.build_model(OmegaConf.to_container(cfg.model.architecture), tok)
    m.save_pretrained(MODEL)
    tok.save_pretrained(MODEL)


def prompts(k):
    rows = [json.loads(x) for x in (ROOT / "data/arith/rl_train.jsonl").read_text().splitlines()[:k]]
    return [f"Question: {r['prompt']}\nAnswer:" for r in rows]


def measure(name) -> dict:
    from omegaconf import OmegaConf

    from pipeline.plan import compose_config

    _, generation, _ = modules()
    backend, vllm_extra = RUNS[name]
    hardware = OmegaConf.to_container(compose_config(["hardware=gpu"]).hardware, resolve=True)
    hardware["vllm"] = {**hardware["vllm"], **vllm_extra}
    t = time.perf_counter()
    r = {"name": name, "backend": backend}
    with generation.open_generator(MODEL, backend=backend, hardware=hardware, seed=0) as gen:
        r["start_s"] = round(time.perf_counter() - t, 1)
        for p, n, m in SIZES:
            t = time.perf_counter()
            out = gen.generate(prompts(p), n=n, temperature=1.0, top_p=1.0, max_tokens=m, seed=0)
            dt = time.perf_counter() - t
            tokens = sum(s["num_tokens"] for samples in out for s in samples)
            r[f"{p}x{n}x{m}"] = {"s": round(dt, 2), "tokens": tokens, "tokens_per_s": round(tokens / dt)}
    print("RESULT", json.dumps(r), flush=True)
    return r


def main(argv) -> int:
    if argv[:1] == ["--one"]:
        measure(argv[1])
        return 0
    build_model()
    env = {**os.environ, "VLLM_CACHE_ROOT": CACHE, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    results = []
    for name in argv or list(RUNS):
        t = time.time()
        log = OUT / "engine_start.log"
        with log.open("a") as f:
            f.write(f"\n===== {name}\n")
            f.flush()
            rc = subprocess.run([sys.executable, __file__, "--one", name], stdout=f, stderr=subprocess.STDOUT,
                                env=env, timeout=240).returncode
        got = [json.loads(line.split("RESULT ", 1)[1]) for line in log.read_text().splitlines()
               if line.startswith("RESULT ") and f'"name": "{name}"' in line]
        r = got[-1] if got else {"name": name, "error": f"rc={rc}"}
        r["process_s"] = round(time.time() - t, 1)
        results.append(r)
    big = "x".join(map(str, SIZES[-1]))
    hf = next((r for r in results if r["name"] == "hf" and big in r), None)
    for r in results:
        if hf and r.get("backend") == "vllm" and big in r:
            slow, fast = hf[big]["tokens_per_s"], r[big]["tokens_per_s"]
            r["break_even_tokens"] = round((r["start_s"] - hf["start_s"]) / (1 / slow - 1 / fast))
    (OUT / "engine_start.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'run':12s} {'start s':>8s} {'process s':>9s} " + " ".join(f"{'x'.join(map(str, s)) + ' tok/s':>16s}"
                                                                   for s in SIZES) + f" {'break-even tok':>14s}")
    for r in results:
        cells = " ".join(f"{r.get('x'.join(map(str, s)), {}).get('tokens_per_s', '-'):>16}" for s in SIZES)
        print(f"{r['name']:12s} {r.get('start_s', '-'):>8} {r['process_s']:>9} {cells} "
              f"{r.get('break_even_tokens', '-'):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
