"""Format: one well-formed think block, then the answer part -- ``<answer>`` tags (``r1_zero``) or a non-empty summary
(``r1``). Rejection sampling and evaluation use the same definition (:func:`is_well_formed`)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from stages.shared.rewards.batch import completion_list, per_row
from stages.shared.templates import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    DEFAULT_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
    as_text,
    check_template,
)

_TAG_RE = re.compile(r"</?(?:think|answer)>")


def tag_counts(text: str) -> Counter:
    """How often each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` occurs."""
    return Counter(_TAG_RE.findall(text))


def is_well_formed(text: str, template: str = DEFAULT_TEMPLATE, think_prefilled: bool = False) -> bool:
    """One ordered, non-empty think block, then the answer part: ``<answer>non-empty</answer>`` and nothing else
    (``r1_zero``), or a non-empty summary (``r1``). ``think_prefilled``: the prompt already ends with ``<think>``, so
    the completion starts inside the reasoning. A non-string is not well formed."""
    check_template(template)
    text = as_text(text)
    if text is None:
        return False
    counts = tag_counts(text)
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
    completions = completion_list(completions)
    n = len(completions)
    templates = [check_template(t if t is not None else DEFAULT_TEMPLATE) for t in per_row(template, n, "template")]
    prefilled = bool(kwargs.get("think_prefilled", False))
    out = []
    for completion, tmpl in zip(completions, templates):
        text = as_text(completion)
        out.append(1.0 if text is not None and is_well_formed(text, tmpl, prefilled) else 0.0)
    return out
