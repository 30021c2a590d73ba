"""The embedded code world: data/code/prepare.py and the committed files it writes."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from stages.shared.sandbox import Sandbox, parse_tests, run_tests

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "code"
FILES = ["rl_train", "rl_eval", "cold_start", "pretrain"]
SMALL = ["--rl-train", "200", "--rl-eval", "40", "--cold-start", "60", "--pretrain", "100"]
FENCE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)


def _load_prepare():
    spec = importlib.util.spec_from_file_location("code_prepare", DATA / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare = _load_prepare()


def rows(name, root=DATA):
    with open(root / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _bytes(d):
    return {f: (d / f"{f}.jsonl").read_bytes() for f in FILES}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        prepare.main(["--seed", seed, "--out", str(tmp_path / name), *SMALL])
    a, b, c = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert a == b
    assert all(a[f] != c[f] for f in FILES)


def test_committed_files_are_current(tmp_path):
    prepare.main(["--out", str(tmp_path)])
    stale = [f for f, data in _bytes(tmp_path).items() if data != _bytes(DATA)[f]]
    assert not stale, f"run `python data/code/prepare.py` and commit: {stale} are stale"


def rule_of(prompt):
    """The task a prompt asks, without the function name: held-out tasks must never appear in training files."""
    return re.sub(r"function \w+\(", "function (", prompt)


def test_held_out_tasks_never_in_training_files():
    held_out = {rule_of(r["prompt"]) for r in rows("rl_eval")}
    assert len(held_out) > 100
    for name in ("rl_train", "cold_start"):
        assert not held_out & {rule_of(r["prompt"]) for r in rows(name)}, name
    pretrain = "\n".join(r["text"] for r in rows("pretrain"))
    leaked = [p for p in held_out if p in {rule_of(m) for m in re.findall(r"Write a Python [^\n]*?\.(?=\n| </)",
                                                                         pretrain)}]
    assert not leaked


def test_rows_have_parseable_tests_of_both_kinds():
    for name in ("rl_train", "rl_eval"):
        kinds = set()
        for i, r in enumerate(rows(name)):
            assert r["kind"] == "code" and r["language"] in ("en", "ru") and 1 <= r["difficulty"] <= 3
            tests = parse_tests(r["tests"], f"{name}:{i}")
            assert len(tests) == 4
            kinds |= {t["type"] for t in tests}
        assert kinds == {"assert", "stdin_stdout"}


def test_cold_start_is_r1_format_with_one_python_block():
    data = rows("cold_start")
    assert 0.4 < sum(r["brief"] for r in data) / len(data) < 0.6
    for r in data:
        reply = r["messages"][1]["content"]
        assert reply.startswith("<think>\n") and reply.count("</think>") == 1
        reasoning, summary = reply.split("</think>")
        assert "```" not in reasoning
        assert len(FENCE.findall(summary)) == 1 and summary.rstrip().endswith("```")


def test_reference_solutions_pass_their_tests_and_wrong_ones_do_not():
    box = Sandbox(python="python3", cpu_s=2, wall_s=5, memory_mb=256, processes=8, file_mb=4, open_files=64,
                  output_bytes=65536, allow_without_namespaces=False)
    sample = rows("rl_eval")[:12]
    for r in sample:
        tests = parse_tests(r["tests"], r["id"])
        assert all(run_tests(box, r["solution"], tests)), r["id"]
        wrong = r["solution"].replace("return ", "return 0 and ").replace("print(", "print(1, ")
        assert not all(run_tests(box, wrong, tests)), r["id"]


@pytest.mark.parametrize("name", ["rl_train", "cold_start", "pretrain"])
def test_russian_prompts_only_for_rules_with_russian_text(name):
    data = rows(name)
    texts = [r.get("prompt") or r["text"] for r in data]
    share = sum(bool(re.search("[а-яё]", t)) for t in texts) / len(texts)
    assert 0.01 < share < 0.15
