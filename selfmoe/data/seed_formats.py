"""Seed format converters: source rows -> :class:`Example` in the canonical per-domain format.

The canonical format is the one the shipped seeds use, so that seeds and self-generated data
look alike:

- knowledge (``mmlu``): ``"{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}"`` ->
  ``"The answer is {letter}."``
- reasoning (``bbh``): the task input -> ``"... So the answer is {target}."``
- math (``gsm8k``): the question -> the worked solution ending ``"The answer is {N}."``
- coding (``mbpp``): a HumanEval-style prompt (imports, ``def`` line, docstring with the task
  text and ``>>>`` examples) -> the complete function; ``meta`` holds ``entry_point`` and ``tests``.
- ``plain``: rows that already are selfmoe :class:`Example` rows.

A converter reads its source columns by role (:data:`ROLES`, each overridable with another column),
raises :class:`MissingField` or :class:`BadRow` for rows it cannot use and returns None for rows
it skips. Ids name the source row (``gsm8k/train/17``, ``bbh/navigate/3``, ``mbpp/601``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from selfmoe.data.schema import Example

__all__ = [
    "FORMATS",
    "ROLES",
    "SCHEMAS",
    "BadRow",
    "MissingField",
    "RowContext",
    "convert",
    "gsm8k_output",
    "humaneval_prompt",
    "mmlu_instruction",
]

# The roles (source columns) each converter reads. A role reads the column of its own name
# unless ``RowContext.fields`` maps it to another.
ROLES: dict[str, tuple[str, ...]] = {
    "plain": ("id", "instruction", "output", "input"),
    "mmlu": ("question", "choices", "answer", "subject"),
    "bbh": ("input", "target"),
    "gsm8k": ("question", "answer"),
    "mbpp": ("task_id", "text", "code", "test_list", "test_setup_code"),
}
_OPTIONAL_ROLES = {"input", "subject", "test_setup_code"}
# The expected source schema of each format, for error messages.
SCHEMAS = {
    "plain": "selfmoe Example rows: id, instruction, output (str); optional input, source, meta",
    "mmlu": "cais/mmlu rows: question (str), choices (list of 4 str), answer (index 0-3 or letter); optional subject",
    "bbh": 'BIG-Bench Hard: a task file {"canary": ..., "examples": [{"input", "target"}]} or rows with input, target',
    "gsm8k": "openai/gsm8k rows: question (str), answer (str: reasoning, final line '#### N')",
    "mbpp": "mbpp (config full) rows: task_id, text, code (str), test_list (list of assert strings); "
    "optional test_setup_code",
}
FORMATS = tuple(ROLES)


class MissingField(Exception):
    """A row lacks the column a required role reads."""

    def __init__(self, role: str, column: str) -> None:
        super().__init__(role, column)
        self.role, self.column = role, column


class BadRow(Exception):
    """A row has the fields but a value the converter cannot use."""


@dataclass(frozen=True)
class RowContext:
    """What a converter needs besides the row: format, target domain, split, pool task, field overrides."""

    format: str
    domain: str
    split: str
    task: str  # BBH task / hub config; "" for a single table
    fields: Mapping[str, str]

    def column(self, role: str) -> str:
        return self.fields.get(role, role)

    def get(self, row: Mapping[str, Any], role: str) -> Any:
        column = self.column(role)
        if row.get(column) is None:
            if role in _OPTIONAL_ROLES:
                return None
            raise MissingField(role, column)
        return row[column]

    def text(self, row: Mapping[str, Any], role: str) -> str:
        value = self.get(row, role)
        if not isinstance(value, str):
            raise BadRow(f"field {self.column(role)!r} must be a string, got {type(value).__name__}")
        return value


def convert(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example | None:
    """Row ``index`` of a pool in ``ctx.format``, converted; None when the row is skipped."""
    return _CONVERTERS[ctx.format](row, index, ctx)


def _convert_plain(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example:
    data = dict(row)
    for role in ROLES["plain"]:
        value = ctx.get(row, role)
        if value is not None:
            data[role] = value
    try:
        return Example.from_dict(data, domain=ctx.domain)
    except (ValueError, TypeError) as exc:
        raise BadRow(str(exc)) from None


# MMLU ------------------------------------------------------------------------


def mmlu_instruction(question: str, choices: Sequence[str]) -> str:
    """The canonical knowledge instruction: the question, then one ``"A. ..."`` line per choice."""
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{options}"


def _convert_mmlu(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example:
    row = _unwrap_mmlu(row, ctx)
    question = ctx.text(row, "question")
    choices = _mmlu_choices(row, ctx)
    letter = _mmlu_letter(ctx.get(row, "answer"), len(choices))
    subject = ctx.get(row, "subject")
    subject = str(subject).strip() if subject else ""
    return Example(
        id=f"mmlu/{subject}/{index}" if subject else f"mmlu/{index}",
        domain=ctx.domain,
        instruction=mmlu_instruction(question, choices),
        output=f"The answer is {letter}.",
        source="mmlu",
        meta={"subject": subject} if subject else {},
    )


def _unwrap_mmlu(row: Mapping[str, Any], ctx: RowContext) -> Mapping[str, Any]:
    # Some cais/mmlu revisions nest auxiliary_train rows as {"train": {question, choices, ...}}.
    column = ctx.column("question")
    if column not in row and len(row) == 1:
        (inner,) = row.values()
        if isinstance(inner, Mapping) and column in inner:
            return inner
    return row


def _mmlu_choices(row: Mapping[str, Any], ctx: RowContext) -> list[str]:
    column = ctx.column("choices")
    if "," in column:
        # Mirrors that keep one column per option (A, B, C, D): fields={choices: "A,B,C,D"}.
        names = [c.strip() for c in column.split(",")]
        missing = [c for c in names if c not in row]
        if missing:
            raise MissingField("choices", missing[0])
        choices = [row[c] for c in names]
    else:
        choices = ctx.get(row, "choices")
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= 26:
        raise BadRow(f"field {column!r} must be a list of 2-26 options, got {choices!r}")
    return [str(c).strip() for c in choices]


def _mmlu_letter(answer: Any, n_choices: int) -> str:
    if isinstance(answer, str):
        answer = answer.strip()
        if answer.isdigit():
            answer = int(answer)
        elif len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < n_choices:
        raise BadRow(f"answer must be an index 0-{n_choices - 1} or a letter, got {answer!r}")
    return chr(ord("A") + answer)


# BBH -------------------------------------------------------------------------


def _convert_bbh(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example:
    task = ctx.task or "bbh"
    target = ctx.get(row, "target")
    return Example(
        id=f"bbh/{task}/{index}",
        domain=ctx.domain,
        instruction=ctx.text(row, "input").strip(),
        output=f"So the answer is {str(target).strip()}.",
        source="bbh",
        meta={"task": task},
    )


# GSM8K -----------------------------------------------------------------------

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.M)


def gsm8k_output(answer: str) -> str:
    """A GSM8K answer in the canonical math format.

    Calculator annotations ``<<48/2=24>>`` are removed and the final ``#### N`` line becomes
    ``The answer is N.`` (thousands separators dropped so N parses as a number). Raises
    ValueError when there is no ``#### N`` line.
    """
    text = _CALC.sub("", answer.replace("\r\n", "\n"))
    finals = list(_FINAL.finditer(text))
    if not finals or not finals[-1].group(1):
        raise ValueError("no final '#### N' line")
    final = finals[-1]
    number = final.group(1).replace(",", "")
    body = "\n".join(line.rstrip() for line in text[: final.start()].strip().splitlines())
    return f"{body}\nThe answer is {number}." if body else f"The answer is {number}."


def _convert_gsm8k(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example:
    question = ctx.text(row, "question").strip()
    try:
        output = gsm8k_output(ctx.text(row, "answer"))
    except ValueError as exc:
        raise BadRow(f"field {ctx.column('answer')!r}: {exc}") from None
    return Example(
        id=f"gsm8k/{ctx.split}/{index}",
        domain=ctx.domain,
        instruction=question,
        output=output,
        source="gsm8k",
    )


# MBPP -> HumanEval -----------------------------------------------------------


def humaneval_prompt(
    signature: str,
    description: str,
    examples: Sequence[tuple[str, str]] = (),
    other_tests: Sequence[str] = (),
    imports: Sequence[str] = (),
) -> str:
    """The canonical coding instruction, a HumanEval-style prompt.

    ``imports`` (then two blank lines), the ``def`` line, and a docstring holding the
    description, one ``>>> call`` / ``expected`` pair per example, and any other tests verbatim
    under ``Tests:``. No trailing newline.
    """
    ind = "    "
    text = description.strip().replace('"""', "'''").splitlines() or [""]
    doc = [f'{ind}"""{text[0]}', *(_indent(line, ind) for line in text[1:])]
    for call, expected in examples:
        first, *rest = call.splitlines()
        doc.append(f"{ind}>>> {first}")
        doc.extend(f"{ind}... {line}" for line in rest)
        doc.extend(_indent(line, ind) for line in expected.splitlines())
    if other_tests:
        doc += ["", f"{ind}Tests:", *(_indent(t.strip(), ind) for t in other_tests)]
    doc.append(f'{ind}"""')
    head = "\n".join(imports) + "\n\n\n" if imports else ""
    return f"{head}{signature.rstrip()}\n" + "\n".join(doc)


def _indent(line: str, ind: str) -> str:
    return ind + line if line.strip() else ""


def _normalize_code(code: str) -> str:
    code = code.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return "\n".join(line.rstrip() for line in code.split("\n")).strip("\n")


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


_FunctionDef = ast.FunctionDef | ast.AsyncFunctionDef


def _top_level_defs(code: str, tree: ast.Module | None) -> dict[str, _FunctionDef | None]:
    if tree is not None:
        return {n.name: n for n in tree.body if isinstance(n, _FunctionDef)}
    # Unparsable code (a stray Python 2 line): fall back to column-0 def lines.
    return dict.fromkeys(re.findall(r"^(?:async\s+)?def\s+([A-Za-z_]\w*)", code, re.M))


def _called_names(test: str) -> list[str]:
    """Names of plain function calls in ``test``, in source order."""
    tree = _parse(test.strip())
    if tree is None:
        return re.findall(r"([A-Za-z_]\w*)\s*\(", test)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [n.func.id for n in calls]  # type: ignore[attr-defined]


def _entry_point(tests: Sequence[str], defs: Mapping[str, Any]) -> str | None:
    """The first function the first test calls that ``code`` defines."""
    if not tests:
        return None
    return next((name for name in _called_names(tests[0]) if name in defs), None)


def _signature(code: str, name: str, node: _FunctionDef | None) -> str | None:
    """The entry point's ``def`` line(s) as written in ``code``."""
    lines = code.split("\n")
    if node is None:
        start = next((i for i, line in enumerate(lines) if re.match(rf"(?:async\s+)?def\s+{name}\s*\(", line)), None)
        if start is None:
            return None
        end = len(lines)
    else:
        start, end = node.lineno - 1, node.body[0].lineno - 1
        if end == start:
            # One-line function ("def f(x): return x"): rebuild the header from the AST.
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            return f"def {name}({ast.unparse(node.args)}){returns}:"
    # The header may span lines; it ends where "<header>\n    pass" first parses.
    for stop in range(start + 1, end + 1):
        header = "\n".join(lines[start:stop]).rstrip()
        if _parse(header + "\n    pass") is not None:
            return header
    return None


def _imports(code: str, tree: ast.Module | None) -> list[str]:
    if tree is None:
        return re.findall(r"^(?:import\s+\S.*|from\s+\S+\s+import\s+.*)$", code, re.M)
    nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return [s for n in nodes if (s := ast.get_source_segment(code, n))]


def _as_doctest(test: str, entry_point: str) -> tuple[str, str] | None:
    """``assert f(args) == expected`` -> ``("f(args)", "expected")``; None for other shapes."""
    src = test.strip()
    tree = _parse(src)
    if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert) or tree.body[0].msg:
        return None
    cmp = tree.body[0].test
    if not (isinstance(cmp, ast.Compare) and len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq)):
        return None
    call = cmp.left
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == entry_point):
        return None
    left, right = ast.get_source_segment(src, call), ast.get_source_segment(src, cmp.comparators[0])
    return (left, right) if left and right else None


def _convert_mbpp(row: Mapping[str, Any], index: int, ctx: RowContext) -> Example | None:
    task_id = ctx.get(row, "task_id")
    text = ctx.text(row, "text")
    code = _normalize_code(ctx.text(row, "code"))
    tests = ctx.get(row, "test_list")
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        raise BadRow(f"field {ctx.column('test_list')!r} must be a list of assert strings, got {tests!r}")
    tests = [t.strip() for t in tests]
    tree = _parse(code)
    defs = _top_level_defs(code, tree)
    entry = _entry_point(tests, defs)
    signature = _signature(code, entry, defs[entry]) if entry else None
    if entry is None or signature is None:
        return None
    pairs = [(test, _as_doctest(test, entry)) for test in tests]
    examples = [pair for _, pair in pairs if pair is not None]
    others = [test for test, pair in pairs if pair is None]
    meta: dict[str, Any] = {"entry_point": entry, "tests": tests, "task_id": task_id}
    setup = ctx.get(row, "test_setup_code")
    if isinstance(setup, str) and setup.strip():
        meta["test_setup_code"] = _normalize_code(setup)
    return Example(
        id=f"mbpp/{task_id}",
        domain=ctx.domain,
        instruction=humaneval_prompt(signature, text, examples, others, _imports(code, tree)),
        output=code,
        source="mbpp",
        meta=meta,
    )


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], int, RowContext], Example | None]] = {
    "plain": _convert_plain,
    "mmlu": _convert_mmlu,
    "bbh": _convert_bbh,
    "gsm8k": _convert_gsm8k,
    "mbpp": _convert_mbpp,
}
