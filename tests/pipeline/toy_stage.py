"""A stage that adds numbers: tests the orchestration (versions, caching, failure, the UI's view) without training.

It reports `steps` progress events (one `sleep_s` apart) with a made-up loss, as a trainer does, and draws a PNG
wider than the UI's image width, as the plotting stages do.

Two environment variables (not config, so they leave the version alone) let the store tests watch and stall it:
R1FLOW_TOY_TRACE appends one line per computation to a file (a version computed twice shows twice), and
R1FLOW_TOY_SLEEP_S keeps the stage running after it wrote part of its output (a run to kill, or to overlap with).
"""

import os
import time

from PIL import Image

from stages.shared.errors import UserError
from stages.shared.progress import Progress, emit


def run(cfg, inputs, output_dir, work_dir):
    if cfg.fail:
        raise RuntimeError("toy stage failed on purpose")
    if cfg.user_error:
        raise UserError("data/toy.jsonl line 3: field 'answer' is missing; add it or fix data.files")
    (work_dir / "started").touch()
    with Progress(cfg.steps, "train", "toy steps") as progress:
        for step in range(1, cfg.steps + 1):
            time.sleep(cfg.sleep_s)
            emit("train", step, cfg.steps, {"loss": 1.0 / step, "grad_norm": 0.5})
            progress.update()
    total = cfg.value + sum(int((path / "value.txt").read_text()) for path in inputs.values())
    if os.environ.get("R1FLOW_TOY_TRACE"):
        with open(os.environ["R1FLOW_TOY_TRACE"], "a") as trace:
            trace.write(f"{cfg.value} {os.getpid()}\n")
    if os.environ.get("R1FLOW_TOY_SLEEP_S"):
        (output_dir / "partial.txt").write_text("written before the sleep")
        time.sleep(float(os.environ["R1FLOW_TOY_SLEEP_S"]))
        (output_dir / "partial.txt").unlink()
    (output_dir / "value.txt").write_text(str(total))
    Image.new("RGB", (1800, 600), (40, 90, 160)).save(output_dir / "toy_plot.png")
    (output_dir / "report.md").write_text(f"# toy report\n\ntotal {total}\n\n![toy plot](toy_plot.png)\n")
    print(f"toy stage wrote {total}")
    return {"value": float(total)}
