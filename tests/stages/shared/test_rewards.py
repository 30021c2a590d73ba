"""stages/shared/rewards/: rule rewards with TRL's signature, time-bounded math verification, the registry."""

import asyncio
import logging
import pickle
import threading
import time

import pytest

from stages.shared import rewards
from stages.shared.errors import UserError
from stages.shared.rewards import (
    REWARDS,
    BoundReward,
    accuracy_reward,
    build_reward_functions,
    format_reward,
    is_well_formed,
    language_consistency,
    language_consistency_reward,
    length_penalty,
    overlong_penalty,
    register_reward,
    repetition_penalty,
    tag_count_penalty,
    verify,
    verify_batch,
)

BOUND = 0.5  # seconds per check in these tests (the default, rewards.DEFAULT_VERIFY_TIMEOUT, is 1.5)
SLACK = 1.5  # process kill + scheduling on a shared 2-core machine


@pytest.fixture(scope="module", autouse=True)
def pool():
    rewards.start_verifier_pool()
    yield
    rewards.shutdown_verifier_pool()


@pytest.fixture
def ready_pool():
    """Timed tests measure the check, not the boot of a worker that an earlier test had killed."""
    rewards.start_verifier_pool(wait=True)


def conv(text):
    return [{"role": "assistant", "content": text}]


def boxed(answer):
    return f"<think>Let me compute.</think> The answer is \\boxed{{{answer}}}."


# ---- accuracy --------------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "1/2"), ("\\frac12", "0.5"), ("\\dfrac{1}{2}", "0.5"),
    ("2/4", "1/2"), ("42", "42.0"), ("42", "42"), ("1.50", "1.5"), ("0.1", "\\frac{1}{10}"),
    # negative numbers
    ("-3", "-3"), ("-3", "\u22123"), ("-\\frac{1}{2}", "-0.5"), ("\\frac{-1}{2}", "-1/2"), ("-7", "$-7$"), ("-0", "0"),
    # thousands separators
    ("1000", "1,000"), ("1000", "1{,}000"), ("1000000", "1,000,000"), ("1000", "1\\,000"), ("1234567", "1 234 567"),
    # units, currency, degrees stripped
    ("5", "5 \\text{ cm}"), ("5", "5\\text{ meters}"), ("10", "\\$10"), ("90", "90^\\circ"), ("3", "3 apples"),
    # percent where meant
    ("50", "50\\%"), ("50\\%", "50"), ("50\\%", "0.5"), ("0.5", "50\\%"), ("25%", "\\frac{1}{4}"),
    ("12.5", "12.5 percent"),
    # LaTeX and plain text, symbolic
    ("\\sqrt{2}", "2^{1/2}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("x+1", "1+x"), ("\\pi", "\\pi"),
    ("\\frac{\\pi}{2}", "\\pi/2"), ("(1,2)", "(1, 2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("3", "x = 3"),
    ("10^{3}", "1000"), ("2^{10}", "1024"), ("3", "3."),
    # gold written with delimiters, in a box, or not as a string
    ("$\\frac{1}{2}$", "0.5"), ("\\boxed{7}", "7"), (42, "42"), (0.5, "1/2"),
]  # fmt: skip

DIFFERENT = [
    ("3", "6"), ("1/2", "0.52"), ("0.5", "0.51"), ("50", "0.5"), ("-3", "3"), ("7", "-7"), ("1000", "100"),
    ("1000", "1,001"), ("\\sqrt{2}", "2"), ("\\pi", "3.14"), ("x+1", "x-1"), ("2", "two"), ("12", "21"),
    ("1/3", "0.33"), ("5", "5.1"), ("\\{1,2\\}", "\\{1,3\\}"), ("0.5", "5"), ("42", "4.2"), ("1/2", "2"),
    ("100", "10^{3}"), ("3", "3x"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("1024", "2^{11}"),
]  # fmt: skip


@pytest.mark.parametrize("gold, answer", EQUIVALENT)
def test_equivalent_answers_score_one(gold, answer):
    assert accuracy_reward([boxed(answer)], answer=[gold]) == [1.0]


@pytest.mark.parametrize("gold, answer", DIFFERENT)
def test_close_but_wrong_answers_score_zero(gold, answer):
    assert accuracy_reward([boxed(answer)], answer=[gold]) == [0.0]


@pytest.mark.parametrize(
    "completion, score",
    [
        ("<think>r</think> \\boxed{3} wait, no: \\boxed{5}", 1.0),  # several boxes: the last counts
        ("<think>r</think> \\boxed{5} wait, no: \\boxed{3}", 0.0),
        ("<think>\\boxed{5}</think> so \\boxed{3}", 0.0),
        ("<think>it is \\boxed{5}</think> I am not sure.", 0.0),  # a box inside the reasoning does not count
        ("<think>r</think> <answer>5</answer>", 1.0),  # R1-Zero answer tags
        ("<think>r</think> <answer>The answer is 5</answer>", 1.0),
        ("<think>r</think> <answer>\\frac{10}{2}</answer>", 1.0),
        ("<think>r</think> <answer>6</answer>", 0.0),
        ("<think>r</think> <answer></answer>", 0.0),
        ("<think>r</think> \\boxed{}", 0.0),
        ("<think>r</think> \\boxed{5", 0.0),  # unclosed box
        ("<think>the answer is 5", 0.0),  # never stopped thinking
        ("<think>r</think> The answer is 5.", 0.0),  # no box, no answer tag
        ("\\boxed{5}", 1.0),  # no think block: the whole text
        ("", 0.0),
        ("   ", 0.0),
        ("<think>r</think> \\boxed{\\frac{\\frac{10}{1}}{2}}", 1.0),  # nested braces
    ],
)
def test_answer_extraction_cases(completion, score):
    assert accuracy_reward([completion], answer=["5"]) == [score]
    assert accuracy_reward([conv(completion)], answer=["5"]) == [score]


@pytest.mark.parametrize("garbage", [None, 5, 3.2, [], [None], [[1, 2]], {"a": 1}, [{"role": "assistant"}],
                                     [{"role": "assistant", "content": 7}], b"\\boxed{5}", object()])
def test_garbage_completions_score_zero(garbage):
    assert accuracy_reward([garbage, boxed("5")], answer=["5", "5"]) == [0.0, 1.0]


def test_conversational_equals_plain():
    texts = [boxed(a) for a in ["0.5", "1/2", "2", "\\frac{2}{4}", "x"]] + ["", "<think>r</think> <answer>1/2</answer>"]
    gold = ["1/2"] * len(texts)
    plain = accuracy_reward(texts, answer=gold)
    assert plain == accuracy_reward([conv(t) for t in texts], answer=gold)
    assert plain == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_unparseable_gold_gives_none_and_warns_once(caplog):
    rewards._warned.discard("gold")
    with caplog.at_level(logging.WARNING, logger="stages.shared.rewards"):
        out = accuracy_reward([boxed("5"), boxed("5"), boxed("5")], answer=["???", "", "5"])
        out2 = accuracy_reward([boxed("5")], answer=["\\foo{}"])
    assert out == [None, None, 1.0]
    assert out2 == [None]
    assert len([r for r in caplog.records if "cannot be parsed" in r.getMessage()]) == 1


def test_none_gold_rows_are_ignored_without_warning(caplog):
    rewards._warned.discard("gold")
    with caplog.at_level(logging.WARNING, logger="stages.shared.rewards"):
        assert accuracy_reward([boxed("5"), boxed("5")], answer=[None, "5"]) == [None, 1.0]
    assert not [r for r in caplog.records if "cannot be parsed" in r.getMessage()]


def test_missing_answer_column_is_a_user_error():
    with pytest.raises(UserError, match="answer"):
        accuracy_reward([boxed("5")])


def test_trl_kwargs_are_accepted():
    out = accuracy_reward(
        completions=[conv(boxed("5"))], answer=["5"], prompts=[[{"role": "user", "content": "2+3?"}]],
        completion_ids=[[1, 2, 3]], trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None,
        language=["en"], template=["r1"],
    )  # fmt: skip
    assert out == [1.0]


def test_empty_batch():
    assert accuracy_reward([], answer=[]) == []
    assert format_reward([]) == []
    assert language_consistency_reward([]) == []


@pytest.mark.parametrize("parallel", [True, False, "auto"])
def test_parallel_modes_agree(parallel):
    rewards.clear_verify_cache()
    texts = [boxed(f"{i}/{i + 1}") for i in range(20)]
    golds = [f"\\frac{{{i}}}{{{i + 1}}}" if i % 2 else f"{i + 1}/{i}" for i in range(20)]
    expected = [1.0 if i % 2 else 0.0 for i in range(20)]
    expected[1] = 1.0  # 1/2 vs \frac{1}{2}
    expected[0] = 0.0  # 0/1 vs 1/0
    assert accuracy_reward(texts, answer=golds, verify_parallel=parallel) == expected


def test_large_batch_uses_the_pool_and_the_cache():
    rewards.clear_verify_cache()
    before = dict(rewards.STATS)
    texts = [boxed(i % 40) for i in range(200)]  # 40 distinct answers
    assert accuracy_reward(texts, answer=["7"] * 200) == [1.0 if i % 40 == 7 else 0.0 for i in range(200)]
    assert rewards.STATS["checks"] - before.get("checks", 0) == 40
    assert rewards.STATS["pooled"] - before.get("pooled", 0) == 40


def test_called_from_a_thread(ready_pool):
    rewards.clear_verify_cache()
    out, errors = [], []

    def work():
        try:
            out.append(accuracy_reward([boxed("0.25"), boxed("1/3"), boxed("9^{9^{9^{9}}}")], answer=["1/4"] * 3,
                                       verify_timeout=1.0))
            out.append(verify(boxed("\\frac{3}{4}"), "0.75"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=work)
    start = time.monotonic()
    thread.start()
    thread.join(30)
    assert not errors, errors
    assert out == [[1.0, 0.0, 0.0], True]
    assert time.monotonic() - start < 1.0 + SLACK


def test_several_threads_at_once():
    rewards.clear_verify_cache()
    results = {}

    def work(k):
        results[k] = accuracy_reward([boxed(f"{k}/{k + 1}"), boxed(k)], answer=[f"{k}/{k + 1}"] * 2)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: [1.0, 0.0] for k in range(1, 5)}


# ---- time bound ----------------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "power_tower": "9^{9^{9^{9}}}",
    "huge_power": "10^{10^{8}}",
    "huge_factorial": "(10^{100000})!",
    "nested_fracs": "\\frac{1}{" * 500 + "2" + "}" * 500,
    "long_sum": "+".join(f"{i}x^{{{i}}}" for i in range(1800)),  # ~20k characters
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
@pytest.mark.parametrize("parallel", [True, False])
def test_pathological_answer_returns_within_the_bound(name, parallel, ready_pool):
    rewards.clear_verify_cache()
    start = time.monotonic()
    out = accuracy_reward([boxed(PATHOLOGICAL[name])], answer=["3"], verify_timeout=BOUND, max_answer_chars=None,
                          verify_parallel=parallel)
    elapsed = time.monotonic() - start
    assert out == [0.0]
    assert elapsed < BOUND + SLACK, elapsed


def test_pathological_answer_with_the_default_bound(ready_pool):
    rewards.clear_verify_cache()
    start = time.monotonic()
    assert accuracy_reward([boxed(PATHOLOGICAL["power_tower"])], answer=["3"]) == [0.0]
    assert time.monotonic() - start < rewards.DEFAULT_VERIFY_TIMEOUT + SLACK


def test_pathological_answer_is_killed_when_the_worker_cannot_interrupt_itself(monkeypatch, ready_pool):
    monkeypatch.setattr(rewards, "SOFT_TIMEOUT_SHARE", 0.0)  # no in-worker alarm: only the kill bounds the check
    rewards.clear_verify_cache()
    pool = rewards.get_verifier_pool()
    killed = pool.stats["killed"]
    start = time.monotonic()
    out = accuracy_reward([boxed("9^{9^{9^{9}}}"), boxed("3")], answer=["3", "3"], verify_timeout=BOUND,
                          verify_parallel=True)
    assert out == [0.0, 1.0]
    assert time.monotonic() - start < BOUND + SLACK
    assert pool.stats["killed"] == killed + 1
    # the pool replaced the killed worker and keeps working
    assert accuracy_reward([boxed("4")], answer=["4"], verify_parallel=True) == [1.0]


def test_tasks_queued_behind_a_killed_check_are_retried(monkeypatch):
    monkeypatch.setattr(rewards, "SOFT_TIMEOUT_SHARE", 0.0)
    rewards.clear_verify_cache()
    texts = [boxed("9^{9^{9^{9}}}"), boxed("8^{8^{8^{8}}}")] + [boxed(i) for i in range(12)]
    out = accuracy_reward(texts, answer=["5"] * len(texts), verify_timeout=BOUND, verify_parallel=True)
    assert out == [0.0, 0.0] + [1.0 if i == 5 else 0.0 for i in range(12)]


def test_a_20k_character_answer_is_capped_quickly():
    answer = "+".join(["123456789"] * 2000)  # 20k characters
    start = time.monotonic()
    assert accuracy_reward([boxed(answer)], answer=["3"]) == [0.0]
    assert time.monotonic() - start < 0.5


def test_timeout_is_configurable_through_the_environment(monkeypatch, ready_pool):
    monkeypatch.setenv("R1FLOW_VERIFY_TIMEOUT", "0.3")
    rewards.clear_verify_cache()
    start = time.monotonic()
    assert accuracy_reward([boxed(PATHOLOGICAL["power_tower"])], answer=["3"], verify_parallel=True) == [0.0]
    assert time.monotonic() - start < 0.3 + SLACK


@pytest.mark.parametrize("bad", [0, -1, "soon"])
def test_bad_timeout_is_a_user_error(bad):
    with pytest.raises((UserError, ValueError)):
        accuracy_reward([boxed("uncached 1")], answer=["1"], verify_timeout=bad)


# ---- verify / verify_batch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        (boxed("1/2"), "0.5", True),
        (boxed("3"), "6", False),
        ("<think>r</think> nothing", "6", False),
        (boxed("3"), "???", None),
        (boxed("3"), None, None),
        (None, "3", False),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ],
)
def test_verify(text, gold, expected):
    assert verify(text, gold) is expected


def test_verify_batch():
    pairs = [(boxed("1/2"), "0.5"), (boxed("2"), "3"), ("no answer", "1"), (boxed("1"), "")]
    assert verify_batch(pairs) == [True, False, False, None]
    assert verify_batch(iter(pairs), parallel=True) == [True, False, False, None]
    assert verify_batch([]) == []


# ---- format --------------------------------------------------------------------------------------------------------

R1_ZERO_CASES = [
    ("<think>2+3=5</think> <answer>5</answer>", 1.0),
    ("<think>\nsteps\n</think>\n<answer>\n5\n</answer>\n", 1.0),
    ("  <think>a</think><answer>b</answer>  ", 1.0),
    ("<think>a</think> <answer>b</answer> trailing", 0.0),
    ("preamble <think>a</think> <answer>b</answer>", 0.0),
    ("<think>a</think> between <answer>b</answer>", 0.0),
    ("<think>a</think>", 0.0),  # missing answer
    ("<answer>b</answer>", 0.0),  # missing think
    ("<think>a <answer>b</answer>", 0.0),  # unclosed think
    ("<think>a</think> <answer>b", 0.0),  # unclosed answer
    ("<answer>b</answer> <think>a</think>", 0.0),  # misordered
    ("</think>a<think> <answer>b</answer>", 0.0),
    ("<think>a</think> <answer>b</answer> <answer>c</answer>", 0.0),  # duplicated
    ("<think>a</think><think>b</think> <answer>c</answer>", 0.0),
    ("<think>a <think>b</think> <answer>c</answer>", 0.0),
    ("<think></think> <answer>b</answer>", 0.0),  # empty reasoning
    ("<think>a</think> <answer> </answer>", 0.0),  # empty answer
    ("<think>a</think> <answer><think>b</think></answer>", 0.0),
    ("<THINK>a</THINK> <ANSWER>b</ANSWER>", 0.0),
    ("", 0.0),
]

R1_CASES = [
    ("<think>2+3=5</think> The answer is \\boxed{5}.", 1.0),
    ("<think>\nsteps\n</think>\n\nSo the sum is 5.", 1.0),  # the summary need not have a box (general prompts)
    ("<think>a</think> summary <answer>5</answer>", 1.0),
    ("<think>a</think>", 0.0),  # no summary
    ("<think>a</think>   \n", 0.0),
    ("summary only", 0.0),
    ("<think>a", 0.0),
    ("a</think> summary", 0.0),  # opening tag missing
    ("<think>a</think> b </think> c", 0.0),
    ("<think>a</think> b <think>c</think> d", 0.0),
    ("intro <think>a</think> b", 0.0),
    ("</think> a <think> b", 0.0),
    ("<think> </think> summary", 0.0),
    ("<think>a</think> s <answer>5", 0.0),
    ("<think>a</think> s </answer>5<answer>", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("text, score", R1_ZERO_CASES)
def test_format_r1_zero(text, score):
    assert format_reward([text], template="r1_zero") == [score]
    assert format_reward([conv(text)], template="r1_zero") == [score]


@pytest.mark.parametrize("text, score", R1_CASES)
def test_format_r1(text, score):
    assert format_reward([text]) == [score]  # r1 is the default
    assert format_reward([conv(text)], template=["r1"]) == [score]


def test_format_per_row_template_and_none_rows():
    texts = ["<think>a</think> <answer>b</answer>", "<think>a</think> summary", "<think>a</think> summary"]
    assert format_reward(texts, template=["r1_zero", "r1", None]) == [1.0, 1.0, 1.0]
    assert format_reward(texts, template="r1_zero") == [1.0, 0.0, 0.0]


def test_format_think_prefilled_by_the_chat_template():
    assert format_reward(["reasoning</think> summary"], think_prefilled=True) == [1.0]
    assert format_reward(["<think>reasoning</think> summary"], think_prefilled=True) == [0.0]
    assert is_well_formed("r</think><answer>5</answer>", "r1_zero", think_prefilled=True)


def test_format_unknown_template():
    with pytest.raises(UserError, match="r1_zero"):
        format_reward(["x"], template="chatml")


@pytest.mark.parametrize("garbage", [None, 1, [], [[]], {"role": "user"}, [{"role": "assistant", "content": None}]])
def test_format_garbage(garbage):
    assert format_reward([garbage]) == [0.0]
    assert language_consistency_reward([garbage]) == [0.0]
    assert length_penalty([garbage], length_max=10) == [0.0]
    assert tag_count_penalty([garbage]) == [0.0]
    assert repetition_penalty([garbage]) == [0.0]


# ---- language consistency ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, language, score",
    [
        ("First add the two numbers, then check the result.", "en", 1.0),
        ("首先我们把两个数相加", "zh", 1.0),
        ("首先我们把两个数相加", "en", 0.0),
        ("First add 两个数", "en", 2 / 5),  # 2 English words, 3 Han characters (one word each)
        ("Сначала сложим два числа", "ru", 1.0),
        ("Сначала сложим два числа", "en", 0.0),
        ("First сложим numbers", "en", 2 / 3),
        ("Πρώτα προσθέτουμε τους αριθμούς", "el", 1.0),
        ("نجمع العددين أولا", "ar", 1.0),
        ("نجمع العددين first", "en", 1 / 3),
        ("まず二つの数を足します", "ja", 1.0),
        ("まず二つの数を足します", "zh", 3 / 11),  # kana are not Chinese: 3 Han of 11 characters
        ("먼저 두 수를 더합니다", "ko", 1.0),
        ("We let θ be the angle and x = 3.", "en", 1.0),  # single letters (variables) are neutral
        ("设 x 为 3", "zh", 1.0),
        ("123 + 456 = 579 !!!", "en", 1.0),  # numbers and symbols are neutral: no words
        ("", "en", 1.0),
        ("So $\\alpha + \\beta = \\frac{1}{2}$ holds.", "en", 1.0),
        ("所以 $\\alpha + \\beta = \\frac{1}{2}$ 成立", "zh", 1.0),  # math and LaTeX commands are neutral
        ("Ceci est une phrase en français", "fr", 1.0),
        ("Ceci est une phrase en français", "en", 1.0),  # script-level: Latin languages are not told apart
        ("First add", "en-US", 1.0),
        ("首先", "zh_CN", 1.0),
        ("首先", "chinese", 1.0),
        ("First add", "latin", 1.0),
    ],
)
def test_language_consistency(text, language, score):
    assert language_consistency(text, language) == pytest.approx(score)


def test_language_reward_scores_the_reasoning_only():
    text = "<think>首先我们把两个数相加</think> The answer is \\boxed{5}."
    assert language_consistency_reward([text], language="zh") == [1.0]
    assert language_consistency_reward([text], language="en") == [0.0]
    assert language_consistency_reward([conv(text)], language=["zh"]) == [1.0]
    no_think = "The answer is five, 答案"
    assert language_consistency_reward([no_think]) == [pytest.approx(4 / 6)]


def test_language_reward_per_row_column():
    texts = ["<think>add them</think> 5", "<think>相加</think> 5", "<think>add them</think> 5"]
    assert language_consistency_reward(texts, language=["en", "zh", None]) == [1.0, 1.0, 1.0]
    assert language_consistency_reward(texts, language="zh") == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("language", ["klingon", "", None, 3])
def test_unknown_language_is_a_user_error(language):
    with pytest.raises(UserError, match="language"):
        language_consistency("text", language)


def test_language_consistency_is_fast():
    text = ("We add the numbers and carry the one, then 我们 check. " * 4000)  # ~200k characters
    start = time.monotonic()
    score = language_consistency(text, "en")
    assert time.monotonic() - start < 1.0
    assert 0.7 < score < 0.9


# ---- guards --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, max_length, soft, expected",
    [(10, 100, None, 0.0), (80, 100, None, 0.0), (90, 100, None, -0.5), (100, 100, None, -1.0),
     (150, 100, None, -1.0), (60, 100, 50, -0.2), (50, 100, 100, 0.0), (101, 100, 100, -1.0)],
)  # fmt: skip
def test_overlong_penalty(length, max_length, soft, expected):
    assert overlong_penalty(length, max_length, soft) == pytest.approx(expected)


def test_length_penalty_uses_completion_ids_when_given():
    texts = ["a", "b", "c"]
    ids = [[0] * 10, [0] * 90, [0] * 100]
    assert length_penalty(texts, completion_ids=ids, max_completion_length=100) == pytest.approx([0.0, -0.5, -1.0])
    assert length_penalty(["x" * 90], length_max=100, length_soft_limit=50) == pytest.approx([-0.8])
    assert length_penalty([conv("x" * 90)], length_max=100, length_soft_limit=50) == pytest.approx([-0.8])
    assert length_penalty(texts) == [0.0, 0.0, 0.0]  # no limit known


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think> <answer>b</answer>", 0.0),
        ("<think>a</think><think>b</think>", -0.5),
        ("<answer>1</answer><answer>2</answer><answer>3</answer>", -1.0),
        ("<think>" * 10, -1.0),
        ("no tags", 0.0),
    ],
)
def test_tag_count_penalty(text, expected):
    assert tag_count_penalty([text]) == [expected]
    assert tag_count_penalty([conv(text)]) == [expected]


def test_repetition_penalty():
    fresh = "the quick brown fox jumps over the lazy dog"
    loop = "I am stuck. " * 20
    assert repetition_penalty([fresh]) == [0.0]
    assert repetition_penalty(["too short"]) == [0.0]
    [score] = repetition_penalty([loop])
    assert -1.0 <= score < -0.8
    assert repetition_penalty([loop], repetition_max_penalty=0.5) == [pytest.approx(score / 2)]
    assert repetition_penalty([conv(loop)]) == [score]
    assert repetition_penalty(["重复重复重复重复重复重复"])[0] < -0.5  # CJK characters count as words


# ---- registry ------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert {"accuracy", "format", "language_consistency", "length_penalty", "tag_count_penalty",
            "repetition_penalty"} <= set(REWARDS)  # fmt: skip


def test_a_zero_weight_switches_a_reward_off():
    funcs, weights = build_reward_functions({"accuracy": 1.0, "format": 0.0, "language_consistency": 0})
    assert [f.__name__ for f in funcs] == ["accuracy"] and weights == [1.0]
    with pytest.raises(UserError, match="no rewards"):
        build_reward_functions({"accuracy": 0.0})


def test_build_reward_functions_from_config():
    funcs, weights = build_reward_functions({"accuracy": 1.0, "format": 1.0, "language_consistency": 0.1})
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "language_consistency"]
    assert weights == [1.0, 1.0, 0.1]
    acc, fmt, lang = funcs
    text = "<think>add 2 and 3</think> So \\boxed{5}."
    assert acc(prompts=["p"], completions=[text], completion_ids=[[1]], answer=["5"], trainer_state=None) == [1.0]
    assert fmt(completions=[text]) == [1.0]
    assert lang(completions=[text]) == [1.0]


def test_unknown_reward_lists_known_ones():
    with pytest.raises(UserError) as err:
        build_reward_functions({"acuracy": 1.0})
    assert "accuracy" in str(err.value) and "format" in str(err.value)


@pytest.mark.parametrize("weights", [{}, {"accuracy": "high"}, {"accuracy": float("nan")}, {"accuracy": True}])
def test_bad_weights(weights):
    with pytest.raises(UserError):
        build_reward_functions(weights)


def test_bound_kwargs_apply_unless_the_dataset_has_the_column():
    (fmt,), _ = build_reward_functions({"format": 1.0}, template="r1_zero")
    zero = "<think>a</think> <answer>b</answer>"
    chat = "<think>a</think> summary"
    assert fmt(completions=[zero, chat]) == [1.0, 0.0]
    assert fmt(completions=[chat, chat], template=["r1", "r1_zero"]) == [1.0, 0.0]  # the column wins
    assert fmt(completions=[zero, chat], template=[None, "r1"]) == [1.0, 1.0]  # None rows: the bound value
    (lang,), _ = build_reward_functions({"language_consistency": 1.0}, language="zh")
    assert lang(completions=["<think>相加</think>", "<think>add</think>"]) == [1.0, 0.0]
    assert lang(completions=["<think>相加</think>", "<think>add them</think>"], language=["zh", "en"]) == [1.0, 1.0]


def test_bound_values_are_validated_early():
    with pytest.raises(UserError):
        build_reward_functions({"format": 1.0}, template="r3")
    with pytest.raises(UserError):
        build_reward_functions({"language_consistency": 1.0}, language="xx-unknown")


def test_bound_guard_settings():
    (length,), _ = build_reward_functions({"length_penalty": 0.5}, max_completion_length=100)
    assert length.__name__ == "length_penalty"
    assert length(completions=["x"], completion_ids=[[0] * 90]) == [pytest.approx(-0.5)]


def test_extra_rewards_and_registration():
    def helpfulness(completions, **kwargs):
        return [0.5 for _ in completions]

    funcs, weights = build_reward_functions({"accuracy": 1.0, "helpfulness": 2.0},
                                            extra_rewards={"helpfulness": helpfulness})
    assert [f.__name__ for f in funcs] == ["accuracy", "helpfulness"]
    assert funcs[1](completions=["a", "b"], answer=["1", "1"]) == [0.5, 0.5]
    assert weights == [1.0, 2.0]
    try:
        register_reward("constant_test")(lambda completions, **kw: [1.0] * len(completions))
        (f,), _ = build_reward_functions({"constant_test": 1.0})
        assert f.__name__ == "constant_test" and f(completions=["x"]) == [1.0]
        with pytest.raises(ValueError):
            register_reward("constant_test", lambda completions, **kw: [])
    finally:
        REWARDS.pop("constant_test", None)


def test_async_extra_reward_stays_async():
    async def judge(completions, **kwargs):
        return [1.0] * len(completions)

    (f,), _ = build_reward_functions({"judge": 1.0}, extra_rewards={"judge": judge})
    assert f.__name__ == "judge"
    assert asyncio.iscoroutinefunction(f.__call__)
    assert asyncio.run(f(completions=["a"])) == [1.0]


def test_bound_rewards_pickle():
    funcs, _ = build_reward_functions({"accuracy": 1.0, "format": 1.0}, template="r1_zero")
    clone = pickle.loads(pickle.dumps(funcs))
    assert [f.__name__ for f in clone] == ["accuracy", "format"]
    assert isinstance(clone[1], BoundReward) and clone[1].bind == {"template": "r1_zero"}


def test_workers_that_cannot_start_are_reported(monkeypatch):
    monkeypatch.setattr(rewards, "_WORKER_CMD", "import sys; print('boom: {root}', file=sys.stderr); sys.exit(3)")
    pool = rewards.VerifierPool(size=1)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            pool.run([("1", "1", "boxed")], 1.0)
    finally:
        pool.close()
