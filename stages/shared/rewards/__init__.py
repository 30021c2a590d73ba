"""Rule-based rewards of the R1 recipe, with TRL's reward-function signature.

Every reward function takes ``completions`` (plain strings, or conversational ``[[{"role": "assistant", "content":
...}]]``) plus the dataset columns as keyword arguments (TRL also passes ``prompts``, ``completion_ids``,
``trainer_state``, ``log_extra``, ``log_metric``) and returns one float per completion (``None`` = "not applicable",
which TRL turns into NaN and ignores). Conversational and plain completions score the same; non-string garbage never
raises and scores 0.0.

- :func:`accuracy_reward`: math-verify equivalence of the final answer with the gold ``answer`` column, time-bounded
  per check (worker processes that are killed on overrun; small batches on the main thread run inline under a timer).
- :func:`format_reward`: one well-formed think block, then ``<answer>`` (``r1_zero``) or a non-empty summary (``r1``).
- :func:`language_consistency_reward`: share of target-language words in the reasoning (script-level).
- guards: :func:`length_penalty`, :func:`tag_count_penalty`, :func:`repetition_penalty`.
- :data:`REWARDS`, :func:`register_reward`, :func:`build_reward_functions`: config name -> function, bound kwargs.
- :func:`verify`, :func:`verify_batch`: extract + verify for evaluation and rejection sampling.

Environment knobs (read at call time): ``R1FLOW_VERIFY_TIMEOUT`` (seconds per check, default 1.5),
``R1FLOW_VERIFY_WORKERS`` (worker processes, default min(4, CPUs)), ``R1FLOW_VERIFY_MEMORY_MB`` (address-space cap of
a worker, default 4096; 0 = none).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections import Counter, deque
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

from stages.shared.errors import UserError
from stages.shared.progress import Progress
from stages.shared.templates import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    DEFAULT_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
    as_text,
    check_template,
    extract_answer_with_kind,
    last_boxed,
    split_reasoning,
)

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_TIMEOUT = 1.5  # seconds per (gold, answer) check
DEFAULT_MAX_ANSWER_CHARS = 2000  # longer extracted answers score 0.0 without being parsed
SOFT_TIMEOUT_SHARE = 0.7  # in-worker alarm at this share of the bound; 0 = rely on the kill alone
INLINE_MAX = 8  # "auto": batches with at most this many distinct checks run inline (main thread only)
_CACHE_MAX = 100_000

_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _warn_lock:
        if key in _warned:
            logger.debug(message, *args)
            return
        _warned.add(key)
    logger.warning(message, *args)


# --------------------------------------------------------------------------------------------------------------------
# Answer normalisation and the math-verify check (runs inline or inside a worker process)
# --------------------------------------------------------------------------------------------------------------------

_DELIMS = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\\,|\{,\}|\\!|\\ |~|\\;|\\:)(?=\d{3}(?!\d))")
_SPACED_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_PERCENT_RE = re.compile(
    r"^(?P<x>.*?)\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\(?:text|mbox|mathrm)\{\s*percent\s*\}|percent)$", re.DOTALL
)
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}\s+[A-Za-z]{2,}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+(?:\{[^{}]*\})?")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00a0": " ", "\u2009": " "})


def _answer_forms(text: str, kind: str | None) -> list[tuple[str, bool]]:
    """Strings to hand to math-verify for one answer: ``(string, wrap in \\boxed{})`` pairs.

    Normalises what math-verify misses: unicode minus, math delimiters, a trailing full stop, thousands separators
    written ``1\\,000`` / ``1 000``, and a trailing percent sign (then both ``x`` and ``x/100`` are candidates, so
    ``50\\%`` matches ``50`` and ``0.5`` but ``50`` never matches ``0.5``). An ``<answer>`` that reads like a
    sentence is parsed as free text (math-verify finds the expression in it) rather than as one expression.
    """
    s = text.translate(_UNICODE_MINUS).strip()
    if "\\boxed" in s or "\\fbox" in s:
        boxed = last_boxed(s)
        if boxed is not None:
            s = boxed.strip()
    for left, right in _DELIMS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
            break
    s = s.rstrip(" .;,").strip()
    s = _THOUSANDS_RE.sub("", s)
    if _SPACED_THOUSANDS_RE.fullmatch(s):
        s = s.replace(" ", "")
    if not s:
        return []
    if kind == "answer" and _PROSE_RE.search(_LATEX_CMD_RE.sub(" ", s)):
        return [(text.strip(), False)]
    m = _PERCENT_RE.match(s)
    if m and m.group("x").strip():
        x = m.group("x").strip()
        return [(x, True), (f"\\frac{{{x}}}{{100}}", True)]
    return [(s, True)]


_MV: Any = None


def _math_verify() -> Any:
    """Import math-verify lazily (sympy is slow to import) and silence its "timeout disabled" warnings: the time bound
    is ours."""
    global _MV
    if _MV is None:
        import math_verify
        import math_verify.grader
        import math_verify.parser

        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        _MV = math_verify
    return _MV


def _parse_forms(forms: list[tuple[str, bool]], fallback: str) -> list:
    mv = _math_verify()
    parsed: list = []
    for s, wrap in forms:
        parsed.extend(
            mv.parse("\\boxed{" + s + "}" if wrap else s, parsing_timeout=None, fallback_mode=fallback)
        )
    return parsed


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    return tuple(_parse_forms(_answer_forms(gold, "boxed"), "no_fallback"))


def check_answer(gold: str, pred: str | None, kind: str | None = "boxed") -> bool | None:
    """Unbounded core check: None if ``gold`` does not parse, False if ``pred`` is missing or differs, else True.
    Use :func:`verify` / :func:`verify_batch` (time-bounded) instead of calling this directly."""
    g = _parse_gold(gold)
    if not g:
        return None
    if pred is None:
        return False
    p = _parse_forms(_answer_forms(pred, kind), "first_match")
    if not p:
        return False
    return bool(_math_verify().verify(list(g), p, timeout_seconds=None))


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a bounded check; a BaseException so math-verify's ``except Exception`` lets it out."""


def _raise_soft_timeout(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _run_bounded(fn: Callable[[], Any], seconds: float | None) -> tuple[str, Any]:
    """Run ``fn`` on the main thread under an ITIMER_REAL alarm: ("ok", value), ("timeout", None) or ("error", None).
    Interrupts Python code only; a long C-level operation (a huge integer power) finishes first, which is why risky
    answers go to worker processes that can be killed."""
    try:
        old = signal.signal(signal.SIGALRM, _raise_soft_timeout)
        try:
            if seconds:
                signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return "ok", fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old)
    except _SoftTimeout:
        return "timeout", None
    except RecursionError:
        return "error", None
    except Exception:  # noqa: BLE001 - a check that crashes is a wrong answer, never a crashed training step
        logger.debug("answer check failed", exc_info=True)
        return "error", None


# --------------------------------------------------------------------------------------------------------------------
# Worker processes: persistent, each runs one check at a time, killed and replaced when a check overruns
# --------------------------------------------------------------------------------------------------------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_HDR = struct.Struct(">I")


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _send_frame(fd: int, obj: Any) -> None:
    _write_all(fd, _frame(obj))


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _worker_main() -> None:
    """Entry point of a verification worker (``python -c ...``): frames in on stdin, frames out on the original
    stdout; anything a library prints goes to stderr."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    mem_mb = int(os.environ.get("R1FLOW_VERIFY_MEMORY_MB", "4096") or 0)
    if mem_mb > 0:
        try:
            import resource

            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _run_bounded(lambda: check_answer("1/2", "0.5"), 30.0)  # warm-up: grammar and caches load before "ready"
    _send_frame(out_fd, ("ready", os.getpid()))
    while True:
        header = _read_exact(0, _HDR.size)
        if header is None:
            return
        body = _read_exact(0, _HDR.unpack(header)[0])
        if body is None:
            return
        task_id, gold, pred, kind, soft = pickle.loads(body)
        status, value = _run_bounded(lambda: check_answer(gold, pred, kind), soft)
        _send_frame(out_fd, (task_id, status, value if status == "ok" else False))


_WORKER_CMD = (
    "import sys; sys.path.insert(0, {root!r}); from stages.shared.rewards import _worker_main; _worker_main()"
)


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CMD.format(root=_ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
            close_fds=True,
            bufsize=0,
        )
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        self.buf = bytearray()
        self.ready = False
        self.inflight: deque[tuple[int, int]] = deque()  # (task index, frame bytes), in the order sent
        self.deadline = 0.0  # for the task at the head of ``inflight`` (the one the worker is on)
        self.started = time.monotonic()

    def messages(self) -> list | None:
        """Complete frames read so far; None when the worker has gone (EOF)."""
        try:
            chunk = os.read(self.rfd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while len(self.buf) >= _HDR.size:
            (n,) = _HDR.unpack_from(self.buf)
            if len(self.buf) < _HDR.size + n:
                break
            out.append(pickle.loads(bytes(self.buf[_HDR.size : _HDR.size + n])))
            del self.buf[: _HDR.size + n]
        return out

    def stderr_tail(self) -> str:
        try:
            self.err.seek(0)
            return self.err.read().decode("utf-8", "replace")[-2000:]
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _default_workers() -> int:
    env = os.environ.get("R1FLOW_VERIFY_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class VerifierPool:
    """Persistent worker processes that run answer checks with a hard per-check time bound.

    Thread-safe (one batch at a time); works from any thread, since nothing here uses signals. A check that overruns
    its bound is scored False and its worker is killed (SIGKILL) and replaced in the background.
    """

    BOOT_TIMEOUT = 120.0
    MAX_BOOT_FAILURES = 3
    QUEUE_DEPTH = 4  # tasks sent ahead to each worker
    PIPE_BUDGET = 48 * 1024  # bytes of queued tasks per worker: below the 64 KiB pipe buffer, so writes never block

    def __init__(self, size: int | None = None) -> None:
        self.size = size or _default_workers()
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.boot_failures = 0
        self.stats = Counter()

    def _spawn(self) -> None:
        self.workers.append(_Worker())
        self.stats["spawned"] += 1

    def _drop(self, w: _Worker, respawn: bool = True) -> None:
        w.kill()
        if w in self.workers:
            self.workers.remove(w)
        if respawn:
            self._spawn()

    def start(self, wait: bool = False, timeout: float = BOOT_TIMEOUT) -> None:
        """Spawn the workers; with ``wait``, return once all of them are ready (a fresh worker imports sympy and
        warms up math-verify: ~0.5 s of CPU, several seconds on a busy machine)."""
        with self.lock:
            while len(self.workers) < self.size:
                self._spawn()
            deadline = time.monotonic() + timeout
            while wait and any(not w.ready for w in self.workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"answer-verification workers did not start in {timeout:.0f} s")
                booting = [w for w in self.workers if not w.ready]
                self._collect(min(left, 0.5), [], 0.0, deque(), booting)
                while len(self.workers) < self.size:
                    self._spawn()

    def run(self, tasks: Sequence[tuple[str, str | None, str | None]], timeout: float) -> list[tuple[str, Any]]:
        """``tasks``: (gold, answer, kind). Returns (status, value) per task; status ok | timeout | error."""
        if not tasks:
            return []
        # The worker interrupts a slow check itself a little before the bound (cheap: it stays alive); the parent kills
        # it at the bound (covers what a signal cannot interrupt).
        soft = SOFT_TIMEOUT_SHARE * timeout if SOFT_TIMEOUT_SHARE > 0 else None
        with self.lock:
            try:
                return self._run(tasks, timeout, soft)
            except BaseException:
                # interrupted (KeyboardInterrupt, no worker could start): busy workers hold tasks of this batch
                for w in [w for w in self.workers if w.inflight]:
                    self._drop(w, respawn=False)
                raise

    def _run(self, tasks: Sequence[tuple], timeout: float, soft: float | None) -> list:
        """Each worker gets up to QUEUE_DEPTH tasks at a time (so it never waits for this process to be scheduled);
        the task at the head of its queue must finish within ``timeout`` of the previous one's result."""
        results: list = [None] * len(tasks)
        while len(self.workers) < self.size:
            self._spawn()
        pending = deque(range(len(tasks)))
        remaining = len(tasks)
        waited_since = time.monotonic()
        while remaining:
            for w in list(self.workers):
                while pending and w.ready and len(w.inflight) < self.QUEUE_DEPTH:
                    i = pending[0]
                    gold, pred, kind = tasks[i]
                    frame = _frame((i, gold, pred, kind, soft))
                    queued = sum(n for _, n in w.inflight)
                    if w.inflight and queued + len(frame) > self.PIPE_BUDGET:
                        break  # a write must never block: this process enforces the deadlines
                    try:
                        _write_all(w.wfd, frame)
                    except OSError:  # died between tasks: replace it; its tasks go back in the queue
                        pending.extendleft(reversed([j for j, _ in w.inflight]))
                        w.inflight.clear()
                        self._drop(w)
                        break
                    pending.popleft()
                    if not w.inflight:
                        w.deadline = time.monotonic() + timeout
                    w.inflight.append((i, len(frame)))
            busy = [w for w in self.workers if w.inflight]
            if busy:
                wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                waited_since = time.monotonic()
            else:  # all workers still booting
                if time.monotonic() - waited_since > self.BOOT_TIMEOUT:
                    raise RuntimeError(f"answer-verification workers did not start in {self.BOOT_TIMEOUT:.0f} s")
                wait = 0.5
            remaining -= self._collect(wait, results, timeout, pending)
            overdue = [w for w in self.workers if w.inflight and time.monotonic() >= w.deadline]
            if overdue:  # results may have arrived while this process was not scheduled: read them before killing
                remaining -= self._collect(0.0, results, timeout, pending, overdue)
            now = time.monotonic()
            for w in list(self.workers):
                if w.inflight and now >= w.deadline:
                    head, _ = w.inflight.popleft()
                    results[head] = ("timeout", False)
                    remaining -= 1
                    self.stats["timeout"] += 1
                    self.stats["killed"] += 1
                    pending.extendleft(reversed([j for j, _ in w.inflight]))
                    w.inflight.clear()
                    self._drop(w)
        return results

    def _collect(self, wait: float, results: list, timeout: float, pending: deque,
                 workers: list[_Worker] | None = None) -> int:
        """Read what the workers sent within ``wait`` seconds; returns how many tasks finished."""
        fds = {w.rfd: w for w in (self.workers if workers is None else workers)}
        try:
            readable, _, _ = select.select(list(fds), [], [], wait)
        except InterruptedError:
            return 0
        finished = 0
        for fd in readable:
            w = fds[fd]
            msgs = w.messages()
            if msgs is None:  # the worker died (crash, memory limit): its current task failed, the rest are retried
                if w.inflight:
                    head, _ = w.inflight.popleft()
                    results[head] = ("error", False)
                    finished += 1
                    self.stats["crashes"] += 1
                    pending.extendleft(reversed([j for j, _ in w.inflight]))
                    w.inflight.clear()
                elif not w.ready:
                    self.boot_failures += 1
                    if self.boot_failures >= self.MAX_BOOT_FAILURES:
                        tail = w.stderr_tail()
                        self._drop(w, respawn=False)
                        raise RuntimeError(
                            f"answer-verification worker failed to start ({self.boot_failures} times); its stderr:\n"
                            f"{tail}"
                        )
                self._drop(w)
                continue
            for msg in msgs:
                if msg[0] == "ready":
                    w.ready = True
                    self.boot_failures = 0
                    continue
                i, status, value = msg
                if w.inflight and w.inflight[0][0] == i:
                    w.inflight.popleft()
                    results[i] = (status, value)
                    finished += 1
                    self.stats[status] += 1
                    w.deadline = time.monotonic() + timeout  # the next queued task starts now
        return finished

    def close(self) -> None:
        with self.lock:
            workers, self.workers = self.workers, []
        for w in workers:  # nothing to flush in a worker: stop them at once
            w.kill()


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_verifier_pool() -> VerifierPool:
    """The process-wide pool (created on first use; a forked child gets its own)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifierPool()
        return _POOL


def start_verifier_pool(wait: bool = False) -> None:
    """Start the workers now (about a second) so that the first training step does not wait for them."""
    get_verifier_pool().start(wait=wait)


def shutdown_verifier_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown_verifier_pool)


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, say) must not talk to its parent's workers, nor wait on a lock that a
    parent thread held at the fork."""
    global _POOL, _POOL_LOCK, _CACHE_LOCK, _warn_lock
    _POOL = None
    _POOL_LOCK = threading.Lock()
    _CACHE_LOCK = threading.Lock()
    _warn_lock = threading.Lock()


# --------------------------------------------------------------------------------------------------------------------
# Batched, cached, time-bounded verification
# --------------------------------------------------------------------------------------------------------------------

_RISKY_RE = re.compile(r"\^|\*\*|!|binom|choose|prod|sum|int|lim|uparrow|\d{30,}")
_CACHE: dict[tuple, bool | None] = {}
_CACHE_LOCK = threading.Lock()
STATS: Counter = Counter()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear_verify_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
    _parse_gold.cache_clear()


def verifier_stats() -> dict[str, int]:
    """Counters since start: checks, cache_hits, inline, pooled, timeouts, errors, workers spawned/killed."""
    out = dict(STATS)
    if _POOL is not None:
        out.update({f"pool_{k}": v for k, v in _POOL.stats.items()})
    return out


_WARM = False


def _warm_inline() -> None:
    """Import math-verify and load its grammar outside the time bound (the first check costs ~0.5 s)."""
    global _WARM
    if not _WARM:
        check_answer("1/2", "0.5")
        _WARM = True


def _can_run_inline() -> bool:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _is_risky(task: tuple[str, str | None, str | None]) -> bool:
    gold, pred, _ = task
    return any(s is not None and (len(s) > 300 or _RISKY_RE.search(s)) for s in (gold, pred))


def _gold_text(gold: Any) -> str | None:
    if isinstance(gold, bool) or gold is None:
        return None
    if isinstance(gold, (int, float)):
        return repr(gold) if math.isfinite(gold) else None
    if isinstance(gold, str):
        return gold if gold.strip() else None
    return None


def _timeout_value(timeout: Any) -> float:
    if timeout is None:
        timeout = os.environ.get("R1FLOW_VERIFY_TIMEOUT") or DEFAULT_VERIFY_TIMEOUT
    timeout = float(timeout)
    if not timeout > 0:
        raise UserError(f"verify_timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def _check_tasks(
    tasks: list[tuple[str | None, str | None, str | None]], timeout: Any = None, parallel: Any = "auto"
) -> list[bool | None]:
    """Results for (gold, answer, kind) tasks: deduplicated, cached, inline or in the pool, each time-bounded."""
    timeout = _timeout_value(timeout)
    results: list[bool | None] = [None] * len(tasks)
    todo: dict[tuple, list[int]] = {}
    with _CACHE_LOCK:
        for i, task in enumerate(tasks):
            if task[0] is None:
                continue
            if task in _CACHE:
                results[i] = _CACHE[task]
                STATS["cache_hits"] += 1
            else:
                todo.setdefault(task, []).append(i)
    if not todo:
        return results
    unique = list(todo)
    STATS["checks"] += len(unique)
    if parallel is True or parallel == "always":
        inline = False
    elif parallel is False or parallel == "never":
        inline = _can_run_inline()
    else:  # auto
        inline = len(unique) <= INLINE_MAX and _can_run_inline()
    inline_idx = [j for j, t in enumerate(unique) if not _is_risky(t)] if inline else []
    pooled_idx = sorted(set(range(len(unique))) - set(inline_idx))
    outcome: dict[int, tuple[str, Any]] = {}
    if inline_idx:
        _warm_inline()
    for j in inline_idx:
        gold, pred, kind = unique[j]
        outcome[j] = _run_bounded(lambda: check_answer(gold, pred, kind), timeout)
    STATS["inline"] += len(inline_idx)
    if pooled_idx:
        pool_out = get_verifier_pool().run([unique[j] for j in pooled_idx], timeout)
        outcome.update(zip(pooled_idx, pool_out))
        STATS["pooled"] += len(pooled_idx)
    n_timeouts = 0
    with _CACHE_LOCK:
        if len(_CACHE) > _CACHE_MAX:
            _CACHE.clear()
        for j, task in enumerate(unique):
            status, value = outcome[j]
            if status == "timeout":
                n_timeouts += 1
                value = False
            elif status != "ok":
                STATS["errors"] += 1
                value = False
            else:
                _CACHE[task] = value  # timeouts are not cached: they depend on the machine's load
            for i in todo[task]:
                results[i] = value
    if n_timeouts:
        STATS["timeouts"] += n_timeouts
        _warn_once(
            "timeout",
            "answer verification: %d check(s) exceeded the %.1f s bound and scored 0.0 (a pathological answer, or an "
            "overloaded machine: raise `verify_timeout` / R1FLOW_VERIFY_TIMEOUT if legitimate answers time out; "
            "later ones logged at debug; counts in rewards.verifier_stats())",
            n_timeouts,
            timeout,
        )
    return results


def _pred_task(text: Any, max_answer_chars: int | None) -> tuple[str | None, str | None]:
    answer, kind = extract_answer_with_kind(text)
    if answer is not None and max_answer_chars and len(answer) > max_answer_chars:
        return None, None
    return answer, kind


def _warn_bad_gold(gold: Any) -> None:
    _warn_once(
        "gold",
        "accuracy: gold answer %r cannot be parsed; its rows get reward None (ignored by TRL). Check the dataset's "
        "`answer` column (later ones logged at debug)",
        str(gold)[:200],
    )


PROGRESS_BATCH = 1000  # verify_batch reports progress every this many answers, on batches at least this large


def verify_batch(
    pairs: Iterable[tuple[Any, Any]],
    *,
    timeout: float | None = None,
    parallel: bool | str = "auto",
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
) -> list[bool | None]:
    """``[(prediction_text, gold), ...]`` -> True / False / None (gold unparseable) per pair.

    The answer is extracted with :func:`stages.shared.templates.extract_answer` (last ``\\boxed{}`` after ``</think>``, else
    ``<answer>``); no answer -> False. ``parallel``: "auto" (default: pool for large batches and off the main thread),
    True (always the worker pool) or False (inline on the main thread, still time-bounded; risky answers such as
    towers of powers still go to the pool).
    """
    pairs = list(pairs)
    tasks = []
    for text, gold in pairs:
        answer, kind = _pred_task(text, max_answer_chars)
        tasks.append((_gold_text(gold), answer, kind))
    if len(tasks) < PROGRESS_BATCH:  # a GRPO step's rewards, a held-out check: quick
        results = _check_tasks(tasks, timeout, parallel)
    else:  # rejection sampling, evaluation: thousands of checks, in slices that report progress
        results = []
        with Progress(len(tasks), "verification", "verify answers", unit="answer") as bar:
            for start in range(0, len(tasks), PROGRESS_BATCH):
                results += _check_tasks(tasks[start:start + PROGRESS_BATCH], timeout, parallel)
                bar.update(len(tasks[start:start + PROGRESS_BATCH]))
    for (_, gold), r in zip(pairs, results):
        if r is None and gold is not None:
            _warn_bad_gold(gold)
    return results


def verify(
    prediction_text: Any,
    gold: Any,
    *,
    timeout: float | None = None,
    parallel: bool | str = "auto",
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
) -> bool | None:
    """Extract the final answer of ``prediction_text`` and check it against ``gold``: True, False, or None when the
    gold answer cannot be parsed."""
    return verify_batch(
        [(prediction_text, gold)], timeout=timeout, parallel=parallel, max_answer_chars=max_answer_chars
    )[0]


# --------------------------------------------------------------------------------------------------------------------
# Per-row kwargs
# --------------------------------------------------------------------------------------------------------------------


def _per_row(value: Any, n: int, name: str) -> list:
    """A kwarg that is either one value for the batch or a dataset column (list, one per completion)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"reward kwarg `{name}` has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def _batch(completions: Any) -> list:
    """The completions as a list: a lone string is one completion (TRL always passes a list); None or a non-sequence
    is an empty batch."""
    if isinstance(completions, str):
        return [completions]
    if isinstance(completions, (list, tuple)):
        return list(completions)
    return []


# --------------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------------


_MISSING = object()


def accuracy_reward(completions: Sequence[Any], answer: Any = _MISSING, **kwargs: Any) -> list[float | None]:
    """1.0 when the final answer equals the gold ``answer`` (math-verify), 0.0 when wrong or missing, None when the
    gold answer cannot be parsed (TRL ignores it; warned once) or is None (rows without a gold answer, e.g. general
    prompts mixed into the final RL stage).

    Kwargs (bindable): ``verify_timeout`` (seconds per check), ``verify_parallel`` ("auto" | True | False),
    ``max_answer_chars``.
    """
    completions = _batch(completions)
    n = len(completions)
    if answer is _MISSING:
        raise UserError(
            "the accuracy reward needs the gold answer as the dataset column `answer` (map it with "
            "`columns: {answer: <their column>}` in conf/data), or drop `accuracy` from `rewards`"
        )
    golds = _per_row(answer, n, "answer")
    tasks = []
    for completion, gold in zip(completions, golds):
        answer_text, kind = _pred_task(completion, kwargs.get("max_answer_chars", DEFAULT_MAX_ANSWER_CHARS))
        tasks.append((_gold_text(gold), answer_text, kind))
    results = _check_tasks(tasks, kwargs.get("verify_timeout"), kwargs.get("verify_parallel", "auto"))
    out: list[float | None] = []
    for r, raw_gold in zip(results, golds):
        if r is None:
            if raw_gold is not None:
                _warn_bad_gold(raw_gold)
            out.append(None)
        else:
            out.append(1.0 if r else 0.0)
    return out


_TAG_RE = re.compile(r"</?(?:think|answer)>")


def _tag_counts(text: str) -> Counter:
    return Counter(_TAG_RE.findall(text))


def is_well_formed(text: str, template: str = DEFAULT_TEMPLATE, think_prefilled: bool = False) -> bool:
    """One ordered, non-empty think block, then the answer part: ``<answer>non-empty</answer>`` and nothing else
    (``r1_zero``), or a non-empty summary (``r1``). ``think_prefilled``: the prompt already ends with ``<think>``, so
    the completion starts inside the reasoning. A non-string is not well formed."""
    check_template(template)
    text = as_text(text)
    if text is None:
        return False
    counts = _tag_counts(text)
    opens = 0 if think_prefilled else 1
    if counts[THINK_OPEN] != opens or counts[THINK_CLOSE] != 1:
        return False
    body = text.strip()
    if not think_prefilled:
        if not body.startswith(THINK_OPEN):
            return False
        body = body[len(THINK_OPEN) :]
    reasoning, _, rest = body.partition(THINK_CLOSE)
    if not reasoning.strip():
        return False
    if template == "r1_zero":
        if counts[ANSWER_OPEN] != 1 or counts[ANSWER_CLOSE] != 1:
            return False
        rest = rest.strip()
        if not (rest.startswith(ANSWER_OPEN) and rest.endswith(ANSWER_CLOSE)):
            return False
        return bool(rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)].strip())
    # r1: a readable summary; <answer> tags are not part of the format, but if present they must pair up once
    if counts[ANSWER_OPEN] != counts[ANSWER_CLOSE] or counts[ANSWER_OPEN] > 1:
        return False
    if counts[ANSWER_OPEN] and rest.find(ANSWER_OPEN) > rest.find(ANSWER_CLOSE):
        return False
    return bool(rest.strip())


def format_reward(completions: Sequence[Any], template: Any = DEFAULT_TEMPLATE, **kwargs: Any) -> list[float]:
    """1.0 for exactly one well-formed, ordered think block followed by the answer part (``<answer>`` tags for
    ``r1_zero``, a non-empty summary for ``r1``); else 0.0. ``template``: scalar or per-row column (default r1);
    ``think_prefilled`` (bindable): the chat template opens ``<think>`` in the prompt."""
    completions = _batch(completions)
    n = len(completions)
    templates = [check_template(t if t is not None else DEFAULT_TEMPLATE) for t in _per_row(template, n, "template")]
    prefilled = bool(kwargs.get("think_prefilled", False))
    out = []
    for completion, tmpl in zip(completions, templates):
        text = as_text(completion)
        out.append(1.0 if text is not None and is_well_formed(text, tmpl, prefilled) else 0.0)
    return out


# ---- language consistency --------------------------------------------------------------------------------------------

_LATIN_LANGS = (
    "en fr de es it pt nl pl tr vi id ms sv da no nb nn fi cs sk sl hr bs ro hu et lv lt is ga cy eu ca gl af sw "
    "tl sq az uz mt lb eo la"
).split()
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {lang: frozenset({"latin"}) for lang in _LATIN_LANGS}
LANGUAGE_SCRIPTS.update(
    {
        "zh": frozenset({"han"}),
        "ja": frozenset({"han", "kana"}),
        "ko": frozenset({"hangul"}),
        **{lang: frozenset({"cyrillic"}) for lang in "ru uk bg sr be kk mk mn ky tg".split()},
        "el": frozenset({"greek"}),
        **{lang: frozenset({"arabic"}) for lang in "ar fa ur ps ug".split()},
        **{lang: frozenset({"hebrew"}) for lang in "he yi".split()},
        **{lang: frozenset({"devanagari"}) for lang in "hi mr ne sa".split()},
        "bn": frozenset({"bengali"}),
        "th": frozenset({"thai"}),
        "ka": frozenset({"georgian"}),
        "hy": frozenset({"armenian"}),
        "ta": frozenset({"tamil"}),
        "te": frozenset({"telugu"}),
        "am": frozenset({"ethiopic"}),
    }
)
_LANGUAGE_ALIASES = {
    "english": "en", "french": "fr", "german": "de", "spanish": "es", "italian": "it", "portuguese": "pt",
    "chinese": "zh", "japanese": "ja", "korean": "ko", "russian": "ru", "greek": "el", "arabic": "ar",
    "hebrew": "he", "hindi": "hi",
}  # fmt: skip
_SCRIPT_NAMES = {"latin", "han", "kana", "hangul", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "bengali",
                 "thai", "georgian", "armenian", "tamil", "telugu", "ethiopic"}  # fmt: skip
_PER_CHAR_SCRIPTS = frozenset({"han", "kana", "thai"})  # written without spaces: each character counts as a word
_UNICODE_SCRIPT = {"CJK": "han", "HIRAGANA": "kana", "KATAKANA": "kana", "HALFWIDTH": "kana", "FULLWIDTH": "latin",
                   "HANGUL": "hangul", "ETHIOPIC": "ethiopic"}  # fmt: skip
_NEUTRAL_SCRIPTS = frozenset({"MATHEMATICAL", "DOUBLE-STRUCK", "SCRIPT", "BLACK-LETTER", "MODIFIER", "SUPERSCRIPT",
                              "SUBSCRIPT", "COMBINING", "PLANCK"})  # fmt: skip

_LETTERS_RE = re.compile(r"[^\W\d_]+")
_NEUTRAL_RE = re.compile(
    r"```.*?```"  # code blocks
    r"|\$\$.*?\$\$|\$[^$\n]{0,300}\$"  # math
    r"|\\\(.*?\\\)|\\\[.*?\\\]"
    r"|\\[A-Za-z]+"  # LaTeX commands
    r"|</?(?:think|answer)>",
    re.DOTALL,
)


def resolve_language(language: Any) -> frozenset[str]:
    """The scripts of a language: ISO 639-1 code (``en``, ``zh-CN``), an English name, or a script name."""
    if not isinstance(language, str) or not language.strip():
        raise UserError(f"language must be a code such as 'en' or 'zh', got {language!r}")
    key = language.strip().lower().replace("_", "-")
    key = _LANGUAGE_ALIASES.get(key, key)
    if key in _SCRIPT_NAMES:
        return frozenset({key})
    primary = key.split("-")[0]
    primary = _LANGUAGE_ALIASES.get(primary, primary)
    if primary in LANGUAGE_SCRIPTS:
        return LANGUAGE_SCRIPTS[primary]
    raise UserError(
        f"unknown language {language!r} for the language-consistency reward: use an ISO 639-1 code "
        f"({', '.join(sorted(LANGUAGE_SCRIPTS))}) or a script name ({', '.join(sorted(_SCRIPT_NAMES))})"
    )


@lru_cache(maxsize=65536)
def _char_script(ch: str) -> str | None:
    if ch.isascii():
        return "latin"
    try:
        first = unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return "other"
    if first in _NEUTRAL_SCRIPTS:
        return None
    return _UNICODE_SCRIPT.get(first, first.lower())


def script_word_counts(text: str) -> Counter:
    """Words per script. Alphabetic scripts: runs of two or more letters (single letters are variables: neutral);
    CJK, kana and Thai: one word per character. Numbers, symbols, LaTeX commands, math in ``$...$`` and code blocks
    are neutral."""
    counts: Counter = Counter()
    text = _NEUTRAL_RE.sub(" ", text)
    for run in _LETTERS_RE.findall(text):
        if run.isascii():
            if len(run) > 1:
                counts["latin"] += 1
            continue
        seg_script, seg_len = None, 0
        for ch in run + "\0":
            s = _char_script(ch) if ch != "\0" else "\0"
            if s == seg_script:
                seg_len += 1
                continue
            if seg_script is not None and seg_script != "\0":
                if seg_script in _PER_CHAR_SCRIPTS:
                    counts[seg_script] += seg_len
                elif seg_len > 1:
                    counts[seg_script] += 1
            seg_script, seg_len = s, 1
    return counts


def language_consistency(text: str, language: str = "en") -> float:
    """Share of the words of ``text`` written in the script(s) of ``language`` (1.0 when there are no words).

    Script-level, as a fast proxy of the paper's "proportion of target-language words": it tells Latin, CJK,
    Cyrillic, Greek, Arabic, ... apart, not English from French.
    """
    scripts = resolve_language(language)
    if not isinstance(text, str):
        return 0.0
    counts = script_word_counts(text)
    total = sum(counts.values())
    if total == 0:
        return 1.0
    return sum(counts[s] for s in scripts) / total


def language_consistency_reward(completions: Sequence[Any], language: Any = "en", **kwargs: Any) -> list[float]:
    """Share of target-language words in the reasoning (the think part; the whole text when there is no think tag).
    ``language``: scalar or per-row column (None rows: "en")."""
    completions = _batch(completions)
    n = len(completions)
    languages = _per_row(language, n, "language")
    out = []
    for completion, lang in zip(completions, languages):
        scripts_lang = "en" if lang is None else lang
        resolve_language(scripts_lang)
        text = as_text(completion)
        if text is None:
            out.append(0.0)
            continue
        if THINK_OPEN in text or THINK_CLOSE in text:
            text = split_reasoning(text)[0]
        out.append(language_consistency(text, scripts_lang))
    return out


# ---- guards -------------------------------------------------------------------------------------------------------


def overlong_penalty(length: int, max_length: int, soft_limit: int | None = None) -> float:
    """0 up to ``soft_limit`` (default 80% of ``max_length``), then linearly down to -1 at ``max_length``."""
    if soft_limit is None:
        soft_limit = int(0.8 * max_length)
    if length <= soft_limit:
        return 0.0
    if max_length <= soft_limit:
        return -1.0
    return -min(1.0, (length - soft_limit) / (max_length - soft_limit))


def length_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Overlong guard (DAPO-style soft overlong punishment). Length in tokens from TRL's ``completion_ids`` when
    given, else in characters. Limits (bindable): ``length_max`` (default ``max_completion_length``) and
    ``length_soft_limit`` (default 80% of the max). No max known: 0.0 everywhere (warned once)."""
    completions = _batch(completions)
    n = len(completions)
    max_length = kwargs.get("length_max") or kwargs.get("max_completion_length")
    if not max_length:
        _warn_once("length", "length_penalty: no length_max / max_completion_length bound; the penalty is 0")
        return [0.0] * n
    soft = kwargs.get("length_soft_limit")
    ids = kwargs.get("completion_ids")
    out = []
    for i, completion in enumerate(completions):
        text = as_text(completion)
        if text is None:
            out.append(0.0)
            continue
        if isinstance(ids, (list, tuple)) and len(ids) == n and hasattr(ids[i], "__len__"):
            length = len(ids[i])
        else:
            length = len(text)
        out.append(overlong_penalty(length, int(max_length), None if soft is None else int(soft)))
    return out


def tag_count_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Repeated tags: -``tag_penalty`` (bindable, default 0.25) per extra ``<think>``/``</think>``/``<answer>``/
    ``</answer>`` beyond one each, down to -1."""
    per_tag = float(kwargs.get("tag_penalty", 0.25))
    completions = _batch(completions)
    out = []
    for completion in completions:
        text = as_text(completion)
        if text is None:
            out.append(0.0)
            continue
        extra = sum(max(0, c - 1) for c in _tag_counts(text).values())
        out.append(-min(1.0, per_tag * extra))
    return out


_TOKEN_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


def repetition_score(text: str, ngram_size: int = 3) -> float:
    """Share of repeated word n-grams in ``text`` (0 = none repeated); CJK characters count as words."""
    words = _TOKEN_RE.findall(text.lower())
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)


def repetition_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Repeated n-grams: ``-repetition_max_penalty * share of repeated n-grams`` (bindable: ``repetition_ngram``,
    default 3; ``repetition_max_penalty``, default 1.0)."""
    size = int(kwargs.get("repetition_ngram", 3))
    scale = abs(float(kwargs.get("repetition_max_penalty", 1.0)))
    completions = _batch(completions)
    out = []
    for completion in completions:
        text = as_text(completion)
        out.append(0.0 if text is None else -scale * repetition_score(text, size))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

RewardFn = Callable[..., list]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language_consistency": language_consistency_reward,
    "length_penalty": length_penalty,
    "tag_count_penalty": tag_count_penalty,
    "repetition_penalty": repetition_penalty,
}


def register_reward(name: str, fn: RewardFn | None = None, *, replace: bool = False):
    """Add a reward under a config name (usable as a decorator). Another module may register model-based rewards
    (helpfulness, harmlessness) here, or pass them to :func:`build_reward_functions` as ``extra_rewards``."""

    def add(f: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not f and not replace:
            raise ValueError(f"a reward named {name!r} is already registered (pass replace=True to override)")
        REWARDS[name] = f
        return f

    return add if fn is None else add(fn)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class BoundReward:
    """A reward function under its config name (``__name__``: TRL logs ``rewards/<name>/mean``) with default kwargs.

    A kwarg the dataset supplies wins over the bound one; None entries of such a column fall back to the bound value.
    Picklable when the wrapped function is.
    """

    def __init__(self, name: str, fn: RewardFn, bind: Mapping[str, Any] | None = None) -> None:
        self.__name__ = name
        self.__qualname__ = name
        self.fn = fn
        self.bind = dict(bind or {})

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self.bind)
        for key, value in kwargs.items():
            if key in self.bind and isinstance(value, list):
                value = [self.bind[key] if v is None else v for v in value]
            merged[key] = value
        return merged

    def __call__(self, completions: Any = None, **kwargs: Any) -> list:
        return self.fn(completions=completions, **self._kwargs(kwargs))

    def __repr__(self) -> str:
        return f"BoundReward({self.__name__!r}, {getattr(self.fn, '__name__', self.fn)!r}, {self.bind!r})"


class AsyncBoundReward(BoundReward):
    async def __call__(self, completions: Any = None, **kwargs: Any) -> list:  # type: ignore[override]
        return await self.fn(completions=completions, **self._kwargs(kwargs))


def build_reward_functions(
    weights: Mapping[str, float], *, extra_rewards: Mapping[str, RewardFn] | None = None, **bind: Any
) -> tuple[list, list[float]]:
    """``{name: weight}`` (the stage config's ``rewards``) -> (reward functions for TRL, their weights).

    A weight of 0 switches a reward off (a recipe turns a default reward off that way: Hydra merges the stage's
    ``rewards`` dict with the recipe's). Each function's ``__name__`` is its config name. ``bind``: kwargs every function receives unless the dataset has
    that column (e.g. ``template="r1_zero"``, ``language="en"``, ``verify_timeout=2``,
    ``max_completion_length=1024``). ``extra_rewards``: more name -> function entries, looked up before
    :data:`REWARDS` (a ``torch.nn.Module`` reward model is passed to TRL as is).
    """
    if weights is None or not any(w != 0 for w in dict(weights).values()):
        raise UserError("no rewards configured: set `rewards: {accuracy: 1.0, format: 1.0}` (name -> weight)")
    registry = dict(REWARDS)
    registry.update(extra_rewards or {})
    if "template" in bind and bind["template"] is not None:
        check_template(bind["template"])
    if "language" in bind and bind["language"] is not None:
        resolve_language(bind["language"])
    funcs, weight_list = [], []
    for name, weight in weights.items():
        name = str(name)
        if name not in registry:
            raise UserError(
                f"unknown reward {name!r} in `rewards`: known rewards are {', '.join(sorted(registry))}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"reward weight for {name!r} must be a finite number, got {weight!r}")
        if weight == 0:
            continue
        fn = registry[name]
        if _is_torch_module(fn):
            funcs.append(fn)
        elif _is_async(fn):
            funcs.append(AsyncBoundReward(name, fn, bind))
        else:
            funcs.append(BoundReward(name, fn, bind))
        weight_list.append(float(weight))
    return funcs, weight_list
