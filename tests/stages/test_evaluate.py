"""stages/evaluate.py: pass@1 / cons@k on hand-made sample sets, benchmark loading from local MATH-500 / AIME-style
files, the whole stage on scripted generations (exact numbers, resume), and on a tiny model built with
stages/shared/models.py through HF generate and through ONE real vLLM engine."""

from __future__ import annotations

import contextlib
import json
from functools import partial
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.plan import compose_config
from stages import evaluate
from stages.shared.errors import UserError
from stages.evaluate import Vote, cons_at_k, load_benchmark, majority_vote, pass_at_1, summarize

FIXTURES = Path(__file__).parent / "fixtures"
MATH500 = {"path": str(FIXTURES / "math500_tiny.jsonl"), "columns": {"prompt": "problem", "answer": "answer",
                                                                     "id": "unique_id"}}
AIME24 = {"path": str(FIXTURES / "aime24_tiny.parquet"), "columns": {"prompt": "problem", "answer": "answer"}}
VERIFICATION = OmegaConf.to_container(compose_config([]).verification)
HARDWARE = OmegaConf.to_container(compose_config(["hardware.torch_threads=1",
                                                  "hardware.vllm.cpu_kvcache_space_gib=1"]).hardware)


# ---------------------------------------------------------------------------------------------------------------------
# pass@1 and cons@k on hand-made sample sets


def test_pass_at_1_is_mean_correctness():
    assert pass_at_1([True, False, True, True]) == 0.75
    assert pass_at_1([False] * 8) == 0.0
    assert pass_at_1([True]) == 1.0
    assert pass_at_1([None, True]) == 0.5  # None (gold does not parse) counts as wrong
    assert pass_at_1([]) == 0.0


def test_majority_vote_plain_majority():
    vote = majority_vote(["12", "7", "12", "12", "7"])
    assert vote == Vote("12", 0, 3, 5)
    ok, _ = cons_at_k(["12", "7", "12", "12", "7"], [True, False, True, True, False])
    assert ok


def test_majority_vote_tie_goes_to_the_answer_voted_first():
    assert majority_vote(["4", "3", "4", "3"]) == Vote("4", 0, 2, 4)
    assert majority_vote(["3", "4", "4", "3"]) == Vote("3", 0, 2, 4)
    assert majority_vote([None, "9", "8", "8", "9"]).answer == "9"  # first vote at index 1 beats index 2
    # the tie-break decides correctness: the correct answer was voted second
    ok, vote = cons_at_k(["4", "3", "4", "3"], [False, True, False, True])
    assert not ok and vote.answer == "4"


def test_unparseable_answers_never_win():
    # two unparseable samples outnumber each answer, yet only real answers vote
    ok, vote = cons_at_k([None, "", None, "5", "6", "5"], [False, False, False, True, False, True])
    assert ok and vote == Vote("5", 3, 2, 3)
    ok, vote = cons_at_k([None, "  ", None], [False, False, False])
    assert not ok and vote == Vote(None, None, 0, 0)
    ok, vote = cons_at_k([None, None, "7"], [False, False, False])  # a single vote wins, and is wrong here
    assert not ok and vote.answer == "7" and vote.votes == 1


def test_equal_answers_written_differently_vote_together():
    # the key is the rewards' canonical_answer (tests/stages/shared/test_rewards.py); 0.5 and 1/2 together outvote 3, 3 although "3" alone is the most frequent string
    ok, vote = cons_at_k(["3", "\\frac{1}{2}", "0.5", "3", "1/2"], [False, True, True, False, True])
    assert ok and vote.votes == 3 and vote.answer == "\\frac{1}{2}"


def test_vote_equivalence_merges_symbolic_answers():
    answers = ["1+x", "2", "x+1", "2"]
    assert majority_vote(answers) == Vote("2", 1, 2, 4)
    merged = majority_vote(answers, equivalent=partial(evaluate.answers_equivalent, verification=VERIFICATION))
    assert merged == Vote("1+x", 0, 2, 4)  # 1+x and x+1 merge; tie with "2", voted first
    # a verifier that raises is "not equal", never a crash
    boom = lambda a, b: 1 / 0  # noqa: E731
    assert majority_vote(["a", "b", "b"], equivalent=boom) == Vote("b", 1, 2, 3)


def test_summarize_hand_made_records():
    records = [
        {"correct": [True, False], "cons_correct": True, "formatted": [True, True], "language_consistency": [1.0, 0.5],
         "lengths": [10, 20], "finish_reasons": ["stop", "length"], "answers": ["1", None], "unverified": 0},
        {"correct": [False, False], "cons_correct": False, "formatted": [False, True],
         "language_consistency": [1.0, 1.0], "lengths": [30, 40], "finish_reasons": ["stop", "stop"],
         "answers": [None, None], "unverified": 2},
    ]
    s = summarize(records)
    assert s["pass@1"] == 0.25 and s["cons@k"] == 0.5 and s["format_rate"] == 0.75
    assert s["language_consistency"] == 0.875 and s["mean_length"] == 25.0 and s["truncated_rate"] == 0.25
    assert s["answered_rate"] == 0.25 and s["n_questions"] == 2 and s["n_samples"] == 4
    assert s["unverified_samples"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks from local files in the hub datasets' layout


def test_load_math500_style_jsonl():
    rows = load_benchmark(MATH500, "math500")
    assert len(rows) == 6
    assert rows[0] == {"id": "test/prealgebra/1.json", "prompt": rows[0]["prompt"], "answer": "\\frac{1}{2}",
                       "language": None}
    assert rows[0]["prompt"].startswith("What is $\\frac{1}{4}")
    assert [r["answer"] for r in rows][1] == "5\\sqrt{2}"
    assert len(load_benchmark(MATH500, "math500", max_questions=2)) == 2


def test_load_aime_style_parquet_with_integer_answers():
    rows = load_benchmark(AIME24, "aime24")
    assert [r["answer"] for r in rows] == ["1", "16", "1980"]  # int64 column -> strings
    assert [r["id"] for r in rows] == ["60", "61", "62"]


def test_benchmark_errors_name_the_config_key(tmp_path):
    with pytest.raises(UserError, match=r"data\.benchmarks\.math500"):
        load_benchmark({"path": str(tmp_path / "missing.jsonl")}, "math500")
    with pytest.raises(UserError, match=r"data\.benchmarks\.aime24.*columns"):
        load_benchmark({"path": AIME24["path"], "columns": {"prompt": "question"}}, "aime24")
    with pytest.raises(UserError, match="taken by the held-out split"):
        evaluate.benchmark_specs(OmegaConf.create({"eval_file": "x.jsonl", "benchmarks": {"heldout": "y.jsonl"}}))


# ---------------------------------------------------------------------------------------------------------------------
# The stage on scripted generations: exact numbers


EVAL_ROWS = [
    {"id": "q1", "prompt": "What is 2 + 3?", "answer": "5", "language": "en"},
    {"id": "q2", "prompt": "What is 7 - 4?", "answer": "3", "language": "en"},
    {"id": "q3", "prompt": "What is 6 * 7?", "answer": "42", "language": "en"},
]
SCRIPT = {  # question -> the k=4 completions
    "What is 2 + 3?": ["<think>2+3=5</think> The answer is \\boxed{5}", "<think>2+3=6</think> So \\boxed{6}",
                       "<think>add</think> \\boxed{5.0}", "five"],
    "What is 7 - 4?": ["<think>7-4</think> \\boxed{4}", "<think>7-4</think> \\boxed{3}",
                       "<think>7-4</think> \\boxed{4}", "<think>7-4</think> \\boxed{3}"],
    "What is 6 * 7?": ["Я не знаю"] * 4,
    "Simplify $\\sqrt{50}$.": ["<think>root</think> \\boxed{5\\sqrt{2}}"] * 3 + ["<think>r</think> \\boxed{\\sqrt{50}}"],
    "Find the probability": ["<think>3/6</think> \\boxed{\\frac{1}{2}}", "<think>p</think> \\boxed{0.5}",
                             "<think>p</think> \\boxed{1/3}", "<think>p</think> \\boxed{1/3}"],
    "How many positive divisors": ["<think>2^3*11*23</think> \\boxed{16}"] * 4,
}


class ScriptedGenerator:
    backend = "scripted"

    def __init__(self, log, decode):
        self.log, self.decode = log, decode

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed=None):
        self.log.append({"prompts": len(prompts), "n": n, "temperature": temperature, "top_p": top_p,
                         "max_tokens": max_tokens, "seed": seed})
        out = []
        for p in prompts:
            p = self.decode(p)  # the stage passes token ids, as the engines get them
            texts = next((v for q, v in SCRIPT.items() if q in p), ["<think>?</think> \\boxed{0}"] * n)
            out.append([{"text": texts[j], "num_tokens": 10 + j, "finish_reason": "stop" if j < 3 else "length"}
                        for j in range(n)])
        return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random-init Qwen3 (untied embeddings) and BPE tokenizer built by stages/shared/models.py, saved like a checkpoint
    artifact."""
    import torch

    from stages.shared import models

    out = tmp_path_factory.mktemp("tiny") / "model"
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"prompt": r["prompt"], "messages": [{"role": "assistant", "content": t}]})
             for r in EVAL_ROWS for t in SCRIPT[r["prompt"]]]
    lines += [l for l in (FIXTURES / "math500_tiny.jsonl").read_text().splitlines()]
    corpus.write_text("\n".join(lines) + "\n")
    tok = models.build_tokenizer([str(corpus)], 300)
    torch.manual_seed(0)
    model = models.build_model({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128,
                                "max_position_embeddings": 512}, tok)
    assert not model.config.tie_word_embeddings
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "rl_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    return path


def stage_cfg(eval_file, **over):
    cfg = OmegaConf.to_container(compose_config([]).evaluate)  # every key, then this test's values
    cfg.update({"seed": 0, "hardware": HARDWARE, "eval_file": str(eval_file), "benchmarks": {}, "template": "r1",
           "language": "en", "backend": "auto", "num_samples": 4, "temperature": 0.6, "top_p": 0.95,
           "max_tokens": 12, "max_model_len": None, "max_questions": None, "vote_equivalence": True,
           "shard_questions": 2, "keep_texts": 1, "trust_remote_code": False, "verification": VERIFICATION})
    cfg.update(over)
    return OmegaConf.create(cfg)


@pytest.fixture
def scripted(monkeypatch):
    calls, opened = [], []

    @contextlib.contextmanager
    def fake_open(model, **kwargs):
        from stages.shared import models

        opened.append(kwargs)
        yield ScriptedGenerator(calls, models.load_tokenizer(str(model)).decode)

    monkeypatch.setattr("stages.shared.generation.open_generator", fake_open)
    return calls, opened


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_stage_exact_numbers_on_scripted_generations(tiny_model, eval_file, scripted, tmp_path):
    calls, opened = scripted
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    cfg = stage_cfg(eval_file, benchmarks={"math500": MATH500, "aime24": AIME24})
    metrics = evaluate.run(cfg, {"model": tiny_model}, out, work)

    assert len(opened) == 1 and opened[0]["backend"] == "auto"  # one generator for all benchmarks
    assert all(c["n"] == 4 and c["temperature"] == 0.6 and c["top_p"] == 0.95 and c["max_tokens"] == 12
               for c in calls)
    assert sum(c["prompts"] for c in calls) == 3 + 6 + 3
    records = read_records(out)
    q1, q2, q3 = records[:3]
    assert q1["answers"] == ["5", "6", "5.0", None] and q1["correct"] == [True, False, True, False]
    assert q1["majority"] == "5" and q1["majority_votes"] == 2 and q1["cons_correct"] is True
    assert q1["formatted"] == [True, True, True, False] and q1["lengths"] == [10, 11, 12, 13]
    assert q2["correct"] == [False, True, False, True] and q2["majority"] == "4" and not q2["cons_correct"]
    assert q3["answers"] == [None] * 4 and q3["majority"] is None and not q3["cons_correct"]
    assert q3["language_consistency"] == [0.0] * 4 and q1["language_consistency"] == [1.0] * 4
    assert len(q1["texts"]) == 1 and q1["gold"] == "5" and q1["id"] == "q1"

    summary = json.loads((out / "summary.json").read_text())
    held = summary["benchmarks"]["heldout"]
    assert held["pass@1"] == pytest.approx(1 / 3) and held["cons@k"] == pytest.approx(1 / 3)
    assert held["format_rate"] == pytest.approx(7 / 12) and held["language_consistency"] == pytest.approx(8 / 12)
    assert held["mean_length"] == 11.5 and held["truncated_rate"] == 0.25 and held["n_questions"] == 3
    assert summary["k"] == 4 and summary["backend"] == "scripted" and summary["template"] == "r1"

    # MATH-500-style LaTeX answers verify against their gold; in the probability row \frac{1}{2} and 0.5 vote
    # together and tie with 1/3, 1/3: the answer voted first wins
    math = {r["id"]: r for r in records if r["benchmark"] == "math500"}
    sqrt = math["test/algebra/2.json"]
    assert sqrt["correct"] == [True, True, True, True]  # \sqrt{50} == 5\sqrt{2} too
    prob = math["test/counting_and_probability/5.json"]
    assert prob["correct"] == [True, True, False, False] and prob["majority"] == "\\frac{1}{2}"
    assert prob["cons_correct"] and prob["majority_votes"] == 2
    aime = [r for r in records if r["benchmark"] == "aime24"]
    assert [r["gold"] for r in aime] == ["1", "16", "1980"] and aime[1]["pass@1"] == 1.0

    assert metrics["pass@1"] == held["pass@1"] and metrics["cons@k"] == held["cons@k"]
    assert metrics["k"] == 4 and metrics["backend"] == "scripted" and metrics["n_questions"] == 3
    for bench in ("math500", "aime24"):
        for key in evaluate.METRICS:
            assert metrics[f"{bench}/{key}"] == summary["benchmarks"][bench][key]
    assert metrics["aime24/pass@1"] == pytest.approx(1 / 3)
    json.dumps(metrics, allow_nan=False)  # manifest-safe


def test_stage_resumes_from_work_dir(tiny_model, eval_file, scripted, tmp_path, monkeypatch):
    calls, _ = scripted
    work = tmp_path / "work"
    (tmp_path / "a").mkdir()
    first = evaluate.run(stage_cfg(eval_file), {"model": tiny_model}, tmp_path / "a", work)
    assert len(calls) == 2  # 3 questions in shards of 2

    def no_engine(*a, **k):
        raise AssertionError("a finished evaluation must not start an engine again")

    monkeypatch.setattr("stages.shared.generation.open_generator", no_engine)
    (tmp_path / "b").mkdir()
    again = evaluate.run(stage_cfg(eval_file), {"model": tiny_model}, tmp_path / "b", work)
    assert again == first
    assert (tmp_path / "a" / "records.jsonl").read_text() == (tmp_path / "b" / "records.jsonl").read_text()


def test_stage_r1_zero_template_and_bad_input(tiny_model, eval_file, scripted, tmp_path):
    calls, _ = scripted
    (tmp_path / "o").mkdir()
    metrics = evaluate.run(stage_cfg(eval_file, template="r1_zero", num_samples=2, vote_equivalence=False),
                           {"model": tiny_model}, tmp_path / "o", tmp_path / "w")
    assert metrics["k"] == 2 and metrics["format_rate"] == 0.0  # \boxed summaries are not the <answer> format
    with pytest.raises(UserError, match="role `model`"):
        evaluate.run(stage_cfg(eval_file), {"base": tiny_model}, tmp_path / "o", tmp_path / "w")
    with pytest.raises(UserError, match="unknown prompt template"):
        evaluate.run(stage_cfg(eval_file, template="chatml"), {"model": tiny_model}, tmp_path / "o", tmp_path / "w")


# ---------------------------------------------------------------------------------------------------------------------
# The stage on a real tiny model: HF generate, and one vLLM engine


def check_real_run(out: Path, metrics: dict, backend: str, k: int, max_tokens: int):
    records = read_records(out)
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["backend"] == backend == summary["backend"] and metrics["k"] == k
    assert [r["benchmark"] for r in records] == ["heldout"] * 3 + ["math500"] * 6
    for r in records:
        assert len(r["answers"]) == len(r["correct"]) == len(r["lengths"]) == len(r["formatted"]) == k
        assert all(1 <= n <= max_tokens for n in r["lengths"])
        assert r["pass@1"] == pass_at_1(r["correct"])
    for bench in ("heldout", "math500"):
        recomputed = summarize([r for r in records if r["benchmark"] == bench])
        assert summary["benchmarks"][bench] == recomputed
    assert metrics["math500/n_questions"] == 6 and 0.0 <= metrics["pass@1"] <= 1.0


def test_stage_hf_backend_on_tiny_model(tiny_model, eval_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = stage_cfg(eval_file, backend="hf", num_samples=2, max_tokens=8, benchmarks={"math500": MATH500})
    metrics = evaluate.run(cfg, {"model": tiny_model}, out, tmp_path / "work")
    check_real_run(out, metrics, "hf", 2, 8)


@pytest.mark.vllm
def test_stage_vllm_backend_one_engine_for_all_benchmarks(tiny_model, eval_file, tmp_path, monkeypatch):
    from stages.shared import generation

    if not generation.vllm_available():
        pytest.skip("vLLM is not installed")
    starts = []
    real_init = generation.VLLMGenerator.__init__

    def counting_init(self, *a, **k):
        starts.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(generation.VLLMGenerator, "__init__", counting_init)
    out = tmp_path / "out"
    out.mkdir()
    cfg = stage_cfg(eval_file, backend="vllm", num_samples=2, max_tokens=8, benchmarks={"math500": MATH500})
    metrics = evaluate.run(cfg, {"model": tiny_model}, out, tmp_path / "work")
    assert len(starts) == 1
    check_real_run(out, metrics, "vllm", 2, 8)
