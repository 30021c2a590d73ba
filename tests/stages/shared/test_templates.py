"""stages/shared/templates.py: prompt formats and the text helpers (answer extraction, reasoning split)."""

import pytest

from stages.shared.errors import UserError
from stages.shared.templates import (
    R1_ZERO_TEMPLATE,
    TEMPLATES,
    completion_text,
    extract_answer,
    format_prompt,
    last_boxed,
    render_prompt,
    split_reasoning,
)

PAPER_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def test_r1_zero_template_is_the_paper_text():
    assert R1_ZERO_TEMPLATE == PAPER_TEXT
    assert R1_ZERO_TEMPLATE.count("{prompt}") == 1
    assert set(TEMPLATES) == {"r1", "r1_zero"}


@pytest.mark.parametrize("question", ["What is 2+3?", "Compute {x} for x=1", "", "多少 is 2+2", "a\nb"])
def test_format_prompt_r1_zero(question):
    prompt = format_prompt(question, "r1_zero")
    assert prompt == PAPER_TEXT.replace("{prompt}", question)
    assert prompt.endswith(f"User: {question}. Assistant:")


@pytest.mark.parametrize("question", ["What is 2+3?", "Compute {x}", ""])
def test_format_prompt_r1(question):
    assert format_prompt(question, "r1") == [{"role": "user", "content": question}]


@pytest.mark.parametrize("template", ["r2", "R1", "", None, "r1-zero"])
def test_unknown_template_lists_known_ones(template):
    with pytest.raises(UserError) as err:
        format_prompt("q", template)
    assert "r1_zero" in str(err.value) and "r1" in str(err.value)


def test_non_string_question_is_a_user_error():
    with pytest.raises(UserError):
        format_prompt(None, "r1")


class FakeTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|>" if kwargs.get("add_generation_prompt") else "")


def test_render_prompt_r1_uses_the_chat_template():
    tok = FakeTokenizer()
    assert render_prompt("What is 2+3?", "r1", tok) == "<|user|>What is 2+3?<|assistant|>"
    messages, kwargs = tok.calls[0]
    assert messages == [{"role": "user", "content": "What is 2+3?"}]
    assert kwargs == {"tokenize": False, "add_generation_prompt": True}


def test_render_prompt_r1_zero_needs_no_tokenizer():
    assert render_prompt("What is 2+3?", "r1_zero", None) == format_prompt("What is 2+3?", "r1_zero")
    assert render_prompt("What is 2+3?", "r1_zero", FakeTokenizer()) == format_prompt("What is 2+3?", "r1_zero")


def test_render_prompt_r1_without_chat_template_is_a_user_error():
    tok = FakeTokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        render_prompt("q", "r1", tok)
    with pytest.raises(UserError, match="tokenizer"):
        render_prompt("q", "r1", None)


@pytest.mark.parametrize(
    "completion, text",
    [
        ("plain", "plain"),
        ("", ""),
        ([{"role": "assistant", "content": "hi"}], "hi"),
        ({"role": "assistant", "content": "hi"}, "hi"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "ab"),
        ([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}, {"role": "assistant",
                                                                                     "content": "b"}], "a\nb"),
        ([{"content": "no role"}], "no role"),
        (None, ""),
        (42, ""),
        ([], ""),
        ([None], ""),
        ([{"role": "assistant", "content": None}], ""),
        ([[{"role": "assistant", "content": "nested"}]], ""),
        ({"x": 1}, ""),
    ],
)
def test_completion_text(completion, text):
    assert completion_text(completion) == text


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>2+3=5</think> The answer is \\boxed{5}.", "5"),
        ("<think>r</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("<think>r</think> \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("<think>r</think> \\boxed{{{1}}}", "{{1}}"),
        ("<think>r</think> \\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
        ("<think>r</think> \\boxed{1} then \\boxed{2}", "2"),  # several: the last counts
        ("<think>\\boxed{7}</think> so \\boxed{8}", "8"),
        ("<think>\\boxed{7}</think> no box here", None),  # boxes in the reasoning do not count
        ("<think>r</think> \\boxed{1} and \\boxed{2", "1"),  # an unclosed last box is skipped
        ("<think>r</think> \\boxed{ 12 }", "12"),
        ("<think>r</think> \\boxed {3}", "3"),
        ("<think>r</think> \\fbox{4}", "4"),
        ("<think>r</think> \\boxed{}", None),
        ("<think>r</think> <answer> 42 </answer>", "42"),
        ("<think>r</think> <answer>1</answer> <answer>2</answer>", "2"),
        ("<think>r</think> <answer>\\boxed{3}</answer>", "3"),
        ("<think>r</think> <answer></answer>", None),
        ("<think>r</think> <answer>5", None),  # unclosed answer tag
        ("<think>r \\boxed{5}", None),  # the reasoning never ended
        ("no tags at all, \\boxed{6}", "6"),  # no think block: whole text
        ("reasoning</think> \\boxed{9}", "9"),  # <think> opened by the prompt
        ("<think>a</think>b</think> \\boxed{10}", "10"),
        ("", None),
        ("<think></think>", None),
        ("just words", None),
        (None, None),
        (123, None),
        ([{"role": "assistant", "content": "<think>r</think> \\boxed{11}"}], "11"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed_long_text_is_fast():
    text = "x " * 50_000 + "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}"
    assert last_boxed(text) == "{" * 2000 + "1" + "}" * 2000


@pytest.mark.parametrize(
    "text, reasoning, summary",
    [
        ("<think>r</think>s", "r", "s"),
        ("<think>\nstep 1\nstep 2\n</think>\nSo \\boxed{3}.", "step 1\nstep 2", "So \\boxed{3}."),
        ("no think here", "", "no think here"),
        ("", "", ""),
        ("<think>never closed", "never closed", ""),
        ("prefilled reasoning</think> summary", "prefilled reasoning", "summary"),
        ("<think>a</think> b </think> c", "a b", "c"),  # summary: after the last </think>, no tags in either part
        ("<think>r</think>", "r", ""),
        ([{"role": "assistant", "content": "<think>r</think>s"}], "r", "s"),
    ],
)
def test_split_reasoning(text, reasoning, summary):
    assert split_reasoning(text) == (reasoning, summary)
