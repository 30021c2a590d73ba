"""Prompt formats of the R1 recipe and the text helpers every stage shares.

Two formats:

- ``r1_zero``: the plain-text template of the paper (v1, Table 1) for base models. The response carries
  ``<think> ... </think>`` then ``<answer> ... </answer>``.
- ``r1``: conversational prompts ``[{"role": "user", "content": question}]`` rendered through the tokenizer's chat
  template. The response is readable reasoning in ``<think>...</think>`` followed by a summary whose final answer is in
  ``\\boxed{...}``.

Helpers: :func:`format_prompt`, :func:`render_prompt`, :func:`completion_text`, :func:`extract_answer`,
:func:`split_reasoning`. No heavy imports here (no torch, no transformers, no sympy).
"""

from __future__ import annotations

import re
from typing import Any

from stages.shared.errors import UserError

# Paper v1, Table 1. Another stage writes pretraining data in exactly this text: do not change it.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

TEMPLATES = ("r1", "r1_zero")
DEFAULT_TEMPLATE = "r1"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def check_template(template: Any) -> str:
    """Return ``template`` if it is a known format name, else raise UserError listing the known ones."""
    if template not in TEMPLATES:
        raise UserError(
            f"unknown prompt template {template!r}: known templates are {', '.join(TEMPLATES)} "
            f"(set `template:` in the stage config or the dataset's `template` column)"
        )
    return template


def format_prompt(question: str, template: str) -> str | list[dict[str, str]]:
    """The prompt for ``question`` in a format: a string for ``r1_zero``, a list of chat messages for ``r1``."""
    check_template(template)
    if not isinstance(question, str):
        raise UserError(f"a prompt question must be a string, got {type(question).__name__}: {question!r:.80}")
    if template == "r1_zero":
        return R1_ZERO_TEMPLATE.replace("{prompt}", question)
    return [{"role": "user", "content": question}]


def render_prompt(question: str, template: str, tokenizer: Any = None) -> str:
    """The exact text given to a generator (vLLM or HF generate) for ``question``.

    ``r1_zero``: the template text (the tokenizer is not needed). ``r1``: the tokenizer's chat template applied with
    ``tokenize=False, add_generation_prompt=True``.
    """
    prompt = format_prompt(question, template)
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise UserError("template 'r1' renders prompts through a tokenizer's chat template: pass the tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"template 'r1' needs a chat template, but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none: "
            "use a tokenizer with `chat_template` set, or `template: r1_zero` for a base model"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(question: str, template: str, tokenizer: Any) -> list[int]:
    """The token ids a generator is given for ``question``: for ``r1`` the chat template's own tokens (a template
    that writes the BOS token gets it once, not a second time from the tokenizer: Llama 3), for ``r1_zero`` the plain
    tokenization (with the BOS the tokenizer adds, if any). GRPOTrainer builds its prompts the same way."""
    prompt = format_prompt(question, template)
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    render_prompt(question, template, tokenizer)  # the same checks (a chat template exists) and errors
    return chat_token_ids(prompt, tokenizer)


def chat_token_ids(messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """The chat template's tokens for ``messages`` and the assistant turn's opening, as the template writes them:
    its BOS once (rendering to text and tokenizing again adds a second one where the template writes it: Llama 3)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def longest_prompt(questions: Any, template: str, tokenizer: Any) -> int:
    """Tokens of the longest prompt among `questions` (0 for none): what a completion budget must leave room for."""
    return max((len(prompt_token_ids(q, template, tokenizer)) for q in questions), default=0)


_PROBE = "r1flow-probe-7f3a"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>`` for ChatML/Qwen, ``<|eot_id|>`` for
    Llama 3, the EOS token for R1-Distill), or None when the tokenizer has no chat template or the turn does not end
    in an added token. A base checkpoint's EOS (``<|endoftext|>``) is usually not it: after chat SFT, generation must
    stop here."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}],
                                         tokenize=False)
    if _PROBE not in text:
        return None
    tail = text[text.rindex(_PROBE) + len(_PROBE):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        return None
    return tokenizer.convert_ids_to_tokens(ids[0])


def think_prefilled(tokenizer: Any, template: str) -> bool:
    """Whether the chat template opens ``<think>`` in the generation prompt (DeepSeek-R1-Distill), so completions
    start inside the reasoning and carry only the closing tag."""
    if template != "r1" or not getattr(tokenizer, "chat_template", None):
        return False
    return render_prompt("q", template, tokenizer).rstrip().endswith(THINK_OPEN)


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                return None
        return "".join(parts)
    return None


def as_text(completion: Any) -> str | None:
    """Like :func:`completion_text` but ``None`` for anything that is not a completion (garbage)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        if not completion:
            return None
        texts = []
        for message in completion:
            if not isinstance(message, dict):
                return None
            if message.get("role", "assistant") != "assistant":
                continue  # tool results and the like are not the model's text
            text = _content_text(message.get("content"))
            if text is None:
                return None
            texts.append(text)
        return "\n".join(texts) if texts else None
    return None


def completion_text(completion: Any) -> str:
    """A TRL completion as one string: a plain string, or ``[{"role": "assistant", "content": ...}]`` (the
    assistant messages' contents joined by newlines). Anything else gives ``""``."""
    text = as_text(completion)
    return "" if text is None else text


def split_reasoning(text: str) -> tuple[str, str]:
    """``(reasoning, summary)``: the think part (tags removed) and everything after the last ``</think>``.

    No think block: ``("", text)``. An unclosed ``<think>`` (the model never stopped thinking): reasoning is the rest
    and the summary is ``""``. A completion whose prompt already opened ``<think>`` (only ``</think>`` present) works.
    """
    if not isinstance(text, str):
        text = completion_text(text)
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        reasoning, summary = text[:close], text[close + len(THINK_CLOSE) :]
        open_ = reasoning.find(THINK_OPEN)
        if open_ >= 0:
            reasoning = reasoning[open_ + len(THINK_OPEN) :]
        return reasoning.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip(), summary.strip()
    open_ = text.find(THINK_OPEN)
    if open_ >= 0:
        return text[open_ + len(THINK_OPEN) :].strip(), ""
    return "", text.strip()


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` opened just before ``start`` (``\\{``, ``\\}`` do not count); None if
    unclosed."""
    depth = 1
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces balanced."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        end = _balanced_end(text, start)
        if end is not None:
            return text[start:end]
    return None


def answer_region(text: str) -> str:
    """Where a final answer may be: after the last ``</think>``; the whole text when there is no think tag; nothing
    when a ``<think>`` was opened and never closed."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return ""
    return text


def extract_answer_with_kind(text: Any) -> tuple[str | None, str | None]:
    """``(answer, kind)`` with kind ``"boxed"`` or ``"answer"`` (the ``<answer>`` tag); ``(None, None)`` if none."""
    text = as_text(text)
    if not text:
        return None, None
    region = answer_region(text)
    boxed = last_boxed(region)
    if boxed is not None:
        boxed = boxed.strip()
        return (boxed, "boxed") if boxed else (None, None)
    tagged = _ANSWER_RE.findall(region)
    if tagged:
        answer = tagged[-1].strip()
        return (answer, "answer") if answer else (None, None)
    return None, None


def extract_answer(text: Any) -> str | None:
    """The final answer of a response: the content of the last ``\\boxed{}`` after ``</think>`` (balanced nested
    braces), else the content of the last ``<answer>...</answer>`` there; None if neither (or empty).

    Text without any think tag is searched whole; text with an unclosed ``<think>`` has no answer.
    """
    return extract_answer_with_kind(text)[0]
