"""stages/rejection_sampling.py: each filter on hand-made responses, the merge, the judge, shard resume, the stage end
to end with a scripted generator, and the HF fallback on a tiny random model. The real vLLM run is in
tiny_models.py (one engine per session)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.plan import compose_config
from stages import rejection_sampling as rs
from stages.shared import judge
from stages.shared.rewards import repetition_score

GOOD = "<think>\nWe need 7+8.\nUnits 7+8=15 write 5 carry 1\nSo 7+8=15\n</think>\nThe answer is \\boxed{15}"
GOOD2 = "<think>\n7 plus 8 makes 15\n</think>\nThe answer is \\boxed{15}"
FILTERS = dict(correctness=True, judge_model=None, format=True, language_consistency_min=0.95,
               max_paragraph_chars=600, code_blocks=True, max_repeated_ngram_share=0.5, truncation=True, dedup=True,
               max_accepted_per_prompt=2)


def s(text, finish="stop"):
    return {"text": text, "num_tokens": len(text.split()), "finish_reason": finish}


def reason(text, *, verdict=True, finish="stop", language="en", code_language=None, **overrides):
    return rs.sample_reason(s(text, finish), {**FILTERS, **overrides}, verdict=verdict, language=language,
                            code_language=code_language)


# ---- filters: kept and dropped ----

def test_good_response_is_kept():
    assert reason(GOOD) is None
    assert reason(GOOD2) is None


def test_truncation():
    assert reason(GOOD, finish="length") == "truncated"
    assert reason(GOOD, finish="length", truncation=False) is None


@pytest.mark.parametrize("text", [
    "We need 7+8. The answer is \\boxed{15}",                       # no think block
    "<think>\n7+8=15\n</think>\n",                                  # no summary
    "<think>\n\n</think>\nThe answer is \\boxed{15}",               # empty reasoning
    "<think>\n7+8=15\n</think><think>again</think>\n\\boxed{15}",   # two think blocks
    "<think>\n7+8=15 and the model never stops thinking",           # unclosed
])
def test_format(text):
    assert reason(text) == "format"
    assert reason(text, format=False) in (None, "language", "repetition")


def test_format_with_think_prefilled_by_the_prompt():
    text = GOOD[len("<think>"):]
    assert rs.sample_reason(s(text), FILTERS, verdict=True, language="en", think_prefilled=True) is None
    assert rs.sample_reason(s(text), FILTERS, verdict=True, language="en") == "format"


def test_correctness_uses_the_rule_verifier():
    verification = compose_config([]).verification
    rows = [{"answer": "15"}, {"answer": "16"}, {"answer": "15"}, {"answer": ""}, {"answer": "fifteen apples"}]
    assert rs.correctness_verdicts([GOOD, GOOD, "no answer here", GOOD, GOOD], rows, verification, {}) == \
        [True, False, False, None, None]
    assert reason(GOOD, verdict=False) == "incorrect"
    assert reason(GOOD, verdict=None) == "unverifiable"
    assert reason(GOOD, verdict=False, correctness=False) is None


def test_language_mixing():
    mixed = "<think>\nСложим единицы 7+8=15 пишем 5 carry 1\n</think>\nThe answer is \\boxed{15}"
    assert reason(mixed) == "language"
    assert reason(mixed, language="ru") == "language"            # English words in Russian reasoning
    assert reason(mixed, language_consistency_min=None) is None
    assert reason(mixed, language_consistency_min=0.2) is None     # 1 Latin word of 4
    ru = "<think>\nСложим единицы 7+8=15 пишем 5\n</think>\nОтвет: \\boxed{15}"
    assert reason(ru, language="ru") is None


def test_long_paragraphs():
    long = "<think>\n" + "step " * 200 + "\n</think>\nThe answer is \\boxed{15}"
    split = "<think>\n" + ("step " * 50 + "\n\n") * 4 + "</think>\nThe answer is \\boxed{15}"
    assert reason(long, max_repeated_ngram_share=None) == "long_paragraph"
    assert reason(split, max_repeated_ngram_share=None) is None
    assert reason(long, max_repeated_ngram_share=None, max_paragraph_chars=None) is None
    assert rs.has_long_paragraph("a\n\n" + "b" * 11, 10) and not rs.has_long_paragraph("a\n\nbbbbbbbbbb", 10)


def test_code_blocks_in_the_reasoning_only():
    code = "<think>\n```python\nprint(7+8)\n```\n</think>\nThe answer is \\boxed{15}"
    assert reason(code) == "code_block"
    assert reason(code, code_blocks=False) is None
    program = "<think>\nx plus 7 is x + 7.\n</think>\nHere is the function:\n```python\ndef f(x):\n    return x + 7\n```"
    assert reason(program, code_language="python") is None      # a code answer's program sits in the summary
    in_reasoning = "<think>\n```python\nx + 7\n```\n</think>\n" + program.split("</think>\n")[1]
    assert reason(in_reasoning, code_language="python") == "code_block"


def test_code_answers_need_one_block_of_the_language():
    one = "<think>\nx plus 7\n</think>\n```python\ndef f(x):\n    return x + 7\n```"
    assert reason(one, code_language="python") is None
    assert reason(one.replace("```python", "```js"), code_language="python") == "format"
    assert reason(one + "\n```python\nf(1)\n```", code_language="python") == "format"
    assert reason("<think>\nx plus 7\n</think>\nx + 7", code_language="python") == "format"


def test_repetition():
    loop = "<think>\n" + "7+8=15 so the answer " * 20 + "\n</think>\nThe answer is \\boxed{15}"
    assert repetition_score(rs.split_reasoning(loop)[0], ngram_size=4) > 0.5  # the guards' metric, on 4-grams
    assert reason(loop) == "repetition"
    assert reason(GOOD.replace("We need", "WE NEED we need")) is None
    assert reason(loop, max_repeated_ngram_share=None) is None


def test_dedup_and_cap_per_prompt():
    row = {"id": "p0", "prompt": "7+8?", "answer": "15", "language": "en"}
    samples = [s(GOOD), s(GOOD.replace("\n", "\n ")), s("bad"), s(GOOD2), s(GOOD2 + " ")]
    third = GOOD2.replace("7 plus 8", "seven and eight")
    samples.append(s(third))
    verdicts = [True, True, False, True, True, True]
    accepted, reasons = rs.filter_prompt(row, samples, FILTERS, verdicts=verdicts)
    assert accepted == [0, 3]
    assert reasons == [None, "duplicate", "format", None, "duplicate", "cap"]
    accepted, reasons = rs.filter_prompt(row, samples, {**FILTERS, "dedup": False, "max_accepted_per_prompt": None},
                                         verdicts=verdicts)
    assert accepted == [0, 1, 3, 4, 5]


def test_canonical_response_matches_the_cold_start_format():
    assert rs.canonical_response(GOOD) == GOOD
    assert rs.canonical_response("7+8=15 </think> \\boxed{15}") == "<think>\n7+8=15\n</think>\n\\boxed{15}"


# ---- merge ----

def _reasoning(k):
    return [{"kind": "reasoning", "prompt_id": f"r{i}"} for i in range(k)]


def _general(k):
    return [{"kind": "general", "prompt_id": f"g{i}"} for i in range(k)]


def test_merge_ratio_and_seed():
    rows, used = rs.merge(_reasoning(30), _general(20), ratio=3.0, max_general=None, seed=1)
    assert used == 10 and len(rows) == 40
    assert sum(r["kind"] == "reasoning" for r in rows) == 30
    again, _ = rs.merge(_reasoning(30), _general(20), ratio=3.0, max_general=None, seed=1)
    other, _ = rs.merge(_reasoning(30), _general(20), ratio=3.0, max_general=None, seed=2)
    assert rows == again and rows != other
    assert [r["kind"] for r in rows[:10]] != ["reasoning"] * 10  # shuffled, not concatenated


def test_merge_limits():
    assert rs.merge(_reasoning(300), _general(20), ratio=3.0, max_general=None, seed=0)[1] == 20  # no upsampling
    assert rs.merge(_reasoning(30), _general(20), ratio=3.0, max_general=4, seed=0)[1] == 4
    assert rs.merge(_reasoning(30), _general(20), ratio=None, max_general=None, seed=0)[1] == 20
    assert rs.merge(_reasoning(0), _general(20), ratio=3.0, max_general=None, seed=0) == ([], 0)


# ---- judge ----

class ScriptedGenerator:
    """Answers each prompt with `respond(prompt, j)` for its j-th sample; records the prompts it was asked."""

    def __init__(self, respond, backend="scripted", fail_after_calls=None):
        self.respond, self.backend, self.fail_after_calls = respond, backend, fail_after_calls
        self.calls: list[list[str]] = []
        self.tokens_generated, self.seconds, self.startup_seconds = 0, 0.01, 0.0

    def generate(self, prompts, *, n=1, temperature=1.0, top_p=1.0, max_tokens=64, seed=None):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        # the stage passes token ids (one BOS, as the engines get them): the script reads them back as text
        prompts = [p if isinstance(p, str) else self.decode(p) for p in prompts]
        self.calls.append(list(prompts))
        out = [[s(self.respond(p, j)) for j in range(n)] for p in prompts]
        self.tokens_generated += sum(x["num_tokens"] for o in out for x in o)
        return out


def test_judge_verdicts():
    assert judge.parse_verdict("Yes.") is True and judge.parse_verdict(" no, it differs") is False
    assert judge.parse_verdict("maybe") is None
    judge_gen = ScriptedGenerator(lambda p, j: "yes" if "Paris" in p.split("Response:")[1] else "no")
    assert judge.judge_verdicts(judge_gen, [("Paris", "It is Paris."), ("Paris", "Lyon")]) == [True, False]
    assert "Reference answer: Paris" in judge_gen.calls[0][0]


# ---- shards: resume ----

def _rows(k):
    return [{"id": f"p{i}", "prompt": f"{i}+1?", "answer": str(i + 1), "language": "en"} for i in range(k)]


def test_shards_resume_after_a_crash(tmp_path):
    rows = _rows(10)
    prompts = [r["prompt"] for r in rows]
    kw = dict(shard_size=3, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=0)
    crashing = ScriptedGenerator(lambda p, j: f"{p} sample {j}", fail_after_calls=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rs.generate_shards(crashing, rows, prompts, tmp_path, **kw)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000.jsonl", "shard-00001.jsonl"]

    gen = ScriptedGenerator(lambda p, j: f"{p} sample {j}")
    out, counts = rs.generate_shards(gen, rows, prompts, tmp_path, **kw)
    assert gen.calls == [prompts[6:9], prompts[9:10]]         # only the unfinished shards
    assert counts == {"shards_total": 4, "shards_resumed": 2, "shards_generated": 2}
    assert [r["prompt_id"] for r in out] == [r["id"] for r in rows]
    assert out[7]["samples"][1]["text"] == "7+1? sample 1"

    # a damaged shard (half-written by hand) and one holding other prompts are regenerated; no temp files left
    (tmp_path / "shards" / "shard-00001.jsonl").write_text('{"prompt_id": "p3", "samp')
    (tmp_path / "shards" / "shard-00003.jsonl").write_text(json.dumps({"prompt_id": "zzz", "samples": []}) + "\n")
    gen = ScriptedGenerator(lambda p, j: f"{p} again {j}")
    out, counts = rs.generate_shards(gen, rows, prompts, tmp_path, **kw)
    assert gen.calls == [prompts[3:6], prompts[9:10]] and counts["shards_resumed"] == 2
    assert not [p for p in (tmp_path / "shards").iterdir() if ".tmp" in p.name]


# ---- the stage end to end ----

def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, rows, general, **over):
    cfg = OmegaConf.to_container(compose_config([]).rejection_sampling)
    cfg.update(seed=0, hardware=OmegaConf.to_container(compose_config(["hardware.torch_threads=1"]).hardware),
               language="en", template="r1_zero",
               trust_remote_code=False, verification=OmegaConf.to_container(compose_config([]).verification),
               prompts_file=_write_jsonl(tmp_path / "rl.jsonl", rows),
               general_sft_file=_write_jsonl(tmp_path / "gen.jsonl", general),
               max_prompts=None, samples_per_prompt=4, shard_size=2, max_tokens=16)
    for k, v in over.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return OmegaConf.create(cfg)


def _general_rows(k):
    return [{"id": f"g{i}", "kind": "general", "category": "greeting", "language": "en",
             "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": f"Hi {i}!"}]}
            for i in range(k)]


def _scripted_answer(prompt, j):
    # r1_zero prompts end with "User: {q}. Assistant:"; q = "{i}+1?" and the gold answer is i+1
    i = int(prompt.rsplit("User: ", 1)[1].split("+")[0])
    if j == 0:
        return f"<think> {i} plus 1 is {i + 1} </think> <answer> {i + 1} </answer>"
    if j == 1:
        return f"<think> {i} plus 1 is {i + 1} </think> <answer> {i + 1} </answer>"  # duplicate
    if j == 2:
        return f"<think> {i} plus one </think> <answer> {i + 2} </answer>"  # wrong
    return f"<think> {i} and 1"  # truncated/unformatted


@pytest.fixture
def model_dir(tmp_path):
    from tiny_models import make_tiny_model  # tests/stages is on sys.path (no __init__.py)

    return make_tiny_model(tmp_path / "model")


def _patch_generator(monkeypatch, make):
    import stages.shared.generation

    created = []

    @contextlib.contextmanager
    def fake_open(model, **kw):
        from stages.shared import models

        gen = make(str(model), kw)
        tokenizer = models.load_tokenizer(str(model))
        gen.decode = tokenizer.decode if tokenizer is not None else None  # the judge gets text prompts
        created.append((str(model), kw, gen))
        yield gen

    monkeypatch.setattr(stages.shared.generation, "open_generator", fake_open)
    return created


def test_stage_filters_merges_and_writes_the_artifact(tmp_path, monkeypatch, model_dir):
    created = _patch_generator(monkeypatch, lambda m, kw: ScriptedGenerator(_scripted_answer))
    rows = _rows(6)
    cfg = _cfg(tmp_path, rows, _general_rows(10), merge={"reasoning_to_general_ratio": 3.0})
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    metrics = rs.run(cfg, {"model": model_dir}, out, work)

    assert created[0][0] == str(model_dir) and created[0][1]["backend"] == "auto"
    assert metrics["backend"] == "scripted"
    assert metrics["prompts"] == 6 and metrics["samples_drawn"] == 24
    assert metrics["accepted"] == 6 and metrics["acceptance_rate"] == pytest.approx(0.25)
    assert metrics["dropped_duplicate"] == 6 and metrics["dropped_incorrect"] == 6 and metrics["dropped_format"] == 6
    assert metrics["general_used"] == 2 and metrics["rows"] == 8
    assert metrics["pass_rate"] == pytest.approx(0.5) and metrics["shards_total"] == 3
    for key, value in metrics.items():
        assert isinstance(value, (str, int, float)), key

    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    reasoning = [r for r in train if r["kind"] == "reasoning"]
    assert len(reasoning) == 6 and sum(r["kind"] == "general" for r in train) == 2
    r0 = next(r for r in reasoning if r["prompt_id"] == "p0")
    response = "<think>\n0 plus 1 is 1\n</think>\n<answer> 1 </answer>"
    assert r0["messages"] == [{"role": "user", "content": "0+1?"}, {"role": "assistant", "content": response}]
    assert r0["answer"] == "1" and r0["language"] == "en"
    assert set(json.loads((out / "schema.json").read_text())["columns"]) == set(train[0])
    stats = [json.loads(x) for x in (out / "prompt_stats.jsonl").read_text().splitlines()]
    assert stats[0] == {"prompt_id": "p0", "drawn": 4, "correct": 2, "accepted": 1, "pass_rate": 0.5}
    counts = json.loads((out / "filter_counts.json").read_text())
    assert counts["drawn"] == 24 and counts["accepted"] == 6 and counts["dropped"]["format"] == 6
    assert sum(counts["dropped"].values()) + counts["accepted"] == counts["drawn"]
    assert (out / "rejected_examples.jsonl").exists()

    # a rerun resumes every shard and generates nothing
    out2 = tmp_path / "out2"
    out2.mkdir()
    again = rs.run(cfg, {"model": model_dir}, out2, work)
    assert created[-1][2].calls == [] and again["shards_resumed"] == 3
    assert (out2 / "train.jsonl").read_text() == (out / "train.jsonl").read_text()


def test_stage_judge_decides_what_rules_cannot(tmp_path, monkeypatch, model_dir):
    judge_answers = []

    def make(model, kw):
        if model == "my-judge":
            judge_answers.append(1)
            return ScriptedGenerator(lambda p, j: "yes" if "Response: <answer> 1 </answer>" in p else "no")
        return ScriptedGenerator(_scripted_answer)

    _patch_generator(monkeypatch, make)
    monkeypatch.setattr(rs, "correctness_verdicts", lambda texts, rows, verification, code: [None] * len(texts))
    from stages.shared import models

    load = models.load_tokenizer  # the judge "my-judge" has no tokenizer to load; the sampled model has its own
    monkeypatch.setattr("stages.shared.models.load_tokenizer",
                        lambda source, **k: None if source == "my-judge" else load(source, **k))
    cfg = _cfg(tmp_path, _rows(2), _general_rows(4), filters={"judge_model": "my-judge"})
    out = tmp_path / "out"
    out.mkdir()
    metrics = rs.run(cfg, {"model": model_dir}, out, tmp_path / "work")
    assert judge_answers == [1]
    assert metrics["judge_calls"] == 8                  # every sample: the (patched) rules check none
    assert metrics["accepted"] == 1 and metrics["dropped_incorrect"] >= 1


def test_stage_no_accepted_samples_keeps_general_rows(tmp_path, monkeypatch, model_dir):
    _patch_generator(monkeypatch, lambda m, kw: ScriptedGenerator(lambda p, j: "gibberish"))
    cfg = _cfg(tmp_path, _rows(2), _general_rows(5))
    out = tmp_path / "out"
    out.mkdir()
    metrics = rs.run(cfg, {"model": model_dir}, out, tmp_path / "work")
    assert metrics["accepted"] == 0 and metrics["rows"] == 5 and metrics["dropped_format"] == 8


def test_stage_hf_fallback_on_a_tiny_model(tmp_path, model_dir):
    """The real HF generate path (backend=hf) through the stage: a random model's text fails the filters, but the
    stage runs, records the backend and writes its files."""
    cfg = _cfg(tmp_path, _rows(3), _general_rows(3), backend="hf", template="r1", samples_per_prompt=2)
    out = tmp_path / "out"
    out.mkdir()
    metrics = rs.run(cfg, {"model": model_dir}, out, tmp_path / "work")
    assert metrics["backend"] == "hf" and metrics["samples_drawn"] == 6 and metrics["gen_tokens"] > 0
    assert sum(metrics[f"dropped_{r}"] for r in rs.REASONS) + metrics["accepted"] == 6
    assert (out / "train.jsonl").exists() and (tmp_path / "work" / "shards" / "shard-00001.jsonl").exists()
