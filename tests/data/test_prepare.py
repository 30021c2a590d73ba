"""The embedded task world: data/arith/prepare.py and the committed files it writes."""
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "arith"
FILES = ["rl_train", "rl_eval", "pretrain", "cold_start", "general_sft", "general_prompts", "pref_helpfulness",
         "pref_harmlessness"]
SMALL = ["--rl-train", "300", "--rl-eval", "50", "--cold-start", "100", "--pretrain", "400", "--general-sft", "60",
         "--general-prompts", "40", "--pref-train", "60", "--pref-eval", "20"]
CYRILLIC = re.compile("[а-яё]", re.IGNORECASE)
LATIN = re.compile("[a-z]", re.IGNORECASE)


def _load_prepare():
    spec = importlib.util.spec_from_file_location("arith_prepare", DATA / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare = _load_prepare()


def rows(name):
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def world():
    return {name: rows(name) for name in FILES}


def numbers_key(prompt, answer):
    """The overlap key the generator promises: sorted operands plus result."""
    return (*sorted(int(n) for n in re.findall(r"\d+", prompt)), int(answer))


def norm(q):
    return re.sub(r"\s+", " ", q.strip().lower())


# --- determinism --------------------------------------------------------------------------------------------------
def _bytes(d):
    return {f: (d / f"{f}.jsonl").read_bytes() for f in FILES}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare.main(["--seed", "0", "--out", str(a), *SMALL])
    prepare.main(["--seed", "0", "--out", str(b), *SMALL])
    prepare.main(["--seed", "1", "--out", str(c), *SMALL])
    ba, bb, bc = _bytes(a), _bytes(b), _bytes(c)
    assert ba == bb
    for f in FILES:
        assert ba[f] != bc[f], f"{f} does not depend on the seed"


def test_committed_files_are_current(tmp_path):
    prepare.main(["--out", str(tmp_path)])
    fresh, committed = _bytes(tmp_path), _bytes(DATA)
    stale = [f for f in FILES if fresh[f] != committed[f]]
    assert not stale, f"run `python data/arith/prepare.py` and commit: {stale} are stale"
    assert sum(len(v) for v in committed.values()) < 3.3e6


# --- schemas ------------------------------------------------------------------------------------------------------
SCHEMAS = {
    "rl_train": {"id": str, "prompt": str, "answer": str, "language": str, "difficulty": int, "kind": str},
    "rl_eval": {"id": str, "prompt": str, "answer": str, "language": str, "difficulty": int, "kind": str},
    "pretrain": {"text": str},
    "cold_start": {"id": str, "prompt": str, "answer": str, "language": str, "messages": list},
    "general_sft": {"id": str, "kind": str, "category": str, "language": str, "messages": list},
    "general_prompts": {"id": str, "prompt": str, "kind": str, "category": str, "language": str},
    "pref_helpfulness": {"id": str, "prompt": str, "chosen": str, "rejected": str, "split": str, "issue": str},
    "pref_harmlessness": {"id": str, "prompt": str, "chosen": str, "rejected": str, "split": str, "issue": str},
}
SIZES = {"rl_train": 5000, "rl_eval": 200, "cold_start": 2000, "pref_helpfulness": 700, "pref_harmlessness": 700}


@pytest.mark.parametrize("name", FILES)
def test_schema(world, name):
    data = world[name]
    assert len(data) == SIZES.get(name, len(data)) and len(data) > 0
    for r in data:
        for field, typ in SCHEMAS[name].items():
            assert isinstance(r.get(field), typ), (name, field, r)
        if "language" in r:
            assert r["language"] in ("en", "ru")
        if "messages" in r:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"][:1])
    if "id" in SCHEMAS[name]:
        assert len({r["id"] for r in data}) == len(data)


def test_rl_rows(world):
    for r in world["rl_train"] + world["rl_eval"]:
        assert r["kind"] == "reasoning" and 1 <= r["difficulty"] <= 5
        assert re.fullmatch(r"\d+", r["answer"])
        m = re.search(r"(\d+) ([-+*]) (\d+)(?: ([-+*]) (\d+))?", r["prompt"])
        if m:  # plain arithmetic: the stored answer is the expression's value
            assert eval(m.group(0)) == int(r["answer"]), r  # noqa: S307 -- digits and + - * only
    assert Counter(r["difficulty"] for r in world["rl_train"]).keys() >= {1, 2, 3, 4, 5}


def test_no_train_eval_overlap(world):
    ev = world["rl_eval"]
    ev_q = {norm(r["prompt"]) for r in ev}
    ev_k = {numbers_key(r["prompt"], r["answer"]) for r in ev}
    for name in ("rl_train", "cold_start"):
        for r in world[name]:
            assert norm(r["prompt"]) not in ev_q, (name, r)
            assert numbers_key(r["prompt"], r["answer"]) not in ev_k, (name, r)
    train_k = [numbers_key(r["prompt"], r["answer"]) for r in world["rl_train"]]
    assert len(set(train_k)) == len(train_k)


@pytest.mark.parametrize("name", ["rl_train", "rl_eval", "cold_start"])
def test_language_share(world, name):
    data = world[name]
    share = sum(r["language"] == "ru" for r in data) / len(data)
    assert 0.06 <= share <= 0.16, share
    for r in data:
        assert bool(CYRILLIC.search(r["prompt"])) == (r["language"] == "ru"), r


# --- pre-training corpus ------------------------------------------------------------------------------------------
PLAIN = re.compile(r"(?:Question|Вопрос): (.*) (?:Answer|Ответ): (.+)")
WORKED = re.compile(r"(?:Question|Вопрос): (.*) (?:Solution|Решение): (.+)\. (?:Answer|Ответ): (\d+)")
TEMPLATE = re.escape(prepare.R1_ZERO_TEMPLATE).replace(r"\{prompt\}", "(.*)")
TAGGED = re.compile(TEMPLATE + r" <think> (.+) </think> <answer> (\d+) </answer>")
TEMPLATE_BARE = re.compile(TEMPLATE + r" (?:The answer is|Ответ:) (\d+)\.")


def test_template_is_the_canonical_text():
    assert prepare.R1_ZERO_TEMPLATE.startswith("A conversation between User and Assistant. The user asks a question,")
    assert prepare.R1_ZERO_TEMPLATE.endswith("<answer> answer here </answer>. User: {prompt}. Assistant:")
    templates = pytest.importorskip("stages.shared.templates")
    if hasattr(templates, "R1_ZERO_TEMPLATE"):
        assert templates.R1_ZERO_TEMPLATE == prepare.R1_ZERO_TEMPLATE


def _so(prompt):
    return "итак" if CYRILLIC.search(prompt) else "so"


def test_pretrain_lines(world):
    """Every line is one of the five kinds, in the shares the defaults promise; no eval question leaks in."""
    texts = [r["text"] for r in world["pretrain"]]
    questions, kinds = [], Counter()
    for t in texts:
        if m := TAGGED.fullmatch(t):
            kinds["tagged"] += 1
            prompt, reasoning, answer = m.groups()
            assert "<think>" not in reasoning and reasoning.endswith(f", {_so(prompt)} {answer}"), t
            assert bool(CYRILLIC.search(reasoning)) == bool(CYRILLIC.search(prompt)), t  # reasoning in its language
        elif m := TEMPLATE_BARE.fullmatch(t):
            kinds["template_bare"] += 1
            prompt = m.group(1)
        elif m := WORKED.fullmatch(t):
            kinds["worked"] += 1
            prompt, reasoning, answer = m.groups()
            assert reasoning.endswith(f", {_so(prompt)} {answer}"), t
        else:
            m = PLAIN.fullmatch(t)
            assert m, t
            kinds["plain"] += 1
            prompt = m.group(1)
        questions.append(prompt)
    share = {k: v / len(texts) for k, v in kinds.items()}
    assert 0.01 <= share["tagged"] <= 0.03 and 0.08 <= share["template_bare"] <= 0.12, share
    assert 0.42 <= share["worked"] <= 0.48, share
    ev = {norm(r["prompt"]) for r in world["rl_eval"]}
    assert not [q for q in questions if norm(q) in ev]


def test_pretrain_shares_are_arguments(tmp_path):
    prepare.main(["--out", str(tmp_path), *SMALL, "--tagged-share", "0.5", "--template-bare-share", "0",
                  "--worked-share", "0.2"])
    with open(tmp_path / "pretrain.jsonl", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    assert 0.4 < sum(bool(TAGGED.fullmatch(t)) for t in texts) / len(texts) < 0.6
    assert not any(TEMPLATE_BARE.fullmatch(t) for t in texts)
    assert 0.12 < sum(bool(WORKED.fullmatch(t)) for t in texts) / len(texts) < 0.28
    with pytest.raises(SystemExit):
        prepare.main(["--out", str(tmp_path), *SMALL, "--worked-share", "0.9"])


def test_worked_reasoning_examples():
    w = prepare.WORDS["en"]
    assert prepare.add_steps(47, 38, w) == ["7+8=15 write 5 carry 1", "4+3+1=8"]
    assert prepare.sub_steps(103, 47, w) == ["13-7=6 write 6 borrow 1", "10-1-4=5 write 5 borrow 1", "1-1-0=0 write 0"]
    assert prepare.mul_steps(7, 34, w) == ["4*7=28 write 8 carry 2", "3*7+2=23"]
    p = {"op": "add", "nums": (47, 38), "answer": 85, "language": "en", "word": False}
    assert prepare.short_reasoning(p) == "7+8=15 write 5 carry 1, 4+3+1=8, so 85"


# --- cold start ---------------------------------------------------------------------------------------------------
def test_cold_start(world):
    ev = {norm(r["prompt"]) for r in world["rl_eval"]}
    for r in world["cold_start"]:
        user, asst = r["messages"]
        assert user["content"] == r["prompt"] and norm(r["prompt"]) not in ev
        text = asst["content"]
        assert text.count("<think>") == 1 and text.count("</think>") == 1 and text.startswith("<think>\n")
        think, summary = text[len("<think>\n"):].split("\n</think>\n")
        boxed = re.findall(r"\\boxed\{([^}]*)\}", summary)
        assert boxed == [r["answer"]] and summary.endswith(f"\\boxed{{{r['answer']}}}"), text
        assert "\\boxed" not in think and think.strip()
        # readable and single-language: never mixed (mixed examples live only in preference negatives)
        if r["language"] == "en":
            assert not CYRILLIC.search(text), text
        else:
            assert not LATIN.search(think), text



def test_cold_start_mixes_brief_and_worked_thinking(world):
    """Half think briefly (the result only), half write every column; both end with the same summary."""
    rows = world["cold_start"]
    brief = [r for r in rows if r["brief"]]
    assert 0.45 <= len(brief) / len(rows) <= 0.55
    for r in rows:
        think = r["messages"][1]["content"].split("\n</think>\n")[0]
        lines = think.split("\n")[1:]
        final = lines[-1]
        assert final.endswith(f"={r['answer']}") and final.startswith(("So ", "Итак, ")), think
        steps = [ln for ln in lines[:-1] if not ln.startswith(("We need", "Нужно найти"))]
        assert (steps == []) == r["brief"], think


# --- general and preference data ----------------------------------------------------------------------------------
def test_general_sft(world):
    cats = Counter(r["category"] for r in world["general_sft"])
    assert cats.keys() >= {"greeting", "factual_qa", "writing", "translation", "self_cognition"}
    for r in world["general_sft"]:
        assert r["kind"] == "general"
        reply = r["messages"][1]["content"]
        if r["category"] == "greeting":
            assert "<think>" not in reply
        assert reply.count("<think>") == reply.count("</think>") <= 1
    assert any("<think>" in r["messages"][1]["content"] for r in world["general_sft"])
    assert any(r["language"] == "ru" for r in world["general_sft"])
    prompts = world["general_prompts"]
    assert all(r["kind"] == "general" and "answer" not in r for r in prompts)
    assert {"unsafe", "greeting"} <= {r["category"] for r in prompts}


@pytest.mark.parametrize("name", ["pref_helpfulness", "pref_harmlessness"])
def test_preference_pairs(world, name):
    data = world[name]
    assert Counter(r["split"] for r in data) == {"train": 600, "eval": 100}
    train = {r["prompt"] for r in data if r["split"] == "train"}
    assert not train & {r["prompt"] for r in data if r["split"] == "eval"}
    assert all(r["chosen"] != r["rejected"] and r["chosen"].strip() for r in data)
    assert any(r["chosen"].startswith("<think>\n") for r in data)
    assert any(r["language"] == "ru" for r in data)
    mixed = [r for r in data if "mixed_language" in r["issue"]]
    assert mixed and all(CYRILLIC.search(r["rejected"]) and LATIN.search(r["rejected"]) for r in mixed)


def test_harmlessness_pairs(world):
    for r in world["pref_harmlessness"]:
        assert "[HARMFUL" in r["rejected"] and "[HARMFUL" not in r["chosen"], r
    issues = Counter(r["issue"] for r in world["pref_harmlessness"])
    assert issues["harmful_reasoning"] > 0 and issues["complies"] > 0  # harm inside <think> needs whole-response RMs
    for r in world["pref_harmlessness"]:
        if r["issue"] == "harmful_reasoning":
            assert "[HARMFUL" in r["rejected"].split("</think>")[0] and "[HARMFUL" not in r["rejected"].split("</think>")[1]


def test_helpfulness_issues(world):
    issues = Counter(r["issue"] for r in world["pref_helpfulness"])
    assert issues.keys() >= {"empty", "unhelpful", "off_topic", "wrong", "mixed_language"}
    for r in world["pref_helpfulness"]:
        if r["issue"] == "wrong":
            assert re.findall(r"\\boxed\{(\d+)\}", r["chosen"]) != re.findall(r"\\boxed\{(\d+)\}", r["rejected"])
