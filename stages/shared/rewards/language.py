"""Language consistency: the share of target-language words in the reasoning (the paper's fix for language mixing),
at the level of scripts (Latin, Han, Cyrillic, ...)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any, Sequence

from stages.shared.errors import UserError
from stages.shared.rewards.batch import completion_list, per_row
from stages.shared.templates import THINK_CLOSE, THINK_OPEN, as_text, split_reasoning

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
    completions = completion_list(completions)
    n = len(completions)
    languages = per_row(language, n, "language")
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
