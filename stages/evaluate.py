"""Stage `evaluate` (recipe stages eval_*): the paper's evaluation protocol on one checkpoint.

For every benchmark -- the held-out split `cfg.eval_file` (named `heldout`) and each entry of `cfg.benchmarks`
({name: file entry}, e.g. MATH-500 / AIME 2024 from the hub or a local Parquet/JSONL with `columns`) -- each question
is sampled k = `num_samples` times at `temperature` (0.6) and `top_p` (0.95), prompts rendered with `cfg.template`
(r1: chat template; r1_zero: the paper's plain-text template). One generator (stages/shared/generation.py: vLLM where
installed, else transformers) serves all benchmarks of the stage: one engine start.

Per question, from its k samples:
- correct[j]: a math row's sample against the gold answer (the rewards module's verifier, math-verify); a code row's
  sample (a row with `tests`): its program (the last fenced block of `code_language` in the summary) passes every
  test in the sandbox;
- answers[j]: the extracted final answer (templates.extract_answer: last \\boxed{} after </think>, else <answer>);
  for code, the normalised program (`code_answer`: its AST, so comments and layout do not count);
- pass@1 = mean(correct) (`pass_at_1`); cons@k: majority vote over the extracted answers (`majority_vote`). For code
  that is a vote over identical normalised programs (not over agreeing outputs on the tests): cons@k is correct when
  the program written most often passes every test.

Majority vote, defined so that it is deterministic and testable (`majority_vote`):
1. A sample without an extracted answer (None / empty: unparseable, truncated, no box) casts no vote. A question
   whose k samples are all unparseable has no majority answer and counts as wrong.
2. Answers are grouped by a canonical key (`canonical_answer` of stages/shared/rewards/accuracy.py, the one answer
   normaliser: whitespace, `$`, `\\left`/`\\right`, `\\dfrac`, `\\text{}`, a trailing period removed; numbers --
   integers, decimals, `a/b`, `\\frac{a}{b}` -- reduced to an exact fraction, so `0.5`, `1/2` and `\\frac{1}{2}` are
   one answer). Optionally (`vote_equivalence`, default on) a new
   non-numeric answer also joins the first earlier group whose representative math-verify calls equal.
3. The group with the most votes wins; a tie goes to the group whose first vote came earliest in sample order (sample
   order is fixed by the seed). cons@k is correct iff the winning group's first sample is correct.

A split that mixes math and code rows is also summarised per kind, as benchmarks `<name>-math` and `<name>-code`.

Also: format-compliance rate (the rewards module's format check for the template; for code also exactly one fenced
block of the language in the summary), language consistency (share of
target-language words in the reasoning, per sample, averaged), mean response length in tokens, truncation rate.

Artifact (kind evaluation): `records.jsonl` (one line per question and benchmark: id, question, gold, the k extracted
answers, correct flags, format flags, language scores, lengths, finish reasons, majority answer and votes, cons
correct, the first completion's text) and `summary.json` ({benchmark: metrics}, k, backend, sampling settings).
Returned metrics: the held-out split's `pass@1`, `cons@k`, `format_rate`, `language_consistency`, `mean_length`,
`n_questions`, plus `k` and `backend`, and `<benchmark>/<metric>` for every other benchmark.

Generations are written to work_dir per shard of questions, so a rerun after a crash resumes where it stopped;
prompt i of a benchmark samples with a fixed seed whatever the sharding.
"""

from __future__ import annotations

import hashlib
import logging
import json
import math
import re
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from stages.shared import data, rewards
from stages.shared.errors import UserError
from stages.shared.progress import Progress
from stages.shared.rewards import canonical_answer, verification_metrics, verifier_stats
from stages.shared.rewards.code import code_settings

log = logging.getLogger(__name__)

HELDOUT = "heldout"
RECORDS = "records.jsonl"
SUMMARY = "summary.json"
METRICS = ("pass@1", "cons@k", "format_rate", "language_consistency", "mean_length")


# ---------------------------------------------------------------------------------------------------------------------
# Pure scoring functions


def pass_at_1(correct: Sequence[Any]) -> float:
    """Mean correctness over the k samples of one question (None / False count as wrong); 0.0 for no samples."""
    if not correct:
        return 0.0
    return sum(1 for c in correct if c is True or c == 1) / len(correct)


@dataclass(frozen=True)
class Vote:
    """The majority vote of one question: the winning answer (as first written), the sample index of its first vote,
    its number of votes, and how many samples voted at all."""

    answer: str | None
    index: int | None
    votes: int
    voters: int


def majority_vote(answers: Sequence[Any], equivalent: Callable[[str, str], bool] | None = None) -> Vote:
    """Majority vote over extracted answers (None / empty = no vote); see the module doc for the exact rule.

    `equivalent(a, b)` (optional) merges a new non-numeric answer into the first earlier group whose representative
    it matches; groups are formed in sample order, so the result depends only on the answers and their order.
    """
    groups: list[dict] = []           # {key, rep, first, votes}, in order of first vote
    by_key: dict[str, dict] = {}
    voters = 0
    for i, answer in enumerate(answers):
        key = canonical_answer(answer)
        if key is None:
            continue
        voters += 1
        group = by_key.get(key)
        if group is None and equivalent is not None and not key.startswith("num:"):
            for g in groups:
                try:
                    same = bool(equivalent(g["rep"], str(answer).strip()))
                except Exception:  # noqa: BLE001 -- a verifier failure means "not shown equal"
                    same = False
                if same:
                    group = g
                    break
        if group is None:
            group = {"key": key, "rep": str(answer).strip(), "first": i, "votes": 0}
            groups.append(group)
        by_key[key] = group
        group["votes"] += 1
    if not groups:
        return Vote(None, None, 0, 0)
    best = max(groups, key=lambda g: (g["votes"], -g["first"]))  # most votes; tie -> earliest first vote
    return Vote(best["rep"], best["first"], best["votes"], voters)


def cons_at_k(answers: Sequence[Any], correct: Sequence[Any], equivalent: Callable[[str, str], bool] | None = None
              ) -> tuple[bool, Vote]:
    """(whether the majority answer is correct, the vote). Correctness is that of the winning group's first sample;
    no votes at all is wrong."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    vote = majority_vote(answers, equivalent)
    ok = vote.index is not None and (correct[vote.index] is True or correct[vote.index] == 1)
    return bool(ok), vote


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def summarize(records: Sequence[dict]) -> dict:
    """A benchmark's metrics from its per-question records (the fields `records.jsonl` holds)."""
    samples = [j for r in records for j in range(len(r["correct"]))]
    flat = lambda field: [v for r in records for v in r[field]]  # noqa: E731
    lengths = flat("lengths")
    return {
        "pass@1": _mean([pass_at_1(r["correct"]) for r in records]),
        "cons@k": _mean([1.0 if r["cons_correct"] else 0.0 for r in records]),
        "format_rate": _mean([1.0 if f else 0.0 for f in flat("formatted")]),
        "language_consistency": _mean([float(v) for v in flat("language_consistency")]),
        "mean_length": _mean([float(v) for v in lengths]),
        "truncated_rate": _mean([1.0 if f == "length" else 0.0 for f in flat("finish_reasons")]),
        "answered_rate": _mean([0.0 if a is None else 1.0 for a in flat("answers")]),
        "n_questions": len(records),
        "n_samples": len(samples),
        "unverified_samples": sum(r["unverified"] for r in records),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks


def load_benchmark(spec: Any, name: str, max_questions: int | None = None) -> list[dict]:
    """Rows {id, prompt, answer, language?} (math) or {id, prompt, tests, language?} (code) of a benchmark file entry
    (a path, {path, columns} or {hub, split, columns}); `columns` maps ours (prompt, answer or tests, id) to theirs
    (MATH-500: {prompt: problem, answer: answer})."""
    from stages.shared import data

    tag = f"benchmark_{name}"
    try:
        rows = data.load_task_rows(spec, tag)
    except UserError as e:
        key = "evaluate.eval_file" if name == HELDOUT else f"data.benchmarks.{name}"
        raise UserError(str(e).replace(f"data.files.{tag}", key)) from None
    if max_questions is not None and int(max_questions) > 0:
        rows = rows[: int(max_questions)]
    out = []
    for i, row in enumerate(rows):
        rid = row.get("id", row.get("unique_id"))
        item = {"id": str(rid) if rid is not None else f"{name}-{i}", "prompt": str(row["prompt"])}
        if row.get("tests") is not None:
            item["tests"] = row["tests"]
        else:
            item["answer"] = str(row["answer"]).strip()
        out.append({**item, "language": row.get("language")})
    return out


def benchmark_specs(cfg) -> dict[str, Any]:
    """{name: file entry}: `heldout` (cfg.eval_file, when set) first, then cfg.benchmarks in their order."""
    specs: dict[str, Any] = {}
    if cfg.eval_file:
        specs[HELDOUT] = cfg.eval_file
    for name, spec in cfg.benchmarks.items():
        if name == HELDOUT:
            raise UserError(f"data.benchmarks.{HELDOUT}: the name is taken by the held-out split (evaluate.eval_file); "
                            f"rename the benchmark")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise UserError(f"data.benchmarks.{name}: use letters, digits, '_', '-', '.' in benchmark names")
        specs[str(name)] = spec
    if not specs:
        raise UserError("evaluate: nothing to evaluate: set evaluate.eval_file (data.files.rl_eval) or "
                        "data.benchmarks")
    return specs


# ---------------------------------------------------------------------------------------------------------------------
# Scoring with the rewards module


def code_answer(text: str, code_language: str) -> str | None:
    """The vote of a code sample for cons@k: its program normalised (comments, blank lines and layout do not count:
    rewards.code.program_key), as a short digest; None without a program."""
    from stages.shared.rewards.code import extract_program, program_key

    key = program_key(extract_program(text, code_language))
    return None if key is None else "program:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def score_samples(texts: Sequence[Sequence[str]], rows: Sequence[Mapping], *, template: str,
                  languages: Sequence[str], verification, think_prefilled: bool = False,
                  code: Mapping | None = None) -> list[dict]:
    """For each question (its k sample texts, its row, target language): the extracted answers, correctness, format
    flags and language scores, through the rewards module -- `verify_rows` in the bounded pool set by
    `verification` (math rows: math-verify against the gold answer; code rows: the program passes every test in the
    sandbox, `code` = {sandbox, code_language}; None = it cannot tell: the gold answer is prose or does not parse, or
    the check did not finish: scored wrong and counted as `unverified`), `format_reward` for the template (and for
    code rows `code_format_reward`: one fenced block of the language), `language_consistency_reward` (the reasoning
    part). A code sample's answer is its normalised program (`code_answer`). One batched call each."""
    from stages.shared import templates
    from stages.shared.rewards.code import code_format_reward

    code = dict(code or {})
    code_language = code.get("code_language", "python")
    flat = [t for ts in texts for t in ts]
    flat_rows = [row for ts, row in zip(texts, rows) for _ in ts]
    flat_lang = [lang for ts, lang in zip(texts, languages) for _ in ts]
    verdicts = rewards.verify_rows(flat, flat_rows, verification, **code) if flat else []
    formatted = rewards.format_reward(flat, template=template, think_prefilled=think_prefilled) if flat else []
    code_formatted = code_format_reward(flat, tests=[r.get("tests") for r in flat_rows],
                                        code_language=code_language) if flat else []
    lang = rewards.language_consistency_reward(flat, language=flat_lang) if flat else []
    out, i = [], 0
    for ts, row in zip(texts, rows):
        j = i + len(ts)
        is_code = rewards.row_kind(row) == "code"
        out.append({
            "answers": [(code_answer(t, code_language) if is_code else templates.extract_answer(t)) or None
                        for t in ts],
            "correct": [v is True for v in verdicts[i:j]],
            "formatted": [float(f or 0.0) >= 1.0 and (c is None or c >= 1.0)
                          for f, c in zip(formatted[i:j], code_formatted[i:j])],
            "language_consistency": [float(v) if v is not None and math.isfinite(float(v)) else 0.0
                                     for v in lang[i:j]],
            "unverified": sum(v is None for v in verdicts[i:j]),
        })
        i = j
    return out


def answers_equivalent(a: str, b: str, verification) -> bool:
    """Whether two extracted answers are mathematically equal (the rewards module's verifier, `b` as the gold)."""
    from stages.shared import rewards

    return rewards.verify(f"\\boxed{{{a}}}", b, verification) is True


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def _shard_path(work_dir: Path, bench: str, start: int) -> Path:
    return Path(work_dir) / "generations" / bench / f"{start:06d}.json"


def _read_shard(path: Path, n_prompts: int, k: int) -> dict | None:
    try:
        shard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    samples = shard.get("samples")
    if not isinstance(samples, list) or len(samples) != n_prompts or any(len(s) != k for s in samples):
        return None
    return shard


def run(cfg, inputs: dict, output_dir: Path, work_dir: Path) -> dict:
    from stages.shared import hardware, models, templates

    hardware.setup(cfg)
    if "model" not in inputs:
        raise UserError(f"evaluate needs an input with role `model` (a checkpoint); got roles {sorted(inputs)}")
    template = templates.check_template(cfg.template)
    k = int(cfg.num_samples)
    if k < 1:
        raise UserError(f"evaluate.num_samples={k}: need at least 1 sample per question")
    temperature, top_p, max_tokens = float(cfg.temperature), float(cfg.top_p), int(cfg.max_tokens)
    seed = int(cfg.seed)
    language = str(cfg.language)
    shard_size = max(1, int(cfg.shard_questions))
    benches = {name: load_benchmark(spec, name, cfg.max_questions)
               for name, spec in benchmark_specs(cfg).items()}

    source, revision = models.model_source(inputs["model"])
    trust = bool(cfg.trust_remote_code)
    tokenizer = models.load_tokenizer(source, revision=revision, trust_remote_code=trust)
    # token ids, not text: a template that writes BOS (Llama 3) would get a second one from the engine's tokenizer
    prompts = {name: [templates.prompt_token_ids(r["prompt"], template, tokenizer) for r in rows]
               for name, rows in benches.items()}
    think_prefilled = bool(cfg.think_prefilled) or templates.think_prefilled(tokenizer, template)
    context = models.context_length(source, revision=revision, trust_remote_code=trust)
    max_tokens = models.fit_to_context("evaluate.max_tokens", max_tokens, context,
                                       prompt_tokens=max((len(p) for ps in prompts.values() for p in ps), default=0))

    # Which shards still need generating (a rerun after a crash resumes from work_dir).
    todo = [(name, start) for name, rows in benches.items() for start in range(0, len(rows), shard_size)
            if _read_shard(_shard_path(work_dir, name, start), len(rows[start:start + shard_size]), k) is None]
    backends: set[str] = set()
    t0 = time.time()
    if todo:
        from stages.shared.generation import open_generator

        longest = max((len(p) for ps in prompts.values() for p in ps), default=0)
        max_model_len = cfg.max_model_len or (min(longest + max_tokens, context) if context
                                              else longest + max_tokens)
        planned = sum(len(prompts[name][start:start + shard_size]) for name, start in todo) * k * max_tokens
        with open_generator(source, backend=cfg.backend, hardware=cfg.hardware, seed=seed,
                            max_model_len=max_model_len, revision=revision, trust_remote_code=trust,
                            planned_tokens=planned) as gen:
            log.info(f"evaluate: {len(todo)} shard(s) to generate with {gen.backend} "
                     f"(k={k}, T={temperature}, top_p={top_p}, max_tokens={max_tokens})")
            bar = Progress(sum(len(prompts[name][start:start + shard_size]) for name, start in todo), "generation",
                           "evaluate", unit="question", lines=False)  # a line per shard below
            for name, start in todo:
                batch = prompts[name][start:start + shard_size]
                bench_seed = seed + zlib.crc32(name.encode()) % 1_000_003 * 1000 + start * k
                samples = gen.generate(batch, n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                       seed=bench_seed)
                data.write_json(_shard_path(work_dir, name, start), {"backend": gen.backend, "samples": samples})
                bar.update(len(batch))
                log.info(f"evaluate: {name} questions {start}..{start + len(batch) - 1} done "
                         f"({time.time() - t0:.1f} s)")
            bar.close()
    gen_seconds = time.time() - t0

    verified_before = verifier_stats()
    equivalent = partial(answers_equivalent, verification=cfg.verification) if cfg.vote_equivalence else None
    code = code_settings(cfg)
    keep_texts = int(cfg.keep_texts)
    summary: dict[str, dict] = {}
    with open(Path(output_dir) / RECORDS, "w", encoding="utf-8") as out:
        for name, rows in benches.items():
            records = []
            for start in range(0, len(rows), shard_size):
                shard = _read_shard(_shard_path(work_dir, name, start), len(rows[start:start + shard_size]), k)
                backends.add(shard.get("backend", "unknown"))
                shard_rows = rows[start:start + shard_size]
                langs = [row.get("language") or language for row in shard_rows]
                scored = score_samples([[s["text"] for s in samples] for samples in shard["samples"]],
                                       shard_rows, template=template, languages=langs,
                                       verification=cfg.verification, think_prefilled=think_prefilled, code=code)
                for row, samples, scores, lang in zip(shard_rows, shard["samples"], scored, langs):
                    texts = [s["text"] for s in samples]
                    kind = rewards.row_kind(row)
                    # code votes are normalised programs: identical ones agree, no math equivalence between them
                    cons_ok, vote = cons_at_k(scores["answers"], scores["correct"],
                                              equivalent if kind == "math" else None)
                    record = {
                        "benchmark": name, "kind": kind, "id": row["id"], "question": row["prompt"],
                        "gold": row.get("answer"), "tests": row.get("tests"), "language": lang, **scores,
                        "lengths": [int(s["num_tokens"]) for s in samples],
                        "finish_reasons": [s.get("finish_reason", "stop") for s in samples],
                        "pass@1": pass_at_1(scores["correct"]),
                        "majority": vote.answer, "majority_votes": vote.votes, "voters": vote.voters,
                        "cons_correct": cons_ok, "texts": texts[:keep_texts],
                    }
                    records.append(record)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary[name] = summarize(records)
            kinds = sorted({r["kind"] for r in records})
            if len(kinds) > 1:  # a mixed split: each kind also on its own, so that the report shows code beside math
                summary.update({f"{name}-{kind}": summarize([r for r in records if r["kind"] == kind])
                                for kind in kinds})
            for part in [name] + ([f"{name}-{kind}" for kind in kinds] if len(kinds) > 1 else []):
                s = summary[part]
                log.info(f"evaluate: {part}: pass@1={s['pass@1']:.3f} cons@{k}={s['cons@k']:.3f} "
                         f"format={s['format_rate']:.3f} lang={s['language_consistency']:.3f} "
                         f"len={s['mean_length']:.1f} ({s['n_questions']} questions)")

    backend = "+".join(sorted(backends))
    data.write_json(Path(output_dir) / SUMMARY, {
        "benchmarks": summary, "k": k, "backend": backend, "template": template, "temperature": temperature,
        "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "vote_equivalence": equivalent is not None,
        "model": {"source": source if revision is None else f"{source}@{revision}"},
        "generation_seconds": round(gen_seconds, 2),
    })
    return {**metrics_from_summary(summary, k=k, backend=backend), **verification_metrics(verified_before)}


def metrics_from_summary(summary: dict[str, dict], *, k: int, backend: str) -> dict:
    """The stage's returned metrics: the held-out split unprefixed (or the first benchmark when there is no held-out
    split), every other benchmark as `<name>/<metric>`."""
    metrics: dict[str, Any] = {"k": k, "backend": backend}
    primary = HELDOUT if HELDOUT in summary else next(iter(summary))
    for name, s in summary.items():
        prefix = "" if name == primary else f"{name}/"
        for key in (*METRICS, "n_questions"):
            metrics[prefix + key] = s[key]
    return metrics
