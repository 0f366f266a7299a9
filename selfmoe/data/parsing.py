"""Prompt formatting and output parsing for instruction brainstorming and response generation.

The brainstorming prompt shows seed tasks as a numbered list and ends with the header of the
next task, so the base model continues the list (PAPER.md §1.1 step 1)::

    Task 1:
    <instruction, possibly several lines>

    Task 2:
    ...

    Task 4:

:func:`parse_tasks` splits the model's continuation back into task texts. Base models drift
from the format (lower case, markdown bold, other separators, CRLF), stop mid-item when they
hit the token limit, or skip numbers; the parser tolerates the drift, and counts what it drops
so the pipeline can report it. :func:`clean_response` trims a response at the point where the
model starts writing the next few-shot demonstration.

Nothing here raises on model output: any string parses to some (possibly empty) result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "HEADER_RE",
    "ParsedTasks",
    "clean_response",
    "format_task",
    "format_task_list",
    "is_header_line",
    "parse_tasks",
]

# One line (no "\n" inside) that opens a task. Accepted drift: leading whitespace or markdown
# ("**", "##", "> ", "- "), any case of "task", optional spaces before the number, and after it
# one of ":" "." ")" "-" (or nothing but the end of the line), possibly wrapped in bold markers:
# "Task 5:", "task 5.", "**Task 5:**", "**Task 5**:", "Task 5 -", "TASK5)".
# "Task" is spelled out by character class instead of re.I because re.I also folds the
# Kelvin sign and the long s into "k"/"s"; \s stays Unicode-aware on purpose so that every
# character str.strip() removes also counts as leading whitespace here (items are stripped,
# and a stripped item must never start with something that reads as a header).
HEADER_RE = re.compile(
    r"^\s*(?:[*_#>\-]+\s*)?"  # markdown bullet / bold / heading prefix
    r"[Tt][Aa][Ss][Kk]\s*([0-9]+)\s*"  # "Task 5"
    r"(?:[*_]+\s*)?"  # closing bold before the separator: "**Task 5**:"
    r"(?:[:.)\-\u2013\u2014](?:\s*[*_]+(?=\s|$))?|$)"  # separator (+ closing bold), or end of line
    r"\s*(.*)$"  # text on the header line itself
)


def is_header_line(line: str) -> bool:
    """Whether one line (without its newline) would be read as a task header by :func:`parse_tasks`."""
    return HEADER_RE.match(line) is not None


def format_task(number: int, text: str) -> str:
    """One list entry: ``"Task {number}:\\n{text}\\n\\n"`` with ``text`` stripped."""
    return f"Task {number}:\n{text.strip()}\n\n"


def format_task_list(texts: Sequence[str], start: int = 1) -> str:
    """All ``texts`` numbered from ``start``, then the open header of the next task for the model to fill."""
    body = "".join(format_task(start + i, t) for i, t in enumerate(texts))
    return f"{body}Task {start + len(texts)}:\n"


@dataclass
class ParsedTasks:
    """What :func:`parse_tasks` recovered from one continuation.

    ``items`` are the complete, non-empty task texts in order. ``malformed`` counts empty
    items plus, as a single unit, an out-of-sequence header and everything after it.
    ``partial`` is 1 when the last item was dropped because the generation hit the token limit.
    """

    items: list[str]
    malformed: int = 0
    partial: int = 0


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_tasks(text: str, *, first_number: int, complete: bool) -> ParsedTasks:
    """Split a brainstorming continuation into task texts.

    ``text`` is only what the model generated after the prompt's open header
    ``"Task {first_number}:"``, so the first item has no header of its own; each later item
    must start with a header line carrying the next number. A header with any other number
    ends parsing, and it and everything after it count as one malformed unit (the model has
    lost the list). Text after the number on a header line belongs to that item.

    ``complete=False`` means the generation stopped at the token limit, so the last item is
    presumably cut off: it is dropped and counted as ``partial``. A dangling header with no
    text after it (the model stopped right after opening the next task) is not an item; it is
    ignored in both modes, and a truncated generation ending that way has nothing partial.

    Never raises on any string.
    """
    lines = _normalize_newlines(text).split("\n")
    # Each item is (lines, opened_by_header); the first item continues the prompt's open header.
    items: list[tuple[list[str], bool]] = [([], False)]
    expected = first_number + 1
    broken = False
    for line in lines:
        match = HEADER_RE.match(line)
        if match is None:
            items[-1][0].append(line)
            continue
        rest = match.group(2)
        if line.lstrip().startswith("**") and rest.rstrip().endswith("**"):
            # "**Task 5: Compute the sum**": the closing bold is markup, not task text.
            rest = rest.rstrip()[:-2]
        if int(match.group(1)) != expected or HEADER_RE.match(rest) is not None:
            # Out of sequence (a repeat, a skip, a restart at 1) or a header stacked on a header.
            broken = True
            break
        items.append(([rest], True))
        expected += 1

    malformed = 1 if broken else 0
    partial = 0
    texts = ["\n".join(item_lines).strip() for item_lines, _ in items]
    last_text, last_has_header = texts[-1], items[-1][1]
    if not broken:
        if last_has_header and not last_text:
            # Ends with a bare new header: the item before it is finished, the new one never began.
            texts.pop()
        elif not complete and last_text:
            texts.pop()
            partial = 1
    kept = [t for t in texts if t]
    malformed += len(texts) - len(kept)
    return ParsedTasks(items=kept, malformed=malformed, partial=partial)


def clean_response(text: str, *, stop_markers: Sequence[str]) -> str:
    """Cut a generated response at the earliest stop marker and strip it; ``""`` if nothing is left.

    Few-shot prompts show demonstrations as ``"### Instruction:\\n...\\n\\n### Response:\\n..."``,
    and a base model that has answered tends to go on writing the next demonstration, so
    everything from the first marker on (e.g. ``"### Instruction"``, ``"### Response"``,
    ``"\\nTask "``) is discarded. Empty markers are ignored (they would cut everything).
    """
    cut = len(text)
    for marker in stop_markers:
        if not marker:
            continue
        pos = text.find(marker)
        if 0 <= pos < cut:
            cut = pos
    return text[:cut].strip()
