"""A stage that adds numbers: tests the orchestration (versions, caching, failure, the UI's view) without training.

It reports `steps` progress events (one `sleep_s` apart) with a made-up loss, as a trainer does, and draws a PNG
wider than the UI's image width, as the plotting stages do.

Two environment variables (not config, so they leave the version alone) let the store tests watch and stall it:
R1FLOW_TOY_TRACE appends one line per computation to a file (a version computed twice shows twice), and
R1FLOW_TOY_SLEEP_S keeps the stage running after it wrote part of its output (a run to kill, or to overlap with).

Faults it can inject through cfg.faults (tests/pipeline/test_faults.py): join a memory cgroup and allocate more than it
allows (the OOM killer), allocate under an address-space limit (MemoryError), write more than the disk holds
(ENOSPC), SIGKILL itself, or fail with a given message (a library's error line).
"""

import os
import resource
import signal
import time

from PIL import Image

from stages.shared.errors import UserError
from stages.shared.progress import Progress, emit


def run(cfg, inputs, output_dir, work_dir):
    # resume state, as a trainer leaves it: the runner removes it once the stage is published, keeps it on failure
    checkpoint = work_dir / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "optimizer.pt").write_bytes(b"\0" * (1 << 20))
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
    print(f"toy stage wrote {total}", flush=True)
    inject_faults(cfg.faults, output_dir)
    return {"value": float(total)}


def inject_faults(faults, output_dir):
    if os.environ.get("R1FLOW_TOY_CGROUP"):  # a memory cgroup the test made (an environment variable: the version
        # would hash the cgroup directory's files): its limit makes the kernel's OOM killer pick this process
        with open(os.path.join(os.environ["R1FLOW_TOY_CGROUP"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if faults.address_space_mb:  # RLIMIT_AS: this much more address space than the process has mapped now
        mapped_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
        limit = (mapped_kb << 10) + (faults.address_space_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if faults.allocate_mb:
        block = bytearray(faults.allocate_mb << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    if faults.write_mb:
        with open(output_dir / "big.bin", "wb") as f:
            for _ in range(faults.write_mb):
                f.write(b"\0" * (1 << 20))
    if faults.kill_self:
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.raise_message:
        raise ValueError(faults.raise_message)
