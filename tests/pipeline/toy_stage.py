"""A stage that adds numbers: tests the orchestration (versions, caching, failure) without training anything.

Two environment variables (not config, so they leave the version alone) let the store tests watch and stall it:
R1FLOW_TOY_TRACE appends one line per computation to a file (a version computed twice shows twice), and
R1FLOW_TOY_SLEEP_S keeps the stage running after it wrote part of its output (a run to kill, or to overlap with).
"""

import os
import time

from stages.shared.errors import UserError


def run(cfg, inputs, output_dir, work_dir):
    if cfg.fail:
        raise RuntimeError("toy stage failed on purpose")
    if cfg.user_error:
        raise UserError("data/toy.jsonl line 3: field 'answer' is missing; add it or fix data.files")
    total = cfg.value + sum(int((path / "value.txt").read_text()) for path in inputs.values())
    if os.environ.get("R1FLOW_TOY_TRACE"):
        with open(os.environ["R1FLOW_TOY_TRACE"], "a") as trace:
            trace.write(f"{cfg.value} {os.getpid()}\n")
    if os.environ.get("R1FLOW_TOY_SLEEP_S"):
        (output_dir / "partial.txt").write_text("written before the sleep")
        time.sleep(float(os.environ["R1FLOW_TOY_SLEEP_S"]))
        (output_dir / "partial.txt").unlink()
    (output_dir / "value.txt").write_text(str(total))
    print(f"toy stage wrote {total}")
    return {"value": float(total)}
