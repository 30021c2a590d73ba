"""`make ui-shot`: screenshots of what the Prefect UI shows for a run, taken with headless Chromium.

Starts the UI server (.venv-ui, as `make ui`) unless one answers at the address already, runs the smoke recipe into
its own store under work/ui-shot/ (a finished earlier run is reused: every stage is cached), reruns cold_start_sft to
catch a stage while it runs, and writes to ui-shots/ (or the folder given):

    run.png       the flow run page: the recipe's graph
    report.png    the run-report artifact, plots inline
    progress.png  the progress artifact of cold_start_sft while it trains
    running.png   the flow run page at that moment

    .venv/bin/python scripts/ui_shot.py [OUT_DIR] [overrides...]     (make ui-shot ARGS="size=default")
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PORT = int(os.environ.get("R1FLOW_UI_PORT", "4200"))
UI = f"http://127.0.0.1:{PORT}"
STORE = PROJECT / "work" / "ui-shot"
RUN = ["size=smoke", "evaluate.backend=hf", f"artifacts_root={STORE}/artifacts", f"work_root={STORE}/work"]
log = logging.getLogger("ui-shot")


def healthy() -> bool:
    try:
        with urllib.request.urlopen(f"{UI}/api/health", timeout=1):
            return True
    except OSError:
        return False


def start_server() -> subprocess.Popen | None:
    if healthy():
        log.info("reusing the Prefect server at %s", UI)
        return None
    env = dict(os.environ, PREFECT_UI_API_URL=f"{UI}/api")
    server = subprocess.Popen([str(PROJECT / ".venv-ui" / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(PORT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while not healthy():
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the Prefect server did not start on {UI}")
        time.sleep(0.5)
    log.info("started a Prefect server at %s", UI)
    return server


def shoot(url: str, path: Path, height: int = 1000) -> None:
    """Headless Chromium renders the page (the UI is a single-page app: JavaScript gets 15 s of virtual time)."""
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1400,{height}", "--virtual-time-budget=15000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    log.info("wrote %s (%s)", path, url)


def r1flow(*args: str, wait: bool = True):
    cmd = [str(PROJECT / ".venv" / "bin" / "python"), "-m", "pipeline.cli", *args]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait and proc.wait() != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode})")
    return proc


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(argv[0]) if argv and "=" not in argv[0] else PROJECT / "ui-shots"
    given = [a for a in argv if "=" in a]  # e.g. size=default (a longer run, numbers worth a look) replaces size=smoke
    overrides = [o for o in RUN if o.split("=")[0] not in {g.split("=")[0] for g in given}] + given
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(PROJECT / ".prefect"))
    os.environ.update(PREFECT_API_URL=f"{UI}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    server = start_server()
    try:
        log.info("r1flow run %s (a finished run is reused: cached stages take seconds)", " ".join(overrides))
        r1flow("run", *overrides)
        with get_client(sync_client=True) as client:
            finished = max((r for r in client.read_flow_runs() if r.parameters.get("overrides") == overrides
                            and r.state.is_completed()), key=lambda r: r.created)
            report = next(a for a in client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[finished.id]))) if a.key == "run-report")
        shoot(f"{UI}/runs/flow-run/{finished.id}", out / "run.png")
        shoot(f"{UI}/artifacts/artifact/{report.id}", out / "report.png", height=2400)

        log.info("r1flow stage cold_start_sft --force: screenshots while it trains")
        started = datetime.now(timezone.utc)
        stage = r1flow("stage", "cold_start_sft", "--force", *overrides, wait=False)
        progress = None
        with get_client(sync_client=True) as client:
            while stage.poll() is None and progress is None:
                time.sleep(0.5)
                progress = next((a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["progress-cold-start-sft"]))) if a.created >= started
                    and 5 <= a.data < 100), None)
            if progress is not None:
                shoot(f"{UI}/artifacts/artifact/{progress.id}", out / "progress.png")
                shoot(f"{UI}/runs/flow-run/{progress.flow_run_id}", out / "running.png")
            else:
                log.warning("cold_start_sft ended before its progress artifact could be caught")
        if stage.wait() != 0:
            raise SystemExit("r1flow stage cold_start_sft --force failed")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

if __name__ == "__main__":
    if CHROMIUM is None:
        print("ui-shot: no Chromium on PATH (Debian/Ubuntu: apt-get install -y chromium)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
