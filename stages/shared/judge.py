"""An optional generative judge for answers that the rules cannot check (the paper's rejection sampling asked
DeepSeek-V3 to judge such samples): greedy yes/no on (reference, response summary) pairs, through the generation
module. rejection_sampling.filters.judge_model turns it on."""

from __future__ import annotations

import re
from typing import Any

from stages.shared.errors import UserError
from stages.shared.templates import chat_token_ids

JUDGE_PROMPT = ("You compare a response with a reference answer.\nReference answer: {reference}\n"
                "Response: {response}\nDoes the response's final answer agree with the reference answer? "
                "Reply with one word, yes or no.")


def parse_verdict(text: str) -> bool | None:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return None if m is None else m.group(1) == "yes"


def judge_verdicts(judge_gen, items: list[tuple[str, str]], *, tokenizer=None,
                   max_tokens: int = 8) -> list[bool | None]:
    """Judge (reference, response summary) pairs with a generator: greedy, one sample each."""
    if not items:
        return []
    prompts = []
    for reference, response in items:
        msg = JUDGE_PROMPT.format(reference=reference, response=response)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            msg = chat_token_ids([{"role": "user", "content": msg}], tokenizer)  # token ids: one BOS, as the stages
        prompts.append(msg)
    out = judge_gen.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    return [parse_verdict(s[0]["text"]) for s in out]


def judge_spec(spec: Any) -> dict | None:
    """rejection_sampling.filters.judge_model: null (no judge), a model id or path, or a mapping with `source`."""
    if spec in (None, "", False):
        return None
    if isinstance(spec, str):
        return {"source": spec}
    spec = dict(spec)
    if not spec.get("source"):
        raise UserError("rejection_sampling.filters.judge_model: give a model (hub id or local path) as a string or "
                        "{source: ..., revision: ..., backend: ..., max_tokens: ...}")
    return spec
