"""Rule-based rewards of the R1 recipe, with TRL's reward-function signature, and their registry (config name ->
function), one module per scorer in the manner of verl's ``reward_score/``:

- ``accuracy``: the final answer against the gold ``answer`` column by math-verify (:func:`accuracy_reward`,
  :func:`verify`, :func:`verify_batch`), the one answer normaliser (:func:`canonical_answer`)
- ``code``: the program in the summary against the row's tests, each run in the sandbox (:func:`code_accuracy_reward`,
  :func:`code_format_reward`, :func:`extract_program`); :func:`accuracy_reward` routes code rows (``tests``) there
  and math rows (``answer``) to math-verify (:func:`row_kind`, :func:`verify_rows`)
- ``verification``: the bounded process pool every verifying check runs in (per-call timeout, retry, None when a
  check cannot finish), set by the ``verification`` config node
- ``format``: one well-formed think block, then the answer part (:func:`format_reward`, :func:`is_well_formed`)
- ``language``: share of target-language words in the reasoning (:func:`language_consistency_reward`)
- ``guards``: :func:`length_penalty`, :func:`tag_count_penalty`, :func:`repetition_penalty`
- ``batch``: what every reward does with TRL's call (completions as a list, per-row kwargs, warn once)

A reward function takes ``completions`` plus the dataset columns as keyword arguments and returns one float per
completion, or None ("cannot tell": TRL turns it into NaN and leaves it out). Conversational and plain completions
score the same; non-string garbage never raises and scores 0.0. A new reward is a module here, added to
:data:`REWARDS` (or :func:`register_reward`) under the name the config's ``rewards`` uses.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from typing import Any, Callable, Iterable, Mapping

from stages.shared.errors import UserError
from stages.shared.rewards import accuracy, verification
from stages.shared.rewards.accuracy import (
    accuracy_reward,
    canonical_answer,
    check_answer,
    normalize_answer,
    row_kind,
    verify,
    verify_batch,
    verify_rows,
)
from stages.shared.rewards.code import code_accuracy_reward, code_format_reward, extract_program
from stages.shared.rewards.format import format_reward, is_well_formed
from stages.shared.rewards.guards import (
    length_penalty,
    overlong_penalty,
    repetition_penalty,
    repetition_score,
    tag_count_penalty,
)
from stages.shared.rewards.language import language_consistency, language_consistency_reward, resolve_language
from stages.shared.templates import check_template

log = logging.getLogger(__name__)

__all__ = [
    "REWARDS", "BoundReward", "accuracy_reward", "build_reward_functions", "canonical_answer", "check_answer",
    "code_accuracy_reward", "code_format_reward", "extract_program", "format_reward", "is_well_formed",
    "language_consistency", "language_consistency_reward", "length_penalty",
    "normalize_answer", "overlong_penalty", "register_reward", "repetition_penalty", "repetition_score",
    "resolve_language", "row_kind", "tag_count_penalty", "verification_metrics", "verifier_stats", "verify",
    "verify_batch", "verify_rows",
]  # fmt: skip


def verifier_stats() -> dict[str, int]:
    """Counters of answer verification since the process started: checks, cache_hits, unchecked (accuracy) and
    calls, timeouts, retries, worker_deaths, unfinished (the pool)."""
    return {**accuracy.stats(), **{f"pool_{k}": v for k, v in verification.stats().items()}}


def verification_metrics(before: Mapping[str, int]) -> dict[str, int]:
    """``verify_<counter>`` metrics of what a stage verified: :func:`verifier_stats` now minus ``before`` (taken at
    the stage's start)."""
    now = verifier_stats()
    return {f"verify_{k}": v - before.get(k, 0) for k, v in sorted(now.items())}


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

RewardFn = Callable[..., list]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "code_accuracy": code_accuracy_reward,
    "code_format": code_format_reward,
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


# rewards that score rows of one kind only (None elsewhere): off when the dataset has no row of that kind
ROW_KIND_OF_REWARD = {"code_accuracy": "code", "code_format": "code"}
# rewards that check in the verification pool: they need the `verification` node bound
VERIFYING_REWARDS = (accuracy_reward, code_accuracy_reward)


def build_reward_functions(
    weights: Mapping[str, float], *, extra_rewards: Mapping[str, RewardFn] | None = None,
    row_kinds: Iterable[str] | None = None, **bind: Any
) -> tuple[list, list[float]]:
    """``{name: weight}`` (the stage config's ``rewards``) -> (reward functions for TRL, their weights).

    A weight of 0 switches a reward off (a recipe turns a default reward off that way: Hydra merges the stage's
    ``rewards`` dict with the recipe's). Each function's ``__name__`` is its config name. ``bind``: kwargs every
    function receives unless the dataset has that column (e.g. ``template="r1_zero"``, ``language="en"``,
    ``verification=cfg.verification``, ``max_completion_length=1024``); the accuracy reward needs ``verification``.
    ``extra_rewards``: more name -> function entries, looked up before :data:`REWARDS` (a ``torch.nn.Module`` reward
    model is passed to TRL as is). ``row_kinds``: the kinds of rows in the dataset (:func:`row_kind`); a reward
    for another kind only (``code_format`` on a math dataset) is left out, since it would score nothing.
    """
    if weights is None or not any(w != 0 for w in dict(weights).values()):
        raise UserError("no rewards configured: set `rewards: {accuracy: 1.0, format: 1.0}` (name -> weight)")
    registry = dict(REWARDS)
    registry.update(extra_rewards or {})
    if "template" in bind and bind["template"] is not None:
        check_template(bind["template"])
    if "language" in bind and bind["language"] is not None:
        resolve_language(bind["language"])
    if "verification" in bind:
        bind["verification"] = verification.settings(bind["verification"])
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
        if row_kinds is not None and ROW_KIND_OF_REWARD.get(name) not in (None, *row_kinds):
            log.info("reward %s left out: the dataset has no %s rows", name, ROW_KIND_OF_REWARD[name])
            continue
        fn = registry[name]
        if fn in VERIFYING_REWARDS and "verification" not in bind:
            raise UserError(f"the {name} reward checks answers in the verification pool: pass "
                            "verification=cfg.verification (the `verification` node, conf/verification/)")
        if _is_torch_module(fn):
            funcs.append(fn)
        elif _is_async(fn):
            funcs.append(AsyncBoundReward(name, fn, bind))
        else:
            funcs.append(BoundReward(name, fn, bind))
        weight_list.append(float(weight))
    return funcs, weight_list
