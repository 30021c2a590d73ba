"""Stage `rejection_sampling` (paper v1 §2.3.3): k samples per prompt from the RL checkpoint, keep the good ones, merge
them with non-reasoning SFT data into one dataset -- the input of stage-4 SFT and of distillation.

1. Generate (stages/shared/generation.py: vLLM, else HF generate) in shards of `shard_size` prompts, each written atomically
   to `work_dir/shards/shard-00012.jsonl` as it finishes: a crash loses at most one shard, a rerun skips finished ones.
2. Filter each sample (every filter on by default; `filters.*` false/null turns one off), in this order, counting the
   first filter that drops it: truncation (finish_reason == length), format (one think block, a summary, an extractable
   answer; for a code prompt exactly one fenced block of the code language in the summary), correctness (math: rule-
   based verify against the gold answer, with an optional generative judge for the answers the rules cannot check,
   else dropped as unverifiable; code: the program passes every test in the sandbox), language (share of
   target-language words in the reasoning), long paragraphs, code blocks in the reasoning (the program of a code
   answer sits in the summary and is not one), repetition; then per prompt: duplicates and a cap of accepted samples.
3. Merge accepted reasoning samples with the general (non-reasoning) SFT set at `merge.reasoning_to_general_ratio`,
   shuffled with the seed.

Artifact: train.jsonl ({messages: [user, assistant], kind, prompt_id, answer, language, category}), schema.json,
prompt_stats.jsonl (prompt_id, drawn, correct, accepted, pass_rate), filter_counts.json, rejected_examples.jsonl.
The filters are pure functions of a sample's text (tests run them without a model).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

from stages.shared import data
from stages.shared.data import load_rows
from stages.shared.errors import UserError
from stages.shared.judge import judge_spec, judge_verdicts
from stages.shared.progress import Progress
from stages.shared.rewards import repetition_score, verification_metrics, verifier_stats
from stages.shared.rewards.code import code_settings
from stages.shared.templates import split_reasoning

log = logging.getLogger(__name__)

# Drop reasons, in the order they are checked (filter_counts.json and metrics `dropped_<reason>`).
REASONS = ("truncated", "format", "incorrect", "unverifiable", "language", "long_paragraph", "code_block",
           "repetition", "duplicate", "cap")

SCHEMA = {
    "messages": "list of {role, content}: the user prompt and the assistant response; reasoning responses are "
                "'<think>\\n{reasoning}\\n</think>\\n{summary}'",
    "kind": "'reasoning' (accepted rejection samples) or 'general' (non-reasoning SFT data)",
    "prompt_id": "id of the source prompt (rl prompts file or general SFT file)",
    "answer": "gold answer of a math prompt; null for code prompts (checked by their tests) and general rows",
    "language": "language code of the prompt (e.g. en, ru)",
    "category": "general rows: their category; reasoning rows: 'reasoning'",
}


# ---------------------------------------------------------------------------------------------------------------------
# Filters: pure functions of the text
# ---------------------------------------------------------------------------------------------------------------------
def is_truncated(sample: Mapping) -> bool:
    return sample.get("finish_reason") == "length"


def well_formed(text: str, template: str = "r1", think_prefilled: bool = False) -> bool:
    """The format reward's definition (stages/shared/rewards/format.py): one ordered, non-empty think block, then a
    non-empty summary (r1) or `<answer>...</answer>` (r1_zero)."""
    from stages.shared.rewards import is_well_formed

    return is_well_formed(text, template, think_prefilled)


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def has_long_paragraph(reasoning: str, max_chars: int) -> bool:
    return any(len(p.strip()) > max_chars for p in paragraphs(reasoning))


def has_code_block(text: str) -> bool:
    return "```" in text


def dedup_key(text: str) -> str:
    return " ".join(text.split()).lower()


def canonical_response(text: str) -> str:
    """The assistant message of an accepted sample, in the cold-start format."""
    reasoning, summary = split_reasoning(text)
    return f"<think>\n{reasoning}\n</think>\n{summary}"


def correctness_verdicts(texts: list[str], rows: list[Mapping], verification, code: Mapping) -> list[bool | None]:
    """Rule-based check of each response against its prompt row: True / False / None (math: no gold, prose or
    unparseable, or the check did not finish in time). Math rows by their gold answer, code rows by running every
    test (`code`: {sandbox, code_language}). `verification`: the stage's `verification` config node."""
    from stages.shared.rewards import verify_rows

    return verify_rows(texts, rows, verification, **code) if texts else []


def code_well_formed(text: str, code_language: str) -> bool:
    """A code answer's format: exactly one fenced block in the summary, in the code language (the code_format
    reward's definition)."""
    from stages.shared.rewards.code import code_format_reward

    return code_format_reward([text], tests=[[]], code_language=code_language)[0] == 1.0


def _language_share(reasoning: str, language: str) -> float:
    from stages.shared.rewards import language_consistency

    return float(language_consistency(reasoning, language))


def sample_reason(sample: Mapping, filters: Mapping, *, verdict: bool | None, language: str | None,
                  template: str = "r1", think_prefilled: bool = False,
                  code_language: str | None = None) -> str | None:
    """Why one sample is dropped (a name from REASONS), or None to keep it. `verdict` is its correctness (True, False,
    None = not rule-checkable and not judged). `code_language`: set for a code prompt (its answer is a program)."""
    text = sample["text"]
    if filters["truncation"] and is_truncated(sample):
        return "truncated"
    if filters["format"] and not (well_formed(text, template, think_prefilled) and
                                  (code_language is None or code_well_formed(text, code_language))):
        return "format"
    if filters["correctness"]:
        if verdict is False:
            return "incorrect"
        if verdict is None:
            return "unverifiable"
    reasoning, _ = split_reasoning(text)
    lang_min = filters["language_consistency_min"]
    if lang_min is not None and language and _language_share(reasoning, language) < float(lang_min):
        return "language"
    max_par = filters["max_paragraph_chars"]
    if max_par is not None and has_long_paragraph(reasoning, int(max_par)):
        return "long_paragraph"
    if filters["code_blocks"] and has_code_block(reasoning):
        return "code_block"
    max_rep = filters["max_repeated_ngram_share"]
    if max_rep is not None and repetition_score(reasoning, ngram_size=4) > float(max_rep):
        return "repetition"
    return None


def filter_prompt(row: Mapping, samples: list[Mapping], filters: Mapping, *, verdicts: list[bool | None],
                  default_language: str | None = None, template: str = "r1",
                  think_prefilled: bool = False, code_language: str = "python") -> tuple[list[int], list[str | None]]:
    """Indices of the accepted samples of one prompt and every sample's drop reason (None = accepted)."""
    from stages.shared.rewards import row_kind

    language = row.get("language") or default_language
    code_language = code_language if row_kind(row) == "code" else None
    reasons: list[str | None] = []
    seen: set[str] = set()
    accepted: list[int] = []
    cap = filters["max_accepted_per_prompt"]
    for i, (s, v) in enumerate(zip(samples, verdicts)):
        reason = sample_reason(s, filters, verdict=v, language=language, template=template,
                               think_prefilled=think_prefilled, code_language=code_language)
        if reason is None and filters["dedup"]:
            key = dedup_key(canonical_response(s["text"]))
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is None and cap is not None and len(accepted) >= int(cap):
            reason = "cap"
        if reason is None:
            accepted.append(i)
        reasons.append(reason)
    return accepted, reasons


# ---------------------------------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------------------------------
def reasoning_row(row: Mapping, text: str, default_language: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": canonical_response(text)}],
            "kind": "reasoning", "prompt_id": str(row["id"]),
            "answer": None if row.get("answer") is None else str(row["answer"]),
            "language": row.get("language") or default_language, "category": "reasoning"}


def general_row(row: Mapping, default_language: str | None = None) -> dict:
    return {"messages": [dict(m) for m in row["messages"]], "kind": "general",
            "prompt_id": str(row.get("id", "")), "answer": None,
            "language": row.get("language") or default_language, "category": row.get("category") or "general"}


def merge(reasoning: list[dict], general: list[dict], *, ratio: float | None, max_general: int | None,
          seed: int) -> tuple[list[dict], int]:
    """Reasoning rows plus general rows at `ratio` reasoning : 1 general (all general rows when ratio is null; never
    more general rows than exist, no upsampling), shuffled with `seed`. Returns (rows, general rows used)."""
    rng = random.Random(seed)
    want = len(general) if ratio is None else round(len(reasoning) / float(ratio))
    if max_general is not None:
        want = min(want, int(max_general))
    picked = rng.sample(general, min(want, len(general)))
    rows = list(reasoning) + picked
    rng.shuffle(rows)
    return rows, len(picked)


# ---------------------------------------------------------------------------------------------------------------------
# Generation in resumable shards
# ---------------------------------------------------------------------------------------------------------------------
def _read_shard(path: Path, ids: list[str]) -> list[dict] | None:
    """A finished shard's rows, or None when it is missing, damaged or holds other prompts."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    return rows if [r.get("prompt_id") for r in rows] == ids else None


def generate_shards(gen, rows: list[Mapping], prompts: list[list[int]], work_dir: Path, *, shard_size: int, n: int,
                    temperature: float, top_p: float, max_tokens: int, seed: int) -> tuple[list[dict], dict]:
    """Samples for every prompt through shards in work_dir/shards: ([{prompt_id, samples}] in prompt order, counts).

    Shard k holds prompts [k*shard_size, (k+1)*shard_size); its seed is `seed + start * n`, so with vLLM a regenerated
    shard draws what the lost one would have."""
    shard_dir = Path(work_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    out: list[dict] = []
    starts = list(range(0, len(rows), shard_size))
    resumed = 0
    t0 = time.time()
    bar = Progress(len(rows), "generation", "rejection sampling", unit="prompt", lines=False)  # the log lines say it
    for k, start in enumerate(starts):
        ids = [str(r["id"]) for r in rows[start:start + shard_size]]
        path = shard_dir / f"shard-{k:05d}.jsonl"
        shard = _read_shard(path, ids)
        if shard is not None:
            resumed += 1
            state = "resumed"
        else:
            samples = gen.generate(prompts[start:start + shard_size], n=n, temperature=temperature, top_p=top_p,
                                   max_tokens=max_tokens, seed=seed + start * n)
            shard = [{"prompt_id": pid, "samples": s} for pid, s in zip(ids, samples)]
            data.write_jsonl(path, shard)
            state = "generated"
        out.extend(shard)
        bar.update(len(shard))
        log.info("rejection sampling: shard %d/%d %s (%d/%d prompts, %.0f s)", k + 1, len(starts), state, len(out),
                 len(rows), time.time() - t0)
    bar.close()
    return out, {"shards_total": len(starts), "shards_resumed": resumed, "shards_generated": len(starts) - resumed}


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path) -> dict:
    from stages.shared.generation import open_generator
    from stages.shared import templates
    from stages.shared.models import context_length, fit_to_context, load_tokenizer, model_source
    from stages.shared.templates import check_template, prompt_token_ids
    from stages.shared import hardware

    hardware.setup(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under a multi-process launcher only rank 0 generates (vLLM spreads over the GPUs by tensor parallelism).
        return {}
    output_dir, work_dir = Path(output_dir), Path(work_dir)
    filters, merge_cfg = cfg.filters, cfg.merge
    seed = int(cfg.seed)
    template = check_template(cfg.template)
    default_language = cfg.language
    n = int(cfg["samples_per_prompt"])
    if n < 1 or int(cfg["shard_size"]) < 1:
        raise UserError("rejection_sampling: samples_per_prompt and shard_size must be at least 1")

    rows = data.load_task_rows(cfg["prompts_file"], "rejection_sampling.prompts_file", required=("id", "prompt"))
    rows, decontaminated = data.decontaminate(rows, data.evaluation_sets(cfg), ngram=int(cfg["decontaminate_ngram"]),
                                              key="rejection_sampling.prompts_file")
    if cfg.max_prompts is not None:
        rows = rows[:int(cfg["max_prompts"])]
    if not rows:
        raise UserError(f"rejection_sampling.prompts_file {cfg['prompts_file']}: no prompts")
    general = load_rows(cfg["general_sft_file"], required=("messages",), name="rejection_sampling.general_sft_file")

    source, revision = model_source(inputs["model"])
    trust = bool(cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, revision=revision, trust_remote_code=trust)
    # token ids, not text: a template that writes BOS (Llama 3) would get a second one from the engine's tokenizer
    prompts = [prompt_token_ids(str(r["prompt"]), template, tokenizer) for r in rows]
    think_prefilled = templates.think_prefilled(tokenizer, template)  # the chat template opens the block
    context = context_length(source, revision=revision, trust_remote_code=trust)
    max_tokens = fit_to_context("rejection_sampling.max_tokens", int(cfg["max_tokens"]), context,
                                prompt_tokens=max(len(p) for p in prompts))

    with open_generator(source, revision=revision, backend=cfg.backend, hardware=cfg.hardware, seed=seed,
                        max_model_len=cfg.max_model_len, trust_remote_code=trust,
                        planned_tokens=len(rows) * n * max_tokens) as gen:
        backend = gen.backend
        log.info("rejection sampling: %d prompts x %d samples with %s", len(rows), n, backend)
        results, gen_stats = generate_shards(gen, rows, prompts, work_dir, shard_size=int(cfg["shard_size"]), n=n,
                                             temperature=float(cfg["temperature"]), top_p=float(cfg["top_p"]),
                                             max_tokens=max_tokens, seed=seed)
        gen_stats.update(gen_tokens=gen.tokens_generated, gen_seconds=round(gen.seconds, 2),
                         engine_start_s=round(gen.startup_seconds, 2))

    # correctness verdicts (rule-based), then the judge for what the rules cannot check
    verified_before = verifier_stats()
    code = code_settings(cfg)
    pairs = [(s["text"], row) for row, res in zip(rows, results) for s in res["samples"]]
    flat = correctness_verdicts([t for t, _ in pairs], [r for _, r in pairs], cfg["verification"], code)
    verdicts, k = [], 0
    for res in results:
        verdicts.append(flat[k:k + len(res["samples"])])
        k += len(res["samples"])
    judge = judge_spec(filters["judge_model"])
    judge_calls = 0
    if judge and filters["correctness"]:
        todo = [(i, j) for i, res in enumerate(results) for j, s in enumerate(res["samples"])
                if verdicts[i][j] is None and not is_truncated(s) and str(rows[i].get("answer") or "").strip()]
        if todo:
            judge_tok = load_tokenizer(judge["source"], revision=judge.get("revision"))
            with open_generator(judge["source"], revision=judge.get("revision"), backend=judge.get("backend", "auto"),
                                hardware=cfg.hardware, seed=seed) as jgen:
                items = [(str(rows[i]["answer"]), split_reasoning(results[i]["samples"][j]["text"])[1] or
                          results[i]["samples"][j]["text"]) for i, j in todo]
                for (i, j), v in zip(todo, judge_verdicts(jgen, items, tokenizer=judge_tok,
                                                          max_tokens=int(judge.get("max_tokens", 8)))):
                    verdicts[i][j] = v
            judge_calls = len(todo)

    counts: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    reasoning: list[dict] = []
    stats: list[dict] = []
    for row, res, vs in zip(rows, results, verdicts):
        accepted, reasons = filter_prompt(row, res["samples"], filters, verdicts=vs, default_language=default_language,
                                          template=template, think_prefilled=think_prefilled,
                                          code_language=code["code_language"])
        for s, reason in zip(res["samples"], reasons):
            if reason is not None:
                counts[reason] += 1
                if len(examples.setdefault(reason, [])) < 5:
                    examples[reason].append({"reason": reason, "prompt_id": str(row["id"]), "text": s["text"]})
        reasoning.extend(reasoning_row(row, res["samples"][i]["text"], default_language) for i in accepted)
        correct = sum(v is True for v in vs)
        stats.append({"prompt_id": str(row["id"]), "drawn": len(vs), "correct": correct, "accepted": len(accepted),
                      "pass_rate": correct / max(len(vs), 1)})

    general_rows = [general_row(g, default_language) for g in general]
    ratio = merge_cfg["reasoning_to_general_ratio"]
    if not reasoning:
        # A weak checkpoint (smoke runs) may pass nothing: keep the general rows so that stage 4 still has data;
        # the metrics (accepted 0, dropped_*) and filter_counts.json say what happened.
        log.warning("rejection sampling: no sample passed the filters (%s); the dataset holds general rows only",
                    dict(counts))
        ratio = None
    merged, general_used = merge(reasoning, general_rows, ratio=ratio, max_general=merge_cfg["max_general"],
                                 seed=seed)
    if not merged:
        raise UserError("rejection_sampling: no sample passed the filters and the general SFT set is empty; check "
                        f"{work_dir / 'shards'} and filter_counts, or loosen rejection_sampling.filters")

    output_dir.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(output_dir / "train.jsonl", merged)
    data.write_jsonl(output_dir / "prompt_stats.jsonl", stats)
    data.write_jsonl(output_dir / "rejected_examples.jsonl", [e for r in REASONS for e in examples.get(r, [])])
    drawn = sum(s["drawn"] for s in stats)
    filter_counts = {"drawn": drawn, "accepted": len(reasoning), "dropped": {r: counts.get(r, 0) for r in REASONS}}
    (output_dir / "filter_counts.json").write_text(json.dumps(filter_counts, indent=2) + "\n")
    (output_dir / "schema.json").write_text(json.dumps({"file": "train.jsonl", "columns": SCHEMA,
                                                        "rows": len(merged)}, indent=2) + "\n")

    tokens = gen_stats["gen_tokens"]
    metrics = {
        "backend": backend,
        "prompts": len(rows),
        **decontaminated,
        "samples_drawn": drawn,
        "samples_correct": sum(s["correct"] for s in stats),
        "pass_rate": sum(s["pass_rate"] for s in stats) / len(stats),
        "accepted": len(reasoning),
        "acceptance_rate": len(reasoning) / max(drawn, 1),
        "prompts_with_accepted": sum(s["accepted"] > 0 for s in stats),
        "general_available": len(general_rows),
        "general_used": general_used,
        "rows": len(merged),
        "judge_calls": judge_calls,
        **{f"dropped_{r}": counts.get(r, 0) for r in REASONS},
        **gen_stats,
        **verification_metrics(verified_before),
        "gen_tokens_per_s": round(tokens / gen_stats["gen_seconds"], 1) if gen_stats["gen_seconds"] > 0 else 0.0,
    }
    log.info("rejection sampling: accepted %d of %d samples (%.1f%%), %d general rows, %d rows in train.jsonl",
             len(reasoning), drawn, 100 * metrics["acceptance_rate"], general_used, len(merged))
    return metrics
