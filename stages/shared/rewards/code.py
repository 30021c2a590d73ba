"""The code half of the accuracy reward: the program in the summary, run against the row's test cases in the sandbox.

A code row carries `tests` (the kinds are in stages/shared/sandbox.py); a row without tests is not a code row, and
the code rewards return None for it (TRL ignores None), so math and code prompts mix in one batch.

- :func:`extract_program`: the last fenced block of the configured language in the summary (after `</think>`).
- :func:`code_accuracy_reward`: the share of tests passed, or 1/0 for all passed (`code_score: share | all`).
- :func:`code_format_reward`: 1.0 when the summary holds exactly one fenced block, in the configured language.
- :func:`check_programs`: (program, tests) pairs scored in parallel in the verification pool
  (:func:`stages.shared.rewards.verification.run_all`, as the math checks), each program in its own sandbox, each
  check bounded by the sandbox's limits.
- :func:`program_key`: the normalised program (its AST, without comments or layout) that cons@k votes on.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, replace
from typing import Any, Sequence

from stages.shared.errors import UserError
from stages.shared.rewards.batch import completion_list, per_row
from stages.shared.rewards.verification import run_all, settings
from stages.shared.sandbox import (
    STOP_GRACE_S,
    Sandbox,
    default_sandbox,
    isolation,
    parse_tests,
    run_tests,
    sandbox_from_config,
    score,
)
from stages.shared.templates import as_text, split_reasoning

# fence info strings that name each language (lower case)
LANGUAGE_TAGS = {"python": ("python", "py", "python3")}
FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
SCORES = ("share", "all")
_CACHE: dict[tuple[str, str], float] = {}
_CACHE_MAX = 50_000


def code_settings(cfg: Any) -> dict:
    """{sandbox, code_language} from a stage config node (`sandbox: ${sandbox}`, `code_language:
    ${data.code_language}`): what the held-out checks and verify_rows need for code rows."""
    language_tags(str(cfg["code_language"]))
    return {"sandbox": sandbox_from_config(cfg["sandbox"]), "code_language": str(cfg["code_language"])}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of every fenced block, in order."""
    return [(tag.lower(), code) for tag, code in FENCE_RE.findall(text)]


def language_tags(language: str) -> tuple[str, ...]:
    if language not in LANGUAGE_TAGS:
        raise UserError(f"data.code_language={language!r}: the sandbox runs {', '.join(LANGUAGE_TAGS)} only")
    return LANGUAGE_TAGS[language]


def extract_program(text: Any, language: str = "python") -> str | None:
    """The last fenced block of `language` in the summary (the part after `</think>`); None if there is none."""
    text = as_text(text)
    if text is None:
        return None
    tags = language_tags(language)
    _, summary = split_reasoning(text)
    blocks = [code for tag, code in fenced_blocks(summary) if tag in tags]
    return blocks[-1] if blocks else None


def program_key(program: str | None) -> str | None:
    """The program with comments, blank lines and layout normalised away (`ast.dump` of its parse), so that two
    samples that differ only in those count as the same answer for cons@k; unparsable code is compared as text."""
    if program is None:
        return None
    try:
        return ast.dump(ast.parse(program))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program.strip()


# --------------------------------------------------------------------------------------------------------------------
# Checking programs: in the verification pool's worker processes, each run in its own sandbox
# --------------------------------------------------------------------------------------------------------------------


def check_program(payload: str, program: str) -> float:
    """Runs in a verification worker: `payload` is JSON {tests (parsed), sandbox (its fields), score}."""
    p = json.loads(payload)
    return score(run_tests(Sandbox(**p["sandbox"]), program, p["tests"]), p["score"])


def time_bound(sandbox: Sandbox, tests: list[dict]) -> float:
    """Seconds a whole check may take in a worker: one sandbox run per stdin/stdout case, one for the rest."""
    runs = sum(t["type"] == "stdin_stdout" for t in tests) + 1
    return runs * (sandbox.wall_s + STOP_GRACE_S) + 5.0


def check_programs(items: Sequence[tuple[str | None, list[dict]]], sandbox: Sandbox, mode: str,
                   verification: Any) -> list[float | None]:
    """Score of each (program, parsed tests) pair; no program scores 0.0. Deduplicated and cached; the checks run in
    parallel in the verification pool (:func:`stages.shared.rewards.verification.run_all`, set by the
    ``verification`` node), each program in its own sandbox, each check bounded by the sandbox's own limits
    (:func:`time_bound`) rather than ``verification.timeout_s`` (sized for one math-verify call). A check that does
    not finish even so (an overloaded machine, a worker that died) is None, "cannot tell", and is not cached: a
    program that overruns the sandbox's limits fails inside the check and scores 0."""
    if mode not in SCORES:
        raise UserError(f"code_score must be one of {list(SCORES)}, got {mode!r}")
    isolation(sandbox)  # refuse here, in the caller's process, when this machine cannot isolate programs
    fields = asdict(sandbox)
    keys = [None if program is None else
            (json.dumps({"tests": tests, "sandbox": fields, "score": mode}, sort_keys=True), program)
            for program, tests in items]
    todo = sorted({k for k in keys if k is not None and k not in _CACHE})
    fresh: dict[tuple[str, str], float | None] = {}
    if todo:
        s = settings(verification)
        bound = max(time_bound(sandbox, json.loads(payload)["tests"]) for payload, _ in todo)
        outcomes = run_all(check_program, todo, replace(s, timeout_s=max(s.timeout_s, bound)))
        if len(_CACHE) > _CACHE_MAX:
            _CACHE.clear()
        for key, (done, value) in zip(todo, outcomes):
            fresh[key] = float(value) if done else None
            if done:
                _CACHE[key] = fresh[key]
    return [0.0 if k is None else fresh[k] if k in fresh else _CACHE[k] for k in keys]


# --------------------------------------------------------------------------------------------------------------------
# Rewards (TRL's signature: completions plus dataset columns as keyword arguments)
# --------------------------------------------------------------------------------------------------------------------


def parsed_tests(tests: Any, n: int) -> list[list[dict] | None]:
    """The `tests` column (JSON strings or lists, None for rows that are not code) parsed per completion."""
    return [parse_tests(t, f"reward batch row {i}") for i, t in enumerate(per_row(tests, n, "tests"))]


def code_accuracy_reward(completions: Sequence[Any], tests: Any = None, verification: Any = None, *,
                         sandbox: Sandbox | None = None, code_language: str = "python", code_score: str = "share",
                         **kwargs: Any) -> list[float | None]:
    """The share of the row's tests the summary's program passes (`code_score: share`), or 1.0 only if it passes all
    (`all`); 0.0 without a program; None for rows without tests, and for a check that did not finish. `verification`
    (bound by ``build_reward_functions``): the config node of the pool the checks run in. `sandbox` (bound by the
    stage from the composed config; conf/sandbox/default.yaml when called on its own) sets the limits."""
    completions = completion_list(completions)
    rows = parsed_tests(tests, len(completions))
    out: list[float | None] = [None] * len(completions)
    code_rows = [i for i, t in enumerate(rows) if t is not None]
    if not code_rows:
        return out
    if sandbox is None:  # called on its own, not through a stage that binds the composed config's sandbox
        sandbox = default_sandbox()
    scores = check_programs([(extract_program(completions[i], code_language), rows[i]) for i in code_rows],
                            sandbox, code_score, verification)
    for i, s in zip(code_rows, scores):
        out[i] = s
    return out


def code_format_reward(completions: Sequence[Any], tests: Any = None, *, code_language: str = "python",
                       **kwargs: Any) -> list[float | None]:
    """1.0 when the summary holds exactly one fenced block and it is tagged with the configured language; else 0.0;
    None for rows without tests (not code rows)."""
    completions = completion_list(completions)
    tags = language_tags(code_language)
    out: list[float | None] = []
    for completion, t in zip(completions, per_row(tests, len(completions), "tests")):
        if t is None:
            out.append(None)
            continue
        text = as_text(completion)
        blocks = fenced_blocks(split_reasoning(text)[1]) if text is not None else []
        out.append(1.0 if len(blocks) == 1 and blocks[0][0] in tags else 0.0)
    return out
