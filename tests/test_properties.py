"""Property tests (hypothesis) of what reads model output: the "Task N:" parser, response cleaning,
the filters, and the generation loop that ties them into rows.

On any text (Unicode, control characters, empty or huge strings, and text that looks like the
list format with wrong, repeated or missing numbers, markdown and odd newlines) nothing raises,
and every row that comes out keeps the schema: it survives Example.from_dict(to_dict()) and a
write_jsonl/read_jsonl round trip unchanged, with the non-empty fields a kept item needs.

Text is drawn from valid Unicode without lone surrogates, because model output is decoded text;
a surrogate can only come from a ``\\ud800`` escape in a file, which the schema rejects as a broken
line (tests/test_bad_lines.py). Runs are derandomized: the same examples every time, so CI is stable.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

from fake_generation import DATA, DOMAIN, SEEDS
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from selfmoe.data.filters import InstructionFilter, check_response, normalize
from selfmoe.data.generation import Completion, Throughput
from selfmoe.data.parsing import clean_response, is_header_line, parse_tasks
from selfmoe.data.prompts import RESPONSE_STOPS
from selfmoe.data.schema import Example, read_jsonl, write_jsonl
from selfmoe.data.selfgen import self_generate

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHARS = st.characters(blacklist_categories=("Cs",))  # every code point a decoder can produce
ODD = ["\n", "\n\n", "\r\n", "\r", "\t", " ", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u200b", "\ufeff",
       "**", "##", "> ", "- ", "###", "### Instruction:", "### Response:", "Task", "TASK", "task", "Taſk", "K",
       "é", "数学", "🙂", "1.", "2)", "def f(x):", "The answer is 3.", "what is two plus two today"]  # fmt: skip
HEADER = st.builds(
    lambda pre, n, sep: f"{pre}Task {n}{sep}",
    st.sampled_from(["", "**", "## ", "> ", "- ", "  ", "\t"]),
    st.integers(-2, 40),
    st.sampled_from([":", ".", ")", " -", "", ":**", "**:", "\u2013"]),
)
PIECE = st.one_of(st.text(CHARS, max_size=40), st.sampled_from(ODD), HEADER)
FORMAT_LIKE = st.lists(PIECE, max_size=40).map("".join)
HUGE = st.builds(lambda s, n: s * n, st.text(CHARS, min_size=1, max_size=6), st.integers(2_000, 30_000))
TEXT = st.one_of(st.just(""), st.text(CHARS, max_size=300), FORMAT_LIKE, HUGE)


def lines_of(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# --- the parser and response cleaning -----------------------------------------------------------------


@PROPERTY
@given(TEXT, st.integers(0, 50), st.booleans())
def test_parse_tasks_on_any_text(text, first, complete):
    parsed = parse_tasks(text, first_number=first, complete=complete)
    assert parsed.malformed >= 0 and parsed.partial in (0, 1)
    assert not (complete and parsed.partial)
    assert len(parsed.items) + parsed.partial <= len(lines_of(text))
    for item in parsed.items:
        assert item and item == item.strip()
        assert not is_header_line(lines_of(item)[0]), item  # an item never starts with a header


@PROPERTY
@given(TEXT, st.lists(st.one_of(st.sampled_from(RESPONSE_STOPS), st.text(CHARS, max_size=5)), max_size=4))
def test_clean_response_on_any_text(text, markers):
    cleaned = clean_response(text, stop_markers=markers)
    assert cleaned == cleaned.strip() and cleaned in text
    assert not any(m and m in cleaned for m in markers)


# --- the filters --------------------------------------------------------------------------------------


@PROPERTY
@given(
    st.lists(TEXT, max_size=12),
    st.lists(st.text(CHARS, max_size=60), max_size=4),
    st.floats(0.05, 1.0),
    st.integers(0, 5),
    st.integers(0, 80),
    st.one_of(st.none(), st.sampled_from([r"\d", "answer", "^", "(?i)what"])),
)
def test_instruction_filter_on_any_text(candidates, seeds, threshold, lo, hi, pattern):
    keep = InstructionFilter(seeds, rouge_threshold=threshold, min_words=lo, max_words=hi, pattern=pattern)
    reasons = [keep(c) for c in candidates]
    assert sum(keep.counts.values()) == len(candidates)
    accepted = [c for c, r in zip(candidates, reasons, strict=True) if r is None]
    assert accepted == keep.accepted
    seed_norms = {normalize(s) for s in seeds}
    for text in accepted:
        assert text.strip() and lo <= len(text.split()) <= hi
        assert pattern is None or re.search(pattern, text, re.S)
        assert normalize(text) not in seed_norms
    assert len({normalize(t) for t in accepted}) == len(accepted)


@PROPERTY
@given(TEXT, st.integers(0, 5), st.integers(0, 200), st.one_of(st.none(), st.just("answer is")))
def test_check_response_on_any_text(text, lo, hi, pattern):
    if check_response(text, min_words=lo, max_words=hi, pattern=pattern) is None:
        assert text.strip() and lo <= len(text.split()) <= hi
        assert pattern is None or pattern in text


# --- the generation loop: whatever the model writes, rows keep the schema -----------------------------

NEXT = "\x00NEXT\x00"  # replaced by the header of the task that should come next in this prompt's list
OPEN = re.compile(r"Task (\d+):\n\Z")


class ScriptedModel:
    """Duck-types TextGenerator: plays drawn texts back in turn (tokens = words)."""

    def __init__(self, brainstorms: list[tuple[str, bool]], responses: list[tuple[str, bool]]) -> None:
        self.brainstorms, self.responses = brainstorms or [("", True)], responses or [("", True)]
        self.calls = 0
        self.throughput = Throughput()
        self.context_length = None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, **options) -> list[Completion]:
        out = []
        for prompt in prompts:
            pool = self.brainstorms if options["do_sample"] else self.responses
            text, complete = pool[self.calls % len(pool)]
            self.calls += 1
            if options["do_sample"]:
                number = int(OPEN.search(prompt).group(1))
                while NEXT in text:
                    number += 1
                    text = text.replace(NEXT, f"\n\nTask {number}:\n", 1)
            out.append(Completion(text=text, complete=complete, num_tokens=len(text.split())))
        return out


VOCAB = ["compute", "the", "sum", "of", "apples", "pears", "twice", "Task", "answer", "is", "why", "how", "many",
         "**", "é", "数学", "\x00", "7", "-", "###", "Instruction:"]  # fmt: skip
SENTENCE = st.lists(st.sampled_from(VOCAB), min_size=3, max_size=14).map(" ".join)  # often a usable task
# Mostly well-formed lists, so that some items make it through every filter; PIECE adds the drift.
WELL_FORMED = st.lists(st.tuples(SENTENCE, st.just(NEXT)).map("".join), min_size=1, max_size=5).map("".join)
BRAINSTORM = st.tuples(
    st.lists(st.one_of(WELL_FORMED, WELL_FORMED, SENTENCE, PIECE, st.just(NEXT)), max_size=8).map("".join),
    st.one_of(st.just(True), st.booleans()),
)
ANSWER = st.builds("{} The answer is {}.{}".format, st.text(CHARS, max_size=30), st.integers(), TEXT)
RESPONSE = st.tuples(st.one_of(TEXT, ANSWER, ANSWER), st.one_of(st.just(True), st.booleans()))
REASONS = {"response_truncated", "empty_response", "response_too_short", "response_too_long",
           "response_bad_format", "prompt_overlong"}  # fmt: skip


@settings(PROPERTY, max_examples=100)
@given(st.lists(BRAINSTORM, min_size=1, max_size=30), st.lists(RESPONSE, min_size=1, max_size=8))
def test_generated_rows_always_keep_the_schema(brainstorms, responses):
    data = replace(DATA, max_idle_batches=1, max_brainstorm_batches=6)
    result = self_generate(ScriptedModel(brainstorms, responses), DOMAIN, SEEDS, data, target=5, seed=0)
    rows = [*result.items, *result.rejected]
    event(f"kept {min(len(result.items), 2)}+, rejected {min(len(result.rejected), 2)}+")
    assert len({r.id for r in rows}) == len(rows)
    for row in rows:
        assert Example.from_dict(row.to_dict()) == row
        assert row.domain == DOMAIN.name and row.instruction and row.instruction == row.instruction.strip()
    checks = DOMAIN.checks
    for item in result.items:
        assert item.meta == {} and item.output and item.output == item.output.strip()
        assert checks.min_instruction_words <= len(item.instruction.split()) <= checks.max_instruction_words
        assert re.search(checks.response_pattern, item.output, re.S)
        assert not any(stop in item.output for stop in RESPONSE_STOPS)
    assert all(r.meta["drop"] in REASONS for r in result.rejected)
    assert sum(Counter(r.meta["drop"] for r in result.rejected).values()) == len(result.rejected)
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "raw.jsonl", rows)
        assert read_jsonl(Path(tmp) / "raw.jsonl") == rows
