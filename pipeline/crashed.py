"""Flow runs whose process died (SIGKILL, the OOM killer, a closed terminal) are marked Crashed by the next command.

A Prefect server cannot tell a dead flow run from a slow one: a run killed without a chance to report stays "Running".
So every r1flow flow run holds an exclusive lock on `<PREFECT_HOME>/r1flow-runs/<flow run id>.lock` for as long as its
process lives, as the runner's stage locks do for a stage (`work/<stage>/<version>/.lock`); the kernel releases a
lock when its process dies, however it dies. A lock file whose lock can be taken again belongs to a dead run: its
flow run, and those of its task runs that had not finished, are set to Crashed, and the file is removed. Prefect is
contacted only when such a file exists, so commands stay fast.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def lock_dir() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "r1flow-runs"


def api_url() -> str:
    """Which server recorded the run (empty: Prefect's temporary one over PREFECT_HOME's database)."""
    return os.environ.get("PREFECT_API_URL", "")


@contextmanager
def hold_run_lock(flow_run_id):
    """Hold the lock of this flow run while the block runs. The file gets its final name only once locked, so a
    command sweeping for dead runs never sees it unheld while its run lives."""
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{flow_run_id}.lock"
    tmp = directory / f".{flow_run_id}.{os.getpid()}.tmp"
    lock = open(tmp, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write(api_url())
    lock.flush()
    os.replace(tmp, path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


def dead_runs() -> list[tuple[str, Path, object]]:
    """(flow run id, lock file) of the runs of this server whose process is gone; their locks stay held by the caller's
    open files until the files are removed, so two sweeping commands do not mark one run twice."""
    dead = []
    for path in sorted(lock_dir().glob("*.lock")):
        try:
            lock = open(path, "r+")
        except FileNotFoundError:  # its run just ended
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # alive
            lock.close()
            continue
        if path.exists() and lock.read() == api_url():
            dead.append((path.stem, path, lock))
        else:
            lock.close()
    return dead


def mark_crashed_runs() -> list[str]:
    """Set the flow runs of dead r1flow processes (and their unfinished task runs) to Crashed; returns their ids."""
    dead = dead_runs()
    if not dead:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    marked = []
    message = "the r1flow process running it died (found by the next r1flow command: its run lock was free)"
    with get_client(sync_client=True) as client:
        for run_id, path, lock in dead:
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:  # a database that has been reset since
                run = None
            if run is not None and not (run.state and run.state.is_final()):
                for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
                    if not (task_run.state and task_run.state.is_final()):
                        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                marked.append(run_id)
                log.warning("flow run %s (%s) was still 'Running' but its process is gone: marked Crashed",
                            run.name, run_id)
            path.unlink(missing_ok=True)
            lock.close()
    return marked
