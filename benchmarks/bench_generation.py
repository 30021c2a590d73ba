"""Generated tokens per second: vLLM vs transformers `generate`, same model, prompts and sampling settings.

    .venv/bin/python benchmarks/bench_generation.py                 # tiny (~1M) and medium (~25M) models, both backends
    .venv/bin/python benchmarks/bench_generation.py --models tiny --repeats 1

Models are random-init Qwen3s built offline in a temporary directory (stages/shared/models.py: the task-world tokenizer,
vocab 512): `tiny` is conf/model/tiny.yaml's architecture, `medium` hidden 512 x 8 layers. Each (model, backend) pair
runs in its own process through stages/shared/generation.py (one engine start, not timed in tokens/s), one warm-up call, then
`--repeats` timed calls; the median is reported. Random weights rarely emit end-of-sequence, so nearly every sample runs
to max_tokens on both backends (the count of generated tokens is what is divided). CPU contention from other processes
distorts both numbers: check `uptime` and say so when you quote them.

Measured 2026-11-23 on the shared 2-core machine, other jobs running (load average 4-8), 16 x 8 x 64 tokens, median of 3:
  --threads 1: tiny (1.12M)  vLLM 5610 / HF 2637 tokens/s = 2.1x;  medium (25.7M) vLLM 850 / HF 382 = 2.2x
  --threads 2: tiny          vLLM  737 / HF  376          = 2.0x;  medium         vLLM 142 / HF  65 = 2.2x
vLLM runs in-process on CPU (stages/shared/generation.py), which is why it now beats HF even on the tiny model (STACK-NOTES
measured ~0.5x with vLLM's engine subprocess). With the cores contended, 2 threads were 6-8x slower than 1 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=512, max_position_embeddings=512, tie_word_embeddings=False)
MEDIUM = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              intermediate_size=1536, max_position_embeddings=512, tie_word_embeddings=False)
CORPUS = ["data/arith/pretrain.jsonl", "data/arith/cold_start.jsonl", "data/arith/general_sft.jsonl"]


def build(out: Path, arch: dict) -> int:
    import torch

    from stages.shared.models import build_model, build_tokenizer

    tok = build_tokenizer([ROOT / c for c in CORPUS], 512)
    torch.manual_seed(0)
    model = build_model(arch, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def prompts(k: int, model_dir: str) -> list[str]:
    from stages.shared.models import load_tokenizer
    from stages.shared.templates import render_prompt

    tok = load_tokenizer(model_dir)
    rows = [json.loads(x) for x in (ROOT / "data/arith/rl_train.jsonl").read_text().splitlines()[:k]]
    return [render_prompt(r["prompt"], "r1", tok) for r in rows]


def measure(args) -> dict:
    """Child process: one backend on one model."""
    import torch

    from stages.shared.generation import open_generator

    torch.set_num_threads(args.threads)
    from pipeline.plan import compose_config

    hardware = compose_config(["hardware.vllm.cpu_kvcache_space_gib=1",
                               f"hardware.vllm.cpu_omp_threads_bind=0-{args.threads - 1}"]).hardware
    ps = prompts(args.prompts, args.model_dir)
    kw = dict(n=args.n, temperature=1.0, top_p=0.95, max_tokens=args.max_tokens)
    t0 = time.time()
    with open_generator(args.model_dir, backend=args.backend, hardware=hardware, seed=0, max_model_len=512,
                        batch_size=args.prompts) as gen:
        start = time.time() - t0
        gen.generate(ps[:2], **{**kw, "max_tokens": 8}, seed=0)  # warm-up
        rates = []
        for r in range(args.repeats):
            t = time.time()
            out = gen.generate(ps, **kw, seed=1 + r)
            dt = time.time() - t
            rates.append(sum(s["num_tokens"] for o in out for s in o) / dt)
    return {"backend": gen.backend, "startup_s": round(start, 1), "tokens_per_s": round(statistics.median(rates), 1),
            "runs": [round(x, 1) for x in rates]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    print(f"{args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens, T=1.0 top_p=0.95, "
          f"{args.threads} threads, median of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = Path(tmp) / name
            params = build(model_dir, {"tiny": TINY, "medium": MEDIUM}[name])
            res = {}
            for backend in args.backends.split(","):
                cmd = [sys.executable, __file__, "--child", "--backend", backend, "--model-dir", str(model_dir),
                       "--prompts", str(args.prompts), "--n", str(args.n), "--max-tokens", str(args.max_tokens),
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{name} {backend}: failed\n{proc.stderr[-2000:]}")
                    continue
                res[backend] = json.loads(line[len("RESULT "):])
                r = res[backend]
                print(f"{name:<7} {params / 1e6:6.2f}M params  {backend:<5} {r['tokens_per_s']:>9.1f} tokens/s  "
                      f"(runs {r['runs']}, engine start {r['startup_s']} s)", flush=True)
            if "vllm" in res and "hf" in res:
                print(f"{name:<7} vLLM / HF = {res['vllm']['tokens_per_s'] / res['hf']['tokens_per_s']:.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
