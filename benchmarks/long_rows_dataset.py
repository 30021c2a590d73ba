"""A stage-3 dataset of long reasoning conversations, published into the store for the SFT stages to train on.

A random-weight teacher answers every question wrongly, so its rejection sampling keeps no reasoning sample and the
distill recipe trains its student on short general rows only: distillation's SFT at the paper preset's 32,768-token
rows never runs. This writes a rejection-sampling-shaped artifact (train.jsonl rows {messages, kind: reasoning}) whose
assistant turns are `<think>` arithmetic steps `</think>` and a boxed answer, each about --tokens tokens long under the
given tokenizer, under a version of its own; the distill stage trains on it through the recipe's pin:

    python benchmarks/long_rows_dataset.py --root /tmp/art --tokenizer /tmp/fx/deepseek-r1-distill-qwen-1.5b \
        --rows 8 --tokens 33000            # prints the version, e.g. long-8x33000-1a2b3c4d
    python benchmarks/stage_times.py --run --stages student_base,distill recipe=distill \
        +recipe.pins.rejection_sampling=long-8x33000-1a2b3c4d artifacts_root=/tmp/art ...

The rows are synthetic, so only memory, speed and the code path mean anything; the loss does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reasoning_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """`<think>` steps `</think>` answer, grown step by step until it holds `tokens` tokens."""
    steps, total, value = [], 0, rng.randint(1, 99)
    while total < tokens:
        a = rng.randint(1, 999)
        step = f"Step {len(steps) + 1}: {value} + {a} = {value + a}, so the running total is {value + a}.\n"
        value += a
        steps.append(step)
        total += len(tokenizer(step, add_special_tokens=False)["input_ids"])
    return f"<think>\n{''.join(steps)}</think>\nThe total is \\boxed{{{value}}}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the artifact store (artifacts_root of the run)")
    parser.add_argument("--tokenizer", required=True, help="a checkpoint directory whose tokenizer counts the tokens")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=33000, help="tokens per assistant turn (rows longer than the "
                        "SFT's max_length are cut to it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from pipeline import artifacts

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(args.seed)
    rows = [{"messages": [{"role": "user", "content": f"Add up the numbers of exercise {i + 1}."},
                          {"role": "assistant", "content": reasoning_text(rng, tokenizer, args.tokens)}],
             "kind": "reasoning"} for i in range(args.rows)]
    body = "".join(json.dumps(r) + "\n" for r in rows)
    version = f"long-{args.rows}x{args.tokens}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"
    if artifacts.exists(args.root, "rejection_sampling", version):
        print(version)
        return 0
    staging = artifacts.staging_dir(args.root, "rejection_sampling", version)
    (staging / "train.jsonl").write_text(body)
    config = {"synthetic": "benchmarks/long_rows_dataset.py", "rows": args.rows, "tokens": args.tokens,
              "seed": args.seed, "tokenizer": str(args.tokenizer)}
    now = artifacts.utc_now()
    artifacts.publish(args.root, "rejection_sampling", version, staging, kind="dataset", stage="rejection_sampling",
                      inputs={}, config=config, metrics={"samples": args.rows, "samples_reasoning": args.rows},
                      started_at=now, ended_at=now)
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
