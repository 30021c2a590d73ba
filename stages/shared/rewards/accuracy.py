"""Accuracy: the final answer of a completion against the gold answer, by math-verify equivalence.

- :func:`normalize_answer`, :func:`canonical_answer`: the one answer normaliser (what math-verify misses; the key
  under which evaluation's majority vote groups answers).
- :func:`check_answer`: one (gold, answer) check with math-verify's own timeouts; it runs in the verification pool's
  workers (:mod:`stages.shared.rewards.verification`).
- :func:`verify_batch`, :func:`verify`: extract the answer, check it in the pool (deduplicated, cached).
- :func:`accuracy_reward`: the reward, with TRL's signature, routed by row kind (:func:`row_kind`): math rows by
  their gold answer here, code rows (``tests``) by running the program in the sandbox (:mod:`.code`), in the same
  pool; :func:`verify_rows`: the verdicts of rows of either kind (evaluation, rejection sampling, held-out checks).

A verdict is True, False or None: None when the gold answer is missing, is not mathematics (prose such as
``forty two``) or does not parse, and when the check did not finish within ``verification.timeout_s`` (retried
first). TRL skips a None reward; nothing that could not be checked is scored as a wrong answer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from stages.shared.errors import UserError
from stages.shared.progress import Progress
from stages.shared.rewards import code
from stages.shared.rewards.batch import completion_list, per_row, warn_once
from stages.shared.rewards.verification import run_all, settings
from stages.shared.schema import VerificationConfig
from stages.shared.templates import extract_answer_with_kind, last_boxed

log = logging.getLogger(__name__)

_CACHE_MAX = 100_000

# --------------------------------------------------------------------------------------------------------------------
# Normalisation

_DELIMS = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\\,|\{,\}|\\!|\\ |~|\\;|\\:)(?=\d{3}(?!\d))")
_SPACED_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_PERCENT_RE = re.compile(
    r"^(?P<x>.*?)\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\(?:text|mbox|mathrm)\{\s*percent\s*\}|percent)$", re.DOTALL
)
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}\s+[A-Za-z]{2,}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+(?:\{[^{}]*\})?")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00a0": " ", "\u2009": " "})


PROGRESS_BATCH = 1000  # answers; larger batches report progress (stages/shared/progress.py)


def normalize_answer(text: str) -> str:
    """What math-verify misses in a written answer: unicode minus, a wrapping ``\\boxed{}`` (the last one), math
    delimiters, a trailing full stop or comma, thousands separators written ``1\\,000`` / ``1{,}000`` / ``1 000``."""
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
    return s


_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\s*\{(.*)\}$", re.DOTALL)
_DECIMAL = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_COMMA_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_SLASH = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")


def _exact_number(s: str):
    from fractions import Fraction

    if _COMMA_THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        if _DECIMAL.match(s):
            return Fraction(s)
        m = _SLASH.match(s)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _FRAC.match(s)
        if m and int(m.group(3)) != 0:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def canonical_answer(answer: Any) -> str | None:
    """A string key under which equal-looking answers vote together (evaluation's majority vote); None when there
    is no answer.

    :func:`normalize_answer`, then wrapping ``\\text{}``-like groups, ``\\left``/``\\right``, spacing commands and all
    whitespace removed, ``\\dfrac``/``\\tfrac`` read as ``\\frac``; exact numbers (integers, decimals, ``a/b``,
    ``\\frac{a}{b}``, ``1,000``) become ``num:<p>/<q>``, so ``0.5``, ``1/2`` and ``\\frac{1}{2}`` are one key.
    """
    if answer is None:
        return None
    s = normalize_answer(str(answer))
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        m = _WRAPPERS.match(s)
        if not m:
            break
        s = m.group(1).strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[,!;: ]", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if not s:
        return None
    value = _exact_number(s)
    if value is not None:
        return f"num:{value.numerator}/{value.denominator}"
    return s


def _answer_forms(text: str, kind: str | None) -> list[tuple[str, bool]]:
    """Strings to hand to math-verify for one answer: ``(string, wrap in \\boxed{})`` pairs.

    A trailing percent sign gives both ``x`` and ``x/100`` (so ``50\\%`` matches ``50`` and ``0.5`` but ``50`` never
    matches ``0.5``). An ``<answer>`` that reads like a sentence is parsed as free text (math-verify finds the
    expression in it) rather than as one expression.
    """
    s = normalize_answer(text)
    if not s:
        return []
    if kind == "answer" and _PROSE_RE.search(_LATEX_CMD_RE.sub(" ", s)):
        return [(text.strip(), False)]
    m = _PERCENT_RE.match(s)
    if m and m.group("x").strip():
        x = m.group("x").strip()
        return [(x, True), (f"\\frac{{{x}}}{{100}}", True)]
    return [(s, True)]


# --------------------------------------------------------------------------------------------------------------------
# One check (runs in a verification worker)

_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


def gold_is_prose(gold: str, parsed: Sequence[Any]) -> bool:
    """Whether a gold answer is words rather than mathematics (``forty two``, ``yes``, ``Monday``): a word of three
    or more letters outside LaTeX commands and ``\\text{}`` groups that math-verify kept as variables (it would
    compare ``forty two`` as the product f·o·r·t·y·t·w·o, equal to ``two forty``). Units it drops (``5 apples``)
    are not prose."""
    if not _WORD_RE.search(_LATEX_CMD_RE.sub(" ", _TEXT_GROUP_RE.sub(" ", gold))):
        return False
    return any(getattr(p, "free_symbols", None) for p in parsed)


def _parse(text: str, wrap: bool, fallback: str, seconds: int) -> list:
    import math_verify
    from math_verify.errors import TimeoutException

    try:
        return math_verify.parse("\\boxed{" + text + "}" if wrap else text, fallback_mode=fallback,
                                 parsing_timeout=seconds, raise_on_error=True)
    except TimeoutException:
        raise TimeoutError("math-verify parse") from None
    except MemoryError:
        raise  # the worker's cap: the check did not finish (the pool says so), it did not fail
    except Exception:  # noqa: BLE001 -- what math-verify itself does without raise_on_error: nothing parsed
        return []


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, seconds: int) -> tuple:
    parsed = [p for s, wrap in _answer_forms(gold, "boxed") for p in _parse(s, wrap, "no_fallback", seconds)]
    return () if gold_is_prose(gold, parsed) else tuple(parsed)


def check_answer(gold: str, pred: str | None, kind: str | None, math_verify_timeout_s: int) -> bool | None:
    """None if ``gold`` is prose or does not parse, False if ``pred`` is missing or differs, else True. Raises
    TimeoutError when one of math-verify's own alarms (``math_verify_timeout_s`` per parse / comparison) fires, and
    MemoryError under the worker's memory cap: the check did not finish.

    Runs in a verification worker (:func:`verify_batch`): math-verify's alarms need a process's main thread, and a
    check stuck in C code (a huge integer power) needs a process that can be killed.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("check_answer needs a main thread (math-verify's signal.alarm): use verify_batch")
    import math_verify
    from math_verify.errors import TimeoutException

    g = _parse_gold(gold, math_verify_timeout_s)
    if not g:
        return None
    if pred is None:
        return False
    p = [x for s, wrap in _answer_forms(pred, kind) for x in _parse(s, wrap, "first_match", math_verify_timeout_s)]
    for gold_expr in g:  # math-verify's any() over the pairs, with its errors read as "not equal" one pair at a time
        for pred_expr in p:
            try:
                if math_verify.verify(gold_expr, pred_expr, timeout_seconds=math_verify_timeout_s,
                                      raise_on_error=True):
                    return True
            except TimeoutException:
                raise TimeoutError("math-verify comparison") from None
            except MemoryError:
                raise
            except Exception:  # noqa: BLE001
                continue
    return False


# --------------------------------------------------------------------------------------------------------------------
# Batched, cached, in the pool

_cache: dict[tuple, bool | None] = {}
_cache_lock = threading.Lock()
_STATS: Counter = Counter()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
    _parse_gold.cache_clear()


def stats() -> dict[str, int]:
    """Counters since the process started: checks (sent to the pool), cache_hits, unchecked (timed out: None)."""
    with _cache_lock:
        return dict(_STATS)


def _gold_text(gold: Any) -> str | None:
    if isinstance(gold, bool) or gold is None:
        return None
    if isinstance(gold, (int, float)):
        return repr(gold) if math.isfinite(gold) else None
    if isinstance(gold, str):
        return gold if gold.strip() else None
    return None


def _task(text: Any, gold: Any, max_answer_chars: int | None) -> tuple[str | None, str | None, str | None]:
    """(gold, answer, answer kind) of one pair; an answer over ``max_answer_chars`` is dropped unparsed (scores
    False: no readable answer is that long)."""
    answer, kind = extract_answer_with_kind(text)
    if answer is not None and max_answer_chars and len(answer) > max_answer_chars:
        answer, kind = None, None
    return _gold_text(gold), answer, kind


def _check_tasks(tasks: list[tuple], s: VerificationConfig) -> tuple[list[bool | None], list[bool]]:
    """(verdict, finished) per (gold, answer, kind) task: deduplicated, cached, each checked in the pool."""
    verdicts: list[bool | None] = [None] * len(tasks)
    finished = [True] * len(tasks)
    todo: dict[tuple, list[int]] = {}
    with _cache_lock:
        for i, task in enumerate(tasks):
            if task[0] is None:
                continue
            if task in _cache:
                verdicts[i] = _cache[task]
                _STATS["cache_hits"] += 1
            else:
                todo.setdefault(task, []).append(i)
        _STATS["checks"] += len(todo)
    if not todo:
        return verdicts, finished
    unique = list(todo)
    outcomes = run_all(check_answer, [(*t, s.math_verify_timeout_s) for t in unique], s)
    unchecked = 0
    with _cache_lock:
        if len(_cache) > _CACHE_MAX:
            _cache.clear()
        for task, (done, value) in zip(unique, outcomes):
            if done:
                _cache[task] = value  # an unfinished check is not cached: it depends on the machine's load
            else:
                unchecked += 1
            for i in todo[task]:
                verdicts[i], finished[i] = value, done
        _STATS["unchecked"] += unchecked
    if unchecked:
        warn_once(log, "timeout", "answer verification: %d check(s) did not finish in time (verification.timeout_s="
                  "%s, math_verify_timeout_s=%s; retried %d time(s)): their verdict is None, not wrong. A pathological "
                  "answer, or an overloaded machine: raise those bounds if legitimate answers time out (counts: "
                  "rewards.verifier_stats())", unchecked, s.timeout_s, s.math_verify_timeout_s, s.retries)
    return verdicts, finished


def _warn_gold(verdicts: list, finished: list, golds: Sequence[Any]) -> None:
    for verdict, done, gold in zip(verdicts, finished, golds):
        if verdict is None and done and gold is not None:
            warn_once(log, "gold", "accuracy: gold answer %r is prose or cannot be parsed; its rows get None (TRL "
                      "ignores them). Check the dataset's `answer` column (later ones logged at debug)",
                      str(gold)[:200])
            return


def verify_batch(pairs: Iterable[tuple[Any, Any]], verification: Any) -> list[bool | None]:
    """``[(prediction_text, gold), ...]`` -> True / False / None per pair (None: the gold answer is missing, prose
    or unparseable, or the check did not finish). ``verification``: the config node (``cfg.verification``).

    The answer is extracted with :func:`stages.shared.templates.extract_answer` (last ``\\boxed{}`` after
    ``</think>``, else ``<answer>``); no answer -> False.
    """
    s = settings(verification)
    pairs = list(pairs)
    tasks = [_task(text, gold, s.max_answer_chars) for text, gold in pairs]
    if len(tasks) < PROGRESS_BATCH:  # a GRPO step's rewards, a held-out check: quick
        verdicts, finished = _check_tasks(tasks, s)
    else:  # rejection sampling, evaluation: thousands of checks, in slices that report progress
        verdicts, finished = [], []
        with Progress(len(tasks), "verification", "verify answers", unit="answer") as bar:
            for start in range(0, len(tasks), PROGRESS_BATCH):
                v, f = _check_tasks(tasks[start:start + PROGRESS_BATCH], s)
                verdicts += v
                finished += f
                bar.update(len(v))
    _warn_gold(verdicts, finished, [gold for _, gold in pairs])
    return verdicts


def verify(prediction_text: Any, gold: Any, verification: Any) -> bool | None:
    """:func:`verify_batch` for one pair."""
    return verify_batch([(prediction_text, gold)], verification)[0]


def row_kind(row: Mapping[str, Any]) -> str:
    """"code" for a row with test cases, "math" for one with a gold answer, else "general"."""
    if row.get("tests") is not None:
        return "code"
    return "math" if row.get("answer") is not None else "general"


def verify_rows(texts: Sequence[Any], rows: Sequence[Mapping[str, Any]], verification: Any, *,
                sandbox: Any = None, code_language: str = "python") -> list[bool | None]:
    """Whether each text is right for its row, for rows of either kind (:func:`row_kind`), all checked in the pool
    set by ``verification``: a math row's final answer verifies against its ``answer`` (:func:`verify_batch`); a
    code row's program passes every one of its ``tests`` in the sandbox (``sandbox``: a
    :class:`~stages.shared.sandbox.Sandbox`, conf/sandbox/default.yaml when None). None: cannot tell (see
    :func:`verify_batch`; a program check that did not finish), and for other rows."""
    if len(texts) != len(rows):
        raise ValueError(f"{len(texts)} texts for {len(rows)} rows")
    kinds = [row_kind(r) for r in rows]
    out: list[bool | None] = [None] * len(texts)
    math_idx = [i for i, k in enumerate(kinds) if k == "math"]
    if math_idx:
        for i, v in zip(math_idx, verify_batch([(texts[i], rows[i]["answer"]) for i in math_idx], verification)):
            out[i] = v
    code_idx = [i for i, k in enumerate(kinds) if k == "code"]
    if code_idx:
        scores = code.code_accuracy_reward([texts[i] for i in code_idx], tests=[rows[i]["tests"] for i in code_idx],
                                           verification=verification, sandbox=sandbox, code_language=code_language,
                                           code_score="all")
        for i, score in zip(code_idx, scores):
            out[i] = None if score is None else score >= 1.0
    return out


_MISSING = object()


def accuracy_reward(completions: Sequence[Any], answer: Any = _MISSING, tests: Any = None, verification: Any = None,
                    **kwargs: Any) -> list[float | None]:
    """Routed by row kind. A code row (``tests`` not None): the score of the summary's program on the tests
    (:func:`stages.shared.rewards.code.code_accuracy_reward`: share passed or all-or-nothing, ``code_score``; kwargs
    ``sandbox``, ``code_language``, ``code_score``). A math row: 1.0 when the final answer equals the gold
    ``answer`` (math-verify), 0.0 when wrong or missing. None when the check cannot tell (see :func:`verify_batch`;
    rows without a gold answer or tests, such as general prompts mixed into the final RL stage, included). Both kinds
    are checked in the pool set by ``verification`` (bound by ``build_reward_functions``: the config node)."""
    completions = completion_list(completions)
    n = len(completions)
    test_rows = per_row(tests, n, "tests")
    is_code = [t is not None for t in test_rows]
    if answer is _MISSING and not any(is_code):
        raise UserError(
            "the accuracy reward needs the gold answer as the dataset column `answer` (map it with "
            "`columns: {answer: <their column>}` in conf/data), or test cases as the column `tests`, or drop "
            "`accuracy` from `rewards`"
        )
    golds = per_row(None if answer is _MISSING else answer, n, "answer")
    out: list[float | None] = [None] * n
    math_idx = [i for i in range(n) if not is_code[i]]
    if math_idx:
        verdicts = verify_batch([(completions[i], golds[i]) for i in math_idx], verification)
        for i, v in zip(math_idx, verdicts):
            out[i] = None if v is None else 1.0 if v else 0.0
    code_idx = [i for i in range(n) if is_code[i]]
    if code_idx:
        scores = code.code_accuracy_reward([completions[i] for i in code_idx],
                                           tests=[test_rows[i] for i in code_idx],
                                           verification=verification, **kwargs)
        for i, score in zip(code_idx, scores):
            out[i] = score
    return out
