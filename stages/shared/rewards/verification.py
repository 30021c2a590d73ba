"""The bounded verification pool: checks that may hang (math-verify on a tower of powers, later a submitted program)
run in worker processes with a hard time limit per call. The accuracy reward runs its answer checks here, and any
other verifying reward runs its own function through :func:`run_all` the same way.

Built on ``pebble.ProcessPool``: a call that overruns ``timeout_s`` has its worker killed (SIGKILL-like: the workers
keep the default SIGTERM action, so a worker stuck in C code dies at once) and pebble starts a replacement. Workers
are forked from a clean fork server (never from the training process: no inherited threads, locks or GPU state) and
run each call in their main thread, so math-verify's own ``signal.alarm`` timeouts work inside them.

A call that times out, or whose worker dies, is retried ``retries`` times; when it never finishes its result is
None ("could not be checked"), never a value that would read as a wrong answer. Counts in :func:`stats`.

The settings are the ``verification`` config node (conf/verification/), passed by the stages: see :func:`settings`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields
from typing import Any, Callable, Sequence

from stages.shared.errors import UserError
from stages.shared.schema import VerificationConfig

log = logging.getLogger(__name__)


def settings(node: Any) -> VerificationConfig:
    """The ``verification`` node (a mapping or DictConfig) as a checked ``VerificationConfig`` (its typed shape in
    stages/shared/schema.py): every key present, each value in range; UserError names a bad key."""
    if isinstance(node, VerificationConfig):
        return node
    if node is None or not hasattr(node, "keys"):
        raise UserError(f"verification settings must be the `verification` config node (conf/verification/), got "
                        f"{node!r}: pass verification=cfg.verification")
    values = {str(k): node[k] for k in node.keys()}
    names = [f.name for f in fields(VerificationConfig)]
    missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
    if missing or unknown:
        raise UserError(f"verification: missing keys {missing}, unknown keys {unknown}; the node has exactly "
                        f"{', '.join(names)} (conf/verification/)")
    s = VerificationConfig(**values)

    def bad(key: str, want: str) -> UserError:
        return UserError(f"verification.{key}={values[key]!r}: must be {want}")

    if isinstance(s.timeout_s, bool) or not isinstance(s.timeout_s, (int, float)) or not s.timeout_s > 0:
        raise bad("timeout_s", "a positive number of seconds")
    if isinstance(s.math_verify_timeout_s, bool) or not isinstance(s.math_verify_timeout_s, int) \
            or s.math_verify_timeout_s < 1:
        raise bad("math_verify_timeout_s", "a whole number of seconds >= 1 (math-verify uses signal.alarm)")
    if isinstance(s.retries, bool) or not isinstance(s.retries, int) or s.retries < 0:
        raise bad("retries", "an integer >= 0")
    if s.workers is not None and (isinstance(s.workers, bool) or not isinstance(s.workers, int) or s.workers < 1):
        raise bad("workers", "an integer >= 1, or null for min(4, CPUs)")
    if isinstance(s.memory_mb, bool) or not isinstance(s.memory_mb, int) or s.memory_mb < 0:
        raise bad("memory_mb", "an integer >= 0 (0: no cap)")
    if s.max_answer_chars is not None and (not isinstance(s.max_answer_chars, int) or s.max_answer_chars < 1):
        raise bad("max_answer_chars", "an integer >= 1, or null for no cap")
    return s


def worker_count(s: VerificationConfig) -> int:
    if s.workers is not None:
        return s.workers
    return max(1, min(4, len(os.sched_getaffinity(0))))


# --------------------------------------------------------------------------------------------------------------------
# The process-wide pool

_STATS: Counter = Counter()
_stats_lock = threading.Lock()
_pool: Any = None
_pool_key: tuple | None = None
_pool_pid = 0
_lock = threading.Lock()


WORKING_SET_MB = 64  # what a worker must be able to allocate under verification.memory_mb


def _count(key: str, n: int = 1) -> None:
    with _stats_lock:
        _STATS[key] += n


def _start_worker(memory_mb: int) -> None:
    """pebble initializer, in each new worker: die at once on the pool's SIGTERM (a check stuck in C code cannot run
    a Python handler), cap the address space, keep library warnings out of the training log, warm math-verify up. A
    cap too small to work under kills the worker here, so the pool reports it instead of every check running out of
    memory."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        bytearray(WORKING_SET_MB * 1024 * 1024)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify

    math_verify.parse("\\boxed{1/2}")  # builds the LaTeX grammar (~0.2 s) here, before any timed call


def _call(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """In a worker: ("ok", fn(*args)), or ("timeout" | "memory", None) when fn raised TimeoutError (its own bound,
    such as math-verify's alarm, fired) or MemoryError (the worker's cap): the call did not finish, the worker lives
    on."""
    try:
        return "ok", fn(*args)
    except TimeoutError:
        return "timeout", None
    except MemoryError:
        return "memory", None


def _get_pool(s: VerificationConfig):
    """The pool for these settings, created on first use and rebuilt when the settings change, when it broke, or in
    a forked child (which must not talk to its parent's workers)."""
    global _pool, _pool_key, _pool_pid
    import pebble

    key = (worker_count(s), s.memory_mb)
    with _lock:
        if _pool is not None and (_pool_key != key or _pool_pid != os.getpid() or not _pool.active):
            if _pool_pid == os.getpid():
                _pool.stop()
                _pool.join()
            _pool = None
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            # The fork server imports these once; every worker forked from it starts warm (sympy alone takes ~1 s).
            # As with any spawn/forkserver pool, workers import the main module: keep it `if __name__ == "__main__":`.
            context.set_forkserver_preload(["__main__", "math_verify"])
            _pool = pebble.ProcessPool(max_workers=key[0], initializer=_start_worker, initargs=(s.memory_mb,),
                                       context=context)
            _pool_key, _pool_pid = key, os.getpid()
            _count("pools")
        return _pool


def shutdown() -> None:
    """Stop the workers (at exit; tests)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None and _pool_pid == os.getpid():
        pool.stop()
        pool.join()


atexit.register(shutdown)


def run_all(fn: Callable[..., Any], calls: Sequence[tuple], verification: Any) -> list[tuple[bool, Any]]:
    """``fn(*args)`` for each ``args`` of ``calls`` in the pool, each bounded by ``timeout_s``.

    Returns ``(True, value)`` per finished call and ``(False, None)`` for a call that timed out (pebble's bound or a
    ``TimeoutError`` raised by ``fn`` itself), ran out of the worker's memory (``MemoryError``) or lost its worker on
    every attempt. Any other exception raised by ``fn`` is re-raised here: a bug must not pass for a verdict. ``fn``
    must be importable by name (a module-level function). Safe to call from several threads at once.
    """
    from concurrent.futures.process import BrokenProcessPool

    import pebble

    s = settings(verification)
    out: list[tuple[bool, Any]] = [(False, None)] * len(calls)
    todo = list(range(len(calls)))
    broken: BaseException | None = None
    for attempt in range(s.retries + 1):
        if not todo:
            break
        if attempt:
            _count("retries", len(todo))
        pool = _get_pool(s)
        futures = [(i, pool.schedule(_call, args=(fn, *calls[i]), timeout=s.timeout_s)) for i in todo]
        _count("calls", len(futures))
        todo, broken = [], None
        for i, future in futures:
            try:
                status, value = future.result()
            except FutureTimeout:  # pebble's bound: the worker was killed and is being replaced
                _count("timeouts")
                _count("killed")
                todo.append(i)
            except pebble.ProcessExpired:  # the worker died: the memory cap, a crash in C code
                _count("worker_deaths")
                todo.append(i)
            except BrokenProcessPool as e:  # pebble gives up on a pool whose workers all died; the next one is new
                _count("pool_broken")
                broken = e
                todo.append(i)
            else:
                if status == "ok":
                    out[i] = (True, value)
                else:
                    _count("timeouts" if status == "timeout" else "out_of_memory")
                    todo.append(i)
    if broken is not None:
        raise RuntimeError(f"the verification workers keep dying ({broken!r}): check verification.memory_mb "
                           f"(address-space cap per worker) and that `import math_verify` works") from broken
    if todo:
        _count("unfinished", len(todo))
    return out


def stats() -> dict[str, int]:
    """Counters since the process started: calls, timeouts (of which killed: by the pool's bound rather than the
    call's own), out_of_memory, retries, worker_deaths, unfinished (gave None), pool_broken, pools (created)."""
    with _stats_lock:
        return dict(_STATS)
