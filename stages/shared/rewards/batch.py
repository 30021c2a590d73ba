"""What every reward function does with TRL's call: the completions as a list, a kwarg read per row, a warning once.

TRL calls a reward function with ``completions`` (plain strings, or conversational ``[[{"role": "assistant",
"content": ...}]]``) and every dataset column as a keyword argument (one value per completion), plus ``prompts``,
``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

_warned: set[str] = set()
_warned_lock = threading.Lock()


def completion_list(completions: Any) -> list:
    """The completions as a list: a lone string is one completion (TRL always passes a list); None or a
    non-sequence is an empty batch."""
    if isinstance(completions, str):
        return [completions]
    if isinstance(completions, (list, tuple)):
        return list(completions)
    return []


def per_row(value: Any, n: int, name: str) -> list:
    """A kwarg that is either one value for the batch or a dataset column (a list, one value per completion)."""
    from stages.shared.errors import UserError

    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"reward kwarg `{name}` has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def warn_once(logger: logging.Logger, key: str, message: str, *args: Any) -> None:
    """``logger.warning`` the first time ``key`` is seen in this process, ``logger.debug`` afterwards: a reward runs
    every step, and one warning says it."""
    with _warned_lock:
        first = key not in _warned
        _warned.add(key)
    (logger.warning if first else logger.debug)(message, *args)


def forget_warnings() -> None:
    """Warn again (tests)."""
    with _warned_lock:
        _warned.clear()
