"""Brainstorm-list formatting/parsing and response cleaning, against hand-written expectations."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfmoe.data.parsing import (
    ParsedTasks,
    clean_response,
    format_task,
    format_task_list,
    is_header_line,
    parse_tasks,
)

FAST = settings(max_examples=200, deadline=None)

MCQ = "Which gas makes up most of Earth's atmosphere?\nA. Oxygen\nB. Nitrogen\nC. Carbon dioxide\nD. Argon"
CODE = (
    "def sum_even(nums: list[int]) -> int:\n"
    '    """Return the sum of the even numbers in nums.\n'
    "\n"
    "    >>> sum_even([1, 2, 3, 4])\n"
    "    6\n"
    '    """'
)
STOPS = ("### Instruction", "### Response", "\nTask ")


# ---------------------------------------------------------------- formatting


def test_format_task_exact():
    assert format_task(3, "  What is 2+2?\n") == "Task 3:\nWhat is 2+2?\n\n"


def test_format_task_list_exact():
    assert format_task_list(["a", "b"], start=1) == "Task 1:\na\n\nTask 2:\nb\n\nTask 3:\n"
    assert format_task_list([], start=4) == "Task 4:\n"


@pytest.mark.parametrize("complete", [True, False])
def test_format_then_parse_round_trip(complete):
    texts = ["What is the capital of France?", MCQ, CODE]
    prompt = format_task_list(texts, start=1)
    # The model sees the prompt up to "Task 1:"; everything after it is what parse_tasks gets.
    continuation = prompt[len("Task 1:") :]
    parsed = parse_tasks(continuation, first_number=1, complete=complete)
    assert parsed == ParsedTasks(items=texts, malformed=0, partial=0)


def _no_header_lines(text: str) -> bool:
    return not any(is_header_line(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


@FAST
@given(
    st.lists(
        st.text(st.characters(blacklist_characters="\r"), min_size=1).filter(
            lambda t: t.strip() and _no_header_lines(t.strip())
        ),
        max_size=6,
    ),
    st.integers(1, 50),
)
def test_round_trip_property(texts, start):
    prompt = format_task_list(texts, start=start)
    header = f"Task {start}:"
    parsed = parse_tasks(prompt[len(header) :], first_number=start, complete=False)
    if texts:
        assert parsed == ParsedTasks(items=[t.strip() for t in texts], malformed=0, partial=0)
    else:
        # No seed texts: the continuation is empty, i.e. an empty first item.
        assert parsed == ParsedTasks(items=[], malformed=1, partial=0)


# ---------------------------------------------------------------- parse_tasks on fixed strings


def test_good_three_items():
    text = " Name the largest planet.\n\nTask 5:\nWhat is 7 * 8?\n\nTask 6:\nWho wrote Hamlet?\n"
    assert parse_tasks(text, first_number=4, complete=True) == ParsedTasks(
        items=["Name the largest planet.", "What is 7 * 8?", "Who wrote Hamlet?"], malformed=0, partial=0
    )


def test_multiline_items_kept_whole():
    text = f"\n{MCQ}\n\nTask 5:\n{CODE}\n\nTask 6:\n"
    parsed = parse_tasks(text, first_number=4, complete=False)
    assert parsed == ParsedTasks(items=[MCQ, CODE], malformed=0, partial=0)


@pytest.mark.parametrize(
    "header",
    [
        "task 5.",
        "**Task 5:**",
        "**Task 5**:",
        "Task 5 -",
        "Task 5)",
        "TASK 5:",
        "Task5:",
        "  Task 5 :",
        "## Task 5:",
        "Task 5",
    ],
)
def test_drifted_headers(header):
    text = f"first\n\n{header}\nsecond\n\nTask 6:\nthird"
    assert parse_tasks(text, first_number=4, complete=True) == ParsedTasks(
        items=["first", "second", "third"], malformed=0, partial=0
    )


def test_crlf_newlines():
    text = "first\r\n\r\nTask 5:\r\nline one\r\nline two\r\n\r\nTask 6:\r\n"
    assert parse_tasks(text, first_number=4, complete=False) == ParsedTasks(
        items=["first", "line one\nline two"], malformed=0, partial=0
    )


def test_text_on_header_line_is_kept():
    text = "first\nTask 5: Compute 3 + 4.\nShow your work.\n**Task 6: Sort a list.**\n"
    assert parse_tasks(text, first_number=4, complete=True).items == [
        "first",
        "Compute 3 + 4.\nShow your work.",
        "Sort a list.",
    ]


def test_header_only_at_line_start():
    text = "Explain why Task 5: is not a header here.\nTask 5: real"
    assert parse_tasks(text, first_number=4, complete=True).items == [
        "Explain why Task 5: is not a header here.",
        "real",
    ]


def test_task_word_without_separator_is_text():
    text = "Task 5 requires a proof that sqrt(2) is irrational."
    assert parse_tasks(text, first_number=4, complete=True).items == [text]


@pytest.mark.parametrize("bad", ["Task 7:", "Task 4:", "Task 1:", "task 9."])
def test_out_of_sequence_header_ends_parsing(bad):
    text = f"first\n\nTask 5:\nsecond\n\n{bad}\nthird\n\nTask 6:\nfourth"
    for complete in (True, False):
        assert parse_tasks(text, first_number=4, complete=complete) == ParsedTasks(
            items=["first", "second"], malformed=1, partial=0
        )


def test_stacked_headers_are_malformed():
    text = "first\nTask 5: Task 6: second"
    assert parse_tasks(text, first_number=4, complete=True) == ParsedTasks(items=["first"], malformed=1, partial=0)


def test_empty_items_are_malformed():
    text = "first\n\nTask 5:\n\n   \nTask 6:\nthird"
    assert parse_tasks(text, first_number=4, complete=True) == ParsedTasks(
        items=["first", "third"], malformed=1, partial=0
    )
    assert parse_tasks("", first_number=4, complete=True) == ParsedTasks(items=[], malformed=1, partial=0)
    assert parse_tasks("\n\nTask 5:\nsecond", first_number=4, complete=True) == ParsedTasks(
        items=["second"], malformed=1, partial=0
    )


def test_truncated_last_item():
    text = "first\n\nTask 5:\nsecond\n\nTask 6:\nWhat is the derivative of"
    assert parse_tasks(text, first_number=4, complete=False) == ParsedTasks(
        items=["first", "second"], malformed=0, partial=1
    )
    assert parse_tasks(text, first_number=4, complete=True) == ParsedTasks(
        items=["first", "second", "What is the derivative of"], malformed=0, partial=0
    )
    # A single cut-off item.
    assert parse_tasks("What is", first_number=4, complete=False) == ParsedTasks(items=[], malformed=0, partial=1)


@pytest.mark.parametrize("ending", ["Task 6:", "Task 6:\n", "Task 6:\n\n  ", "**Task 6:**"])
def test_ending_with_bare_header_is_not_partial(ending):
    text = f"first\n\nTask 5:\nsecond\n\n{ending}"
    for complete in (True, False):
        assert parse_tasks(text, first_number=4, complete=complete) == ParsedTasks(
            items=["first", "second"], malformed=0, partial=0
        )


# ---------------------------------------------------------------- parse_tasks properties

_HEADERS = st.builds(
    lambda pre, word, sp, n, sep, post: f"{pre}{word}{sp}{n}{sep}{post}",
    st.sampled_from(["", " ", "**", "## "]),
    st.sampled_from(["Task", "task", "TASK"]),
    st.sampled_from(["", " "]),
    st.integers(0, 12),
    st.sampled_from([":", ".", ")", " -", ":**", ""]),
    st.sampled_from(["", " ", " some text", "\r"]),
)
_LINES = st.one_of(_HEADERS, st.text(max_size=30), st.sampled_from(["", " ", "A. yes", "def f(x):"]))
_DOCS = st.one_of(st.text(), st.lists(_LINES, max_size=12).map("\n".join))


def _check_parsed(parsed: ParsedTasks, complete: bool) -> None:
    assert isinstance(parsed.items, list)
    assert parsed.malformed >= 0
    assert parsed.partial in (0, 1)
    if complete:
        assert parsed.partial == 0
    # The first item always exists, so something is always accounted for, and the tail after
    # a broken header counts once: a bound on how much can be reported.
    assert len(parsed.items) + parsed.malformed + parsed.partial >= 1
    for item in parsed.items:
        assert isinstance(item, str)
        assert item and item == item.strip()
        assert "\r" not in item
        for line in item.split("\n"):
            assert not is_header_line(line)
            assert not re.match(r"\s*task\s*\d+\s*:", line, re.I | re.A)


@FAST
@given(_DOCS, st.integers(-3, 10), st.booleans())
def test_parse_never_raises_and_is_consistent(text, first, complete):
    parsed = parse_tasks(text, first_number=first, complete=complete)
    _check_parsed(parsed, complete)
    # Each header opens at most one item, plus the headerless first item.
    unix = text.replace("\r\n", "\n").replace("\r", "\n")
    n_headers = sum(is_header_line(line) for line in unix.split("\n"))
    total = len(parsed.items) + parsed.malformed + parsed.partial
    assert total <= 1 + n_headers
    if n_headers == 0:
        # No header at all: the whole text is the one (possibly cut-off or empty) item.
        assert total == 1
        assert parsed.items == ([unix.strip()] if complete and unix.strip() else [])
    # Truncation only ever removes the last item.
    full = parse_tasks(text, first_number=first, complete=True)
    assert parsed.items == full.items[: len(parsed.items)]
    assert len(full.items) - len(parsed.items) == parsed.partial


# ---------------------------------------------------------------- clean_response


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 4.\n\n### Instruction:\nWhat is 3+3?", "The answer is 4."),
        ("The answer is 4.\n### Response:\n6", "The answer is 4."),
        ("The answer is B.\nTask 12: more", "The answer is B."),
        ("  def f(x):\n    return x\n", "def f(x):\n    return x"),
        ("### Instruction:\nfoo", ""),
        ("### Response", ""),
        ("", ""),
        ("Answer.\n### Response:\nx\n### Instruction:\ny", "Answer."),  # earliest marker wins
        ("Answer.\n### Instruction:\nx\n### Response:\ny", "Answer."),
    ],
)
def test_clean_response(text, expected):
    assert clean_response(text, stop_markers=STOPS) == expected


def test_clean_response_ignores_empty_marker():
    assert clean_response(" keep me ", stop_markers=["", "###"]) == "keep me"
    assert clean_response(" keep me ", stop_markers=[]) == "keep me"


@FAST
@given(
    st.one_of(
        st.text(),
        st.lists(st.one_of(st.text(max_size=20), st.sampled_from([*STOPS, "###", "\n", "Task "]))).map("".join),
    ),
    st.lists(st.one_of(st.sampled_from(STOPS), st.text(max_size=4)), max_size=4),
)
def test_clean_response_property(text, markers):
    out = clean_response(text, stop_markers=markers)
    assert out == out.strip()
    assert text.find(out) != -1
    for marker in markers:
        if marker:
            assert marker not in out
