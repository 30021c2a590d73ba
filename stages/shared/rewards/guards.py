"""Guards: penalties (<= 0) for overlong completions, repeated tags and repeated n-grams. :func:`repetition_score` is
also rejection sampling's repetition filter."""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

from stages.shared.rewards.batch import completion_list, warn_once
from stages.shared.rewards.format import tag_counts
from stages.shared.templates import as_text

log = logging.getLogger(__name__)


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
    completions = completion_list(completions)
    n = len(completions)
    max_length = kwargs.get("length_max") or kwargs.get("max_completion_length")
    if not max_length:
        warn_once(log, "length", "length_penalty: no length_max / max_completion_length bound; the penalty is 0")
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
    completions = completion_list(completions)
    out = []
    for completion in completions:
        text = as_text(completion)
        if text is None:
            out.append(0.0)
            continue
        extra = sum(max(0, c - 1) for c in tag_counts(text).values())
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
    completions = completion_list(completions)
    out = []
    for completion in completions:
        text = as_text(completion)
        out.append(0.0 if text is None else -scale * repetition_score(text, size))
    return out
