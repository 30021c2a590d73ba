"""stages/shared/rewards/code.py and the routing of the accuracy reward by row kind (math answer or code tests)."""
import json

import pytest

from pipeline.plan import compose_config
from stages.shared import rewards
from stages.shared.data import load_task_rows
from stages.shared.errors import UserError
from stages.shared.rewards.code import (
    code_accuracy_reward,
    code_format_reward,
    extract_program,
    program_key,
)
from stages.shared.rewards import verification
from stages.shared.sandbox import Sandbox

BOX = Sandbox(python="python3", cpu_s=1, wall_s=2, memory_mb=256, processes=8, file_mb=4, open_files=64,
              output_bytes=65536, allow_without_namespaces=False)
ASSERTS = [{"type": "assert", "code": "assert f(1) == 8"}, {"type": "assert", "code": "assert f(2) == 9"},
           {"type": "assert", "code": "assert f(-7) == 0"}, {"type": "assert", "code": "assert f(0) == 7"}]
STDIO = [{"type": "stdin_stdout", "input": "abc\n", "output": "cba\n"},
         {"type": "stdin_stdout", "input": "x\n", "output": "x\n"}]


def answer(code: str, reasoning: str = "x plus 7 is x + 7.") -> str:
    return f"<think>\n{reasoning}\n</think>\nHere is the function:\n```python\n{code}\n```"


VERIFICATION = dict(compose_config([]).verification)  # conf/verification/default.yaml
LIMITS = {"verification": VERIFICATION, "sandbox": BOX}


@pytest.fixture(scope="module", autouse=True)
def pool():
    yield
    verification.shutdown()


def test_extract_program_takes_the_last_block_of_the_language_in_the_summary():
    text = "<think>\n```python\nreasoning_block = 1\n```\n</think>\n```py\nfirst = 1\n```\n```js\nno()\n```\n" \
           "```python\nlast = 2\n```"
    assert extract_program(text) == "last = 2\n"
    assert extract_program("<think>\n```python\nonly_in_reasoning = 1\n```\n</think>\nno code") is None
    assert extract_program("```python\nno_think = 1\n```") == "no_think = 1\n"
    assert extract_program(None) is None
    with pytest.raises(UserError, match="code_language"):
        extract_program("x", "cobol")


def test_correct_wrong_partial_missing_and_no_tests():
    completions = [answer("def f(x):\n    return x + 7"),       # all 4
                   answer("def f(x):\n    return x * 8"),       # f(1) == 8 and f(0) == 0? only the first
                   answer("def f(x):\n    return abs(x) + 7"),  # 3 of 4
                   "<think>\nno code\n</think>\nx + 7",           # no program
                   answer("def f(x):\n    return x + 7")]       # a row without tests
    tests = [ASSERTS, ASSERTS, ASSERTS, ASSERTS, None]
    share = code_accuracy_reward(completions, tests=tests, **LIMITS, code_score="share")
    assert share == [1.0, 0.25, 0.75, 0.0, None]
    every = code_accuracy_reward(completions, tests=tests, **LIMITS, code_score="all")
    assert every == [1.0, 0.0, 0.0, 0.0, None]
    with pytest.raises(UserError, match="code_score"):
        code_accuracy_reward(completions, tests=tests, **LIMITS, code_score="most")


def test_stdin_stdout_tests_and_json_test_columns():
    program = "<think>\nreverse\n</think>\n```python\nprint(input()[::-1])\n```"
    conversational = [[{"role": "assistant", "content": program}]]
    assert code_accuracy_reward(conversational, tests=[json.dumps(STDIO)], **LIMITS) == [1.0]
    assert code_accuracy_reward([program.replace("[::-1]", "")], tests=[STDIO], **LIMITS) == [0.5]


def test_hostile_programs_score_zero_and_the_pool_keeps_working():
    hostile = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()", "x = ' ' * 10 ** 10",
               "import os\nos.system('kill -9 -1; rm -rf ~')", "import os, signal\nos.kill(os.getppid(), 9)",
               "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)"]
    scores = code_accuracy_reward([answer(h) for h in hostile], tests=[ASSERTS] * len(hostile), **LIMITS)
    assert scores == [0.0] * len(hostile)
    assert code_accuracy_reward([answer("def f(x):\n    return x + 7")], tests=[ASSERTS], **LIMITS) == [1.0]


def test_accuracy_routes_each_row_by_kind():
    math_right = "<think>\n7+8=15\n</think>\nThe answer is \\boxed{15}"
    completions = [math_right, math_right, answer("def f(x):\n    return x + 7"), answer("def f(x):\n    return 0")]
    out = rewards.accuracy_reward(completions, answer=["15", "16", None, None], tests=[None, None, ASSERTS, ASSERTS], **LIMITS)
    assert out == [1.0, 0.0, 1.0, 0.25]
    # a code-only batch needs no answer column
    assert rewards.accuracy_reward(completions[2:], tests=[ASSERTS, ASSERTS], **LIMITS) == [1.0, 0.25]
    with pytest.raises(UserError, match="`tests`"):
        rewards.accuracy_reward(completions[:1])


def test_verify_rows_for_both_kinds():
    texts = ["\\boxed{15}", "\\boxed{15}", answer("def f(x):\n    return x + 7"), answer("def f(x):\n    return 0"),
             "hello"]
    rows = [{"answer": "15"}, {"answer": "14"}, {"tests": ASSERTS}, {"tests": ASSERTS}, {"prompt": "hi"}]
    assert rewards.verify_rows(texts, rows, VERIFICATION, sandbox=BOX) == [True, False, True, False, None]


def test_code_format_reward():
    one = answer("def f(x):\n    return x + 7")
    two = one + "\n```python\nprint(f(1))\n```"
    other = one.replace("```python", "```javascript")
    no_block = "<think>\nx\n</think>\ndef f(x): return x + 7"
    in_reasoning_only = "<think>\n```python\nx + 7\n```\n</think>\nDone."
    out = code_format_reward([one, two, other, no_block, in_reasoning_only, one],
                             tests=[ASSERTS] * 5 + [None])
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, None]


def test_language_consistency_reads_the_reasoning_not_the_code():
    ru = "<think>\nФункция возвращает x плюс 7.\n</think>\n```python\ndef f(x):\n    return x + 7\n```"
    assert rewards.language_consistency_reward([ru], language="ru") == [1.0]
    mixed = "<think>\nФункция returns x плюс 7.\n</think>\nok"
    assert rewards.language_consistency_reward([mixed], language="ru")[0] < 1.0


def test_code_rewards_are_left_out_without_code_rows():
    weights = {"accuracy": 1.0, "format": 1.0, "code_format": 0.5}
    funcs, w = rewards.build_reward_functions(weights, row_kinds={"math"}, verification=VERIFICATION)
    assert [f.__name__ for f in funcs] == ["accuracy", "format"] and w == [1.0, 1.0]
    funcs, w = rewards.build_reward_functions(weights, row_kinds={"math", "code"}, **LIMITS)
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "code_format"] and w == [1.0, 1.0, 0.5]
    bound = funcs[0]
    assert bound([answer("def f(x):\n    return x + 7")], answer=[None], tests=[ASSERTS]) == [1.0]


def test_program_key_ignores_comments_and_layout_only():
    a = "def f(x):\n    # add seven\n    return x + 7\n"
    b = "def f(x):\n\n    return (x+7)"
    assert program_key(a) == program_key(b)
    assert program_key(a) != program_key("def f(x):\n    return 7 + x")
    assert program_key("def f(x) return") == "def f(x) return"
    assert program_key(None) is None


def test_malformed_tests_in_a_data_file_name_the_file_and_row(tmp_path):
    good = {"id": "c-0", "prompt": "p", "kind": "code", "tests": ASSERTS}
    bad = {"id": "c-1", "prompt": "p", "kind": "code", "tests": [{"type": "assert", "code": "assert f(1) =="}]}
    path = tmp_path / "rl_train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError) as err:
        load_task_rows(str(path), "rl_train")
    assert f"{path}:2 (id c-1): test 0" in str(err.value) and "not valid Python" in str(err.value)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "c-2", "prompt": "p"}) + "\n")
    with pytest.raises(UserError, match=r":2: a prompt row needs a gold `answer` \(math\) or `tests` \(code\)"):
        load_task_rows(str(path), "rl_train")
    path.write_text(json.dumps(good) + "\n")
    assert load_task_rows(str(path), "rl_train")[0]["tests"] == ASSERTS


def test_evaluation_scores_code_samples_and_votes_over_normalised_programs():
    from stages.evaluate import cons_at_k, score_samples

    right = answer("def f(x):\n    return x + 7")
    right_other_layout = answer("def f(x):\n    # seven more\n    return (x+7)")
    wrong = answer("def f(x):\n    return x * 8")
    rows = [{"tests": ASSERTS}, {"answer": "15"}]
    texts = [[wrong, right, right_other_layout, wrong, wrong], ["\\boxed{15}", "\\boxed{14}"]]
    code_q, math_q = score_samples(texts, rows, template="r1", languages=["en", "en"], verification=VERIFICATION,
                                   code={"sandbox": BOX, "code_language": "python"})
    assert code_q["correct"] == [False, True, True, False, False] and math_q["correct"] == [True, False]
    assert code_q["answers"][1] == code_q["answers"][2] != code_q["answers"][0] == code_q["answers"][3]
    assert all(a.startswith("program:") for a in code_q["answers"]) and math_q["answers"] == ["15", "14"]
    assert code_q["formatted"] == [True] * 5
    ok, vote = cons_at_k(code_q["answers"], code_q["correct"])
    assert not ok and vote.votes == 3          # the wrong program was written most often
    ok, vote = cons_at_k(code_q["answers"][:3], code_q["correct"][:3])
    assert ok and vote.votes == 2              # two layouts of one right program outvote one wrong one


def test_mixed_files_keep_the_share_and_interleave(tmp_path):
    math = tmp_path / "math.jsonl"
    code = tmp_path / "code.jsonl"
    math.write_text("".join(json.dumps({"id": f"m{i}", "prompt": "q", "answer": str(i)}) + "\n" for i in range(50)))
    code.write_text("".join(json.dumps({"id": f"c{i}", "prompt": "p", "tests": ASSERTS}) + "\n" for i in range(10)))
    rows = load_task_rows({"mix": [str(math), str(code)], "shares": [None, 0.2]}, "rl_train")
    kinds = ["c" if r.get("tests") else "m" for r in rows]
    assert len(rows) == 50 and kinds.count("c") == 10          # as many as the parts hold without repeats
    assert "ccc" not in "".join(kinds) and "mmmmmmm" not in "".join(kinds)
    assert [r["id"] for r in rows if r.get("tests")] == [f"c{i}" for i in range(10)]
    rows = load_task_rows({"mix": [str(math), str(code)], "shares": [None, 0.5]}, "rl_train")
    assert len(rows) == 20 and sum(bool(r.get("tests")) for r in rows) == 10
    with pytest.raises(UserError, match="shares must be numbers"):
        load_task_rows({"mix": [str(math), str(code)], "shares": [None, None]}, "rl_train")
    with pytest.raises(UserError, match="one share per entry"):
        load_task_rows({"mix": [str(math), str(code)], "shares": [1.0]}, "rl_train")
