"""The test session's own Prefect: a PREFECT_HOME in a temporary directory and, for the tests that run flows, a
Prefect server of the kind `make ui` starts, on a free port. Nothing a test does reaches the project's .prefect or a
`make ui` server the user has open.

The environment is set here, at import, because Prefect reads its settings once when it is first imported; the CLI
subprocesses of the end-to-end tests inherit it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_HOME = Path(tempfile.mkdtemp(prefix="r1flow-test-prefect-"))
PREFECT_API = f"http://127.0.0.1:{_free_port()}/api"
os.environ.update(PREFECT_HOME=str(PREFECT_HOME), PREFECT_API_URL=PREFECT_API,
                  PREFECT_LOCAL_STORAGE_PATH=str(PREFECT_HOME / "storage"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                  PREFECT_SERVER_UI_ENABLED="false", HF_HUB_OFFLINE="1")


def _prefect_command() -> list[str]:
    """The UI's own server (.venv-ui, see the Makefile); the pipeline's venv serves the same API where it is absent."""
    ui = PROJECT / ".venv-ui" / "bin" / "prefect"
    return [str(ui)] if ui.exists() else [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="session")
def prefect_server():
    """A Prefect server for the session, at PREFECT_API_URL, with its database under the session's PREFECT_HOME."""
    port = PREFECT_API.rsplit(":", 1)[1].split("/")[0]
    log = open(PREFECT_HOME / "server.log", "w")
    proc = subprocess.Popen(_prefect_command() + ["server", "start", "--host", "127.0.0.1", "--port", port],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(PREFECT_API + "/health", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the test Prefect server did not start:\n{(PREFECT_HOME / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield PREFECT_API
    if "prefect.logging.handlers" in sys.modules:  # send the last logs and events before the server goes
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=10)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints shaped like the real model families (tests/fixtures/real_models)

_BUILD = Path(__file__).parent / "fixtures" / "real_models" / "build.py"


def _fixture_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_models_build", _BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_models():
    """`real_models(family)` -> directory of a checkpoint shaped like that real family (tests/fixtures/real_models),
    built once and cached under work/fixtures/ across sessions."""
    return _fixture_builder().build


@pytest.fixture(scope="session")
def real_model_families():
    return list(_fixture_builder().FAMILIES)
