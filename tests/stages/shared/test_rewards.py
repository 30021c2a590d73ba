"""stages/shared/rewards/: rule rewards with TRL's signature, time-bounded math verification in the pebble pool, the
registry."""

import asyncio
import logging
import os
import pickle
import threading
import time

import pytest

from pipeline.plan import compose_config
from stages.shared import rewards
from stages.shared.errors import UserError
from stages.shared.rewards import (
    REWARDS,
    BoundReward,
    accuracy,
    build_reward_functions,
    canonical_answer,
    format_reward,
    is_well_formed,
    language_consistency,
    language_consistency_reward,
    length_penalty,
    overlong_penalty,
    register_reward,
    repetition_penalty,
    repetition_score,
    tag_count_penalty,
    verification,
    verify,
    verify_batch,
)
from stages.shared.rewards.batch import forget_warnings

VERIFICATION = dict(compose_config([]).verification)  # conf/verification/default.yaml: the one home of the values
BOUND = 0.5  # seconds per check in the timeout tests (the default is VERIFICATION["timeout_s"])


def settings(**override):
    return {**VERIFICATION, **override}


def accuracy_reward(completions, answer, **override):
    return rewards.accuracy_reward(completions, answer=answer, verification=settings(**override))


@pytest.fixture(scope="module", autouse=True)
def pool():
    accuracy_reward([boxed("1")], ["1"])  # workers up before the timed tests
    yield
    verification.shutdown()


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
    forget_warnings()
    with caplog.at_level(logging.WARNING, logger="stages.shared.rewards"):
        out = accuracy_reward([boxed("5"), boxed("5"), boxed("5")], answer=["???", "", "5"])
        out2 = accuracy_reward([boxed("5")], answer=["\\foo{}"])
    assert out == [None, None, 1.0]
    assert out2 == [None]
    assert len([r for r in caplog.records if "cannot be parsed" in r.getMessage()]) == 1


def test_none_gold_rows_are_ignored_without_warning(caplog):
    forget_warnings()
    with caplog.at_level(logging.WARNING, logger="stages.shared.rewards"):
        assert accuracy_reward([boxed("5"), boxed("5")], answer=[None, "5"]) == [None, 1.0]
    assert not [r for r in caplog.records if "cannot be parsed" in r.getMessage()]


# TRL's test_unparsable_gold_solution_yields_none_reward, and what the old \boxed{} wrapping of every gold did: it read
# "forty two" as the product f*o*r*t*y*t*w*o, so "two forty" scored 1.0 and "42" scored 0.0.
@pytest.mark.parametrize("gold", ["forty two", "yes", "Monday", "sin x", "forty-two", "the answer is 42 apples"])
@pytest.mark.parametrize("answer", ["42", "two forty", "forty two", "sey", "x sin"])
def test_prose_gold_gives_none(gold, answer):
    assert accuracy_reward(["<think> Reasoning content </think> " + f"\\boxed{{{answer}}}"], [gold]) == [None]
    assert verify(boxed(answer), gold, VERIFICATION) is None


@pytest.mark.parametrize("gold, answer", [
    ("5 apples", "5"),  # a unit math-verify drops is not prose
    ("\\text{Evelyn}", "\\text{Evelyn}"),  # named answers written as LaTeX text stay checkable
    ("x = 3 or x = 4", "x=3 \\text{ or } x=4"),
    ("3x^2 + 2xy", "2xy + 3x^2"),  # two-letter products are algebra
    ("\\sin x", "\\sin(x)"),
])  # fmt: skip
def test_mathematical_gold_with_letters_still_verifies(gold, answer):
    assert accuracy_reward([boxed(answer)], [gold]) == [1.0]


def test_missing_answer_column_is_a_user_error():
    with pytest.raises(UserError, match="answer"):
        rewards.accuracy_reward([boxed("5")], verification=VERIFICATION)


def test_missing_verification_settings_is_a_user_error():
    with pytest.raises(UserError, match="verification"):
        rewards.accuracy_reward([boxed("5")], answer=["5"])
    with pytest.raises(UserError, match="verification=cfg.verification"):
        build_reward_functions({"accuracy": 1.0, "format": 1.0})


def test_trl_kwargs_are_accepted():
    out = rewards.accuracy_reward(
        completions=[conv(boxed("5"))], answer=["5"], prompts=[[{"role": "user", "content": "2+3?"}]],
        completion_ids=[[1, 2, 3]], trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None,
        language=["en"], template=["r1"], verification=VERIFICATION,
    )  # fmt: skip
    assert out == [1.0]


def test_empty_batch():
    assert accuracy_reward([], answer=[]) == []
    assert format_reward([]) == []
    assert language_consistency_reward([]) == []


def test_checks_are_deduplicated_cached_and_run_in_the_pool():
    accuracy.clear_cache()
    before = rewards.verifier_stats()
    texts = [boxed(i % 40) for i in range(200)]  # 40 distinct answers
    assert accuracy_reward(texts, answer=["7"] * 200) == [1.0 if i % 40 == 7 else 0.0 for i in range(200)]
    after = rewards.verifier_stats()
    assert after["checks"] - before.get("checks", 0) == 40
    assert after["pool_calls"] - before.get("pool_calls", 0) == 40
    assert accuracy_reward(texts[:40], answer=["7"] * 40)[7] == 1.0
    assert rewards.verifier_stats()["cache_hits"] - after.get("cache_hits", 0) == 40


def test_results_are_correct_under_load():
    accuracy.clear_cache()
    texts, golds, expected = [], [], []
    for i in range(300):  # right in another form (0.5 vs 1/2) or off by one, in a random-looking order
        right = i % 3 != 0
        texts.append(boxed(f"\\frac{{{i}}}{{{i + 1}}}" if right else f"{i + 1}/{i + 2}"))
        golds.append(f"{i}/{i + 1}")
        expected.append(1.0 if right else 0.0)
    out = accuracy_reward(texts, golds)
    assert out == expected


def test_called_from_a_thread():
    accuracy.clear_cache()
    out, errors = [], []

    def work():
        try:
            out.append(accuracy_reward([boxed("0.25"), boxed("1/3")], ["1/4"] * 2))
            out.append(accuracy_reward([boxed("9^{9^{9^{9}}}")], ["1/4"], timeout_s=BOUND, retries=0))
            out.append(verify(boxed("\\frac{3}{4}"), "0.75", VERIFICATION))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not errors, errors
    assert out == [[1.0, 0.0], [None], True]  # [None]: the stuck check was cut off at the bound


def test_pool_started_from_a_thread():
    """Prefect runs a stage's task off the main thread: the pool (and its fork server) can start there."""
    verification.shutdown()
    accuracy.clear_cache()
    out = []
    thread = threading.Thread(target=lambda: out.append(accuracy_reward([boxed("1/2"), boxed("2")], ["0.5"] * 2)))
    thread.start()
    thread.join(120)
    assert out == [[1.0, 0.0]]


def test_several_threads_at_once():
    accuracy.clear_cache()
    results = {}

    def work(k):
        results[k] = accuracy_reward([boxed(f"{k}/{k + 1}"), boxed(k)], [f"{k}/{k + 1}"] * 2)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
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
def test_pathological_answer_is_cut_off_at_the_bound_and_never_scored_wrong(name):
    accuracy.clear_cache()
    before = rewards.verifier_stats()
    out = accuracy_reward([boxed(PATHOLOGICAL[name])], ["3"], timeout_s=BOUND, retries=1, max_answer_chars=None)
    after = rewards.verifier_stats()
    assert out == [None]  # timed out twice: "cannot tell", not 0.0
    assert after["pool_retries"] - before.get("pool_retries", 0) == 1
    assert after["unchecked"] - before.get("unchecked", 0) == 1


def sleep_on_first_call(marker: str) -> str:
    """Hangs the first time (the marker file does not exist yet), answers at once the second time."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return "done"


def test_a_timed_out_call_is_retried_and_can_still_succeed(tmp_path):
    """An overrun on a busy machine gets a second try in a fresh worker."""
    before = verification.stats()
    out = verification.run_all(sleep_on_first_call, [(str(tmp_path / "marker"),)], settings(timeout_s=BOUND))
    after = verification.stats()
    assert out == [(True, "done")]
    assert after["killed"] - before.get("killed", 0) == 1
    assert after["retries"] - before.get("retries", 0) == 1
    assert after.get("unfinished", 0) == before.get("unfinished", 0)


def test_math_verify_own_timeout_leaves_the_worker_alive():
    """timeout_s above math-verify's alarm: the alarm interrupts the check inside the worker, nothing is killed."""
    accuracy.clear_cache()
    before = verification.stats()
    out = accuracy_reward([boxed(PATHOLOGICAL["long_sum"])], ["3"], timeout_s=5.0, math_verify_timeout_s=1, retries=0,
                          max_answer_chars=None)
    after = verification.stats()
    assert out == [None]
    assert after.get("timeouts", 0) - before.get("timeouts", 0) == 1  # the alarm ended it, not the pool's bound
    assert after.get("killed", 0) == before.get("killed", 0)


def test_a_check_stuck_past_the_bound_is_killed_and_its_worker_replaced():
    accuracy.clear_cache()
    before = verification.stats()
    out = accuracy_reward([boxed("9^{9^{9^{9}}}")], ["3"], timeout_s=BOUND, retries=0)
    assert out == [None]
    assert verification.stats()["killed"] - before.get("killed", 0) == 1
    # the pool replaced the killed worker and keeps working
    assert accuracy_reward([boxed(i) for i in range(20)], ["4"] * 20) == [1.0 if i == 4 else 0.0 for i in range(20)]


def test_checks_queued_behind_killed_ones_are_unaffected():
    accuracy.clear_cache()
    texts = [boxed("9^{9^{9^{9}}}"), boxed("8^{8^{8^{8}}}")] + [boxed(i) for i in range(12)]
    out = accuracy_reward(texts, ["5"] * len(texts), timeout_s=BOUND)
    assert out == [None, None] + [1.0 if i == 5 else 0.0 for i in range(12)]


def test_an_answer_over_max_answer_chars_never_reaches_the_parser(monkeypatch):
    """20k characters of sums would keep math-verify busy up to the bound; over the cap the answer is not parsed."""
    answer = "+".join(["123456789"] * 2000)  # 20k characters
    checked = []

    def recording_run_all(fn, calls, settings):
        checked.extend(call[1] for call in calls)  # (gold, answer, kind, math_verify_timeout_s)
        return verification.run_all(fn, calls, settings)

    monkeypatch.setattr(accuracy, "run_all", recording_run_all)
    accuracy.clear_cache()
    assert accuracy_reward([boxed(answer)], ["3"], max_answer_chars=VERIFICATION["max_answer_chars"]) == [0.0]
    assert checked == [None]
    accuracy.clear_cache()
    accuracy_reward([boxed("1+2")], ["3"], max_answer_chars=3)  # at the cap: parsed
    assert checked == [None, "1+2"]
    assert VERIFICATION["max_answer_chars"] < len(answer)


@pytest.mark.parametrize("key, bad", [("timeout_s", 0), ("timeout_s", -1), ("timeout_s", "soon"),
                                      ("math_verify_timeout_s", 0.5), ("retries", -1), ("workers", 0),
                                      ("memory_mb", -5), ("max_answer_chars", 0)])
def test_bad_settings_are_user_errors_naming_the_key(key, bad):
    with pytest.raises(UserError, match=f"verification.{key}"):
        accuracy_reward([boxed("uncached 1")], ["1"], **{key: bad})


def test_settings_must_be_the_whole_node():
    with pytest.raises(UserError, match="missing keys \\['timeout_s'\\]"):
        verification.settings({k: v for k, v in VERIFICATION.items() if k != "timeout_s"})
    with pytest.raises(UserError, match="unknown keys \\['timout_s'\\]"):
        verification.settings({**VERIFICATION, "timout_s": 1})


def test_workers_that_keep_dying_are_reported():
    """A memory cap far below what a Python process needs: every worker dies; the error names the key."""
    accuracy.clear_cache()
    with pytest.raises(RuntimeError, match="memory_mb"):
        accuracy_reward([boxed("1")], ["1"], memory_mb=8)
    assert accuracy_reward([boxed("1")], ["1"]) == [1.0]  # the next call builds a working pool again


def test_generic_calls_through_the_pool():
    """The pool is not math-only: any module-level function runs bounded, with a timeout read as "unfinished"."""
    out = verification.run_all(time.sleep, [(0,), (30,)], settings(timeout_s=BOUND, retries=0))
    assert out == [(True, None), (False, None)]
    with pytest.raises(ZeroDivisionError):
        verification.run_all(divmod, [(1, 0)], VERIFICATION)


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
    assert verify(text, gold, VERIFICATION) is expected


def test_verify_batch():
    pairs = [(boxed("1/2"), "0.5"), (boxed("2"), "3"), ("no answer", "1"), (boxed("1"), "")]
    assert verify_batch(pairs, VERIFICATION) == [True, False, False, None]
    assert verify_batch(iter(pairs), VERIFICATION) == [True, False, False, None]
    assert verify_batch([], VERIFICATION) == []


def test_equal_answers_written_differently_share_a_canonical_key():
    assert canonical_answer("\\frac{1}{2}") == canonical_answer("0.5") == canonical_answer("1/2") \
        == canonical_answer("\\dfrac{1}{2}") == canonical_answer("$\\boxed{0.50}$") == canonical_answer("0.5.")
    assert canonical_answer("1,000") == canonical_answer("1000") == canonical_answer("1\\,000")
    assert canonical_answer(" x^2 + 1 ") == canonical_answer("x^2+1") == canonical_answer("\\text{x^2+1}")
    assert canonical_answer("\\left(1,2\\right)") == canonical_answer("(1, 2)")
    assert canonical_answer("\u22123") == canonical_answer("-3")
    assert canonical_answer(None) is None and canonical_answer(" $ $ ") is None
    assert canonical_answer("0.5") != canonical_answer("0.51") and canonical_answer("x") != canonical_answer("y")


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


def test_language_consistency_of_a_long_mixed_text():
    text = ("We add the numbers and carry the one, then 我们 check. " * 4000)  # ~200k characters
    assert 0.7 < language_consistency(text, "en") < 0.9  # its speed: benchmarks/bench_rewards.py --language


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


def test_repetition_score_is_the_one_repetition_metric():
    loop = "7+8=15 so the answer " * 20
    assert repetition_score(loop, ngram_size=4) > 0.5
    assert repetition_score("one two three four five six", ngram_size=4) == 0.0
    assert repetition_score("short", ngram_size=4) == 0.0
    assert repetition_score("The cat. the CAT, the cat the cat", ngram_size=2) == repetition_score(
        "the cat the cat the cat the cat", ngram_size=2)  # case and punctuation do not hide a loop


# ---- registry ------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert {"accuracy", "format", "language_consistency", "length_penalty", "tag_count_penalty",
            "repetition_penalty"} <= set(REWARDS)  # fmt: skip


def test_a_zero_weight_switches_a_reward_off():
    funcs, weights = build_reward_functions({"accuracy": 1.0, "format": 0.0, "language_consistency": 0},
                                             verification=VERIFICATION)
    assert [f.__name__ for f in funcs] == ["accuracy"] and weights == [1.0]
    with pytest.raises(UserError, match="no rewards"):
        build_reward_functions({"accuracy": 0.0})


def test_build_reward_functions_from_config():
    funcs, weights = build_reward_functions({"accuracy": 1.0, "format": 1.0, "language_consistency": 0.1},
                                             verification=VERIFICATION)
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
                                            extra_rewards={"helpfulness": helpfulness}, verification=VERIFICATION)
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
    funcs, _ = build_reward_functions({"accuracy": 1.0, "format": 1.0}, template="r1_zero", verification=VERIFICATION)
    clone = pickle.loads(pickle.dumps(funcs))
    assert [f.__name__ for f in clone] == ["accuracy", "format"]
    assert isinstance(clone[1], BoundReward)
    assert clone[1].bind == {"template": "r1_zero", "verification": verification.settings(VERIFICATION)}
    assert clone[0](completions=[boxed("0.5")], answer=["1/2"]) == [1.0]
