"""Seed loaders: the ~100 examples per domain that start self-specialization (PAPER.md §1.1).

A seed source is a local file/directory, a hub dataset, or the seeds shipped with the package
(``pkg://seeds/<domain>.jsonl``). Each source format has a converter that renders rows in the
canonical per-domain format, the same format the shipped seeds use, so that seeds and
self-generated data look alike:

- knowledge (``mmlu``): ``"{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}"`` ->
  ``"The answer is {letter}."``
- reasoning (``bbh``): the task input -> ``"... So the answer is {target}."``
- math (``gsm8k``): the question -> the worked solution ending ``"The answer is {N}."``
- coding (``mbpp``): a HumanEval-style prompt (imports, ``def`` line, docstring with the task
  text and ``>>>`` examples) -> the complete function; ``meta`` holds ``entry_point`` and ``tests``.

Seed ids name their source row (``gsm8k/train/17``, ``bbh/navigate/3``, ``mbpp/601``), so the
rows used as seeds can be recorded and excluded from evaluation. Sampling uses a private
``random.Random(seed)`` and is deterministic.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfmoe.data.schema import Example, read_jsonl_report
from selfmoe.errors import DataError, OfflineError

__all__ = [
    "FORMATS",
    "PKG_PREFIX",
    "SEEDS_DIR",
    "SeedSource",
    "gsm8k_output",
    "humaneval_prompt",
    "load_seeds",
    "mmlu_instruction",
    "seed_ids",
    "shipped_seed_source",
]

log = logging.getLogger(__name__)

SEEDS_DIR = Path(__file__).resolve().parent / "seeds"
PKG_PREFIX = "pkg://"
_PKG_ROOT = Path(__file__).resolve().parent

# Source columns each converter reads, by role; ``source.fields`` overrides them per role.
_DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "plain": {"id": "id", "instruction": "instruction", "output": "output", "input": "input"},
    "mmlu": {"question": "question", "choices": "choices", "answer": "answer", "subject": "subject"},
    "bbh": {"input": "input", "target": "target"},
    "gsm8k": {"question": "question", "answer": "answer"},
    "mbpp": {
        "task_id": "task_id",
        "text": "text",
        "code": "code",
        "test_list": "test_list",
        "test_setup_code": "test_setup_code",
    },
}
_OPTIONAL_ROLES = {"input", "subject", "test_setup_code"}
_SCHEMAS = {
    "plain": "selfmoe Example rows: id, instruction, output (str); optional input, source, meta",
    "mmlu": "cais/mmlu rows: question (str), choices (list of 4 str), answer (index 0-3 or letter); optional subject",
    "bbh": 'BIG-Bench Hard: a task file {"canary": ..., "examples": [{"input", "target"}]} or rows with input, target',
    "gsm8k": "openai/gsm8k rows: question (str), answer (str: reasoning, final line '#### N')",
    "mbpp": "mbpp (config full) rows: task_id, text, code (str), test_list (list of assert strings); "
    "optional test_setup_code",
}
FORMATS = tuple(_DEFAULT_FIELDS)

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
# "owner/name" or "name": anything else (absolute, relative with dots, nested, file suffix) is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".gz")


@dataclass
class SeedSource:
    """A seed source; any object with these attributes (e.g. an OmegaConf node) works as well."""

    path: str | None = None
    name: str | None = None
    split: str = "train"
    format: str = "plain"
    fields: dict[str, str] = field(default_factory=dict)
    subsets: list[str] = field(default_factory=list)


def shipped_seed_source(domain: str) -> SeedSource:
    """The source for the seeds shipped with selfmoe for ``domain`` (``pkg://seeds/<domain>.jsonl``)."""
    return SeedSource(path=f"{PKG_PREFIX}seeds/{domain}.jsonl", format="plain")


def seed_ids(examples: Iterable[Example]) -> list[str]:
    """The ids of ``examples`` in order, for recording which source rows served as seeds."""
    return [e.id for e in examples]


def load_seeds(domain: str, source: Any, *, count: int, seed: int) -> list[Example]:
    """Load ``count`` seed examples for ``domain`` from ``source``, converted to the canonical format.

    ``source`` has ``path``, ``name``, ``split``, ``format``, ``fields`` and ``subsets`` (see
    :class:`SeedSource`). The draw is deterministic in ``seed``; several subsets (BBH tasks) are
    drawn round-robin so the count is spread evenly. With fewer rows than ``count`` all rows are
    returned and a warning is logged. Raises :class:`DataError` for missing, empty or malformed
    sources and :class:`OfflineError` when a hub dataset is needed but the hub is unreachable.
    """
    spec = _Spec.of(source, domain)
    if count < 1:
        raise DataError(f"seed count for domain {domain!r} must be at least 1, got {count}")
    groups = _load_groups(spec)
    _check_unique_ids(groups, spec.label)
    total = sum(len(g) for g in groups)
    if total == 0:
        raise DataError(
            f"seed source {spec.label} for domain {domain!r} has no usable rows. "
            f"Expected {_SCHEMAS[spec.format]}; fix the file or point the seed path elsewhere."
        )
    if total < count:
        # The shipped seeds are deliberately few (offline smoke runs); only a real source that
        # falls short of the paper's count deserves a warning.
        log.log(
            logging.INFO if spec.path.startswith(PKG_PREFIX) else logging.WARNING,
            "seed source %s has %d usable rows, fewer than the %d requested; using all",
            spec.label,
            total,
            count,
        )
    return _sample(groups, count, random.Random(seed))


# --------------------------------------------------------------------------- source spec


@dataclass(frozen=True)
class _Spec:
    domain: str
    path: str
    name: str | None
    split: str
    format: str
    fields: dict[str, str]
    subsets: list[str]

    @classmethod
    def of(cls, source: Any, domain: str) -> _Spec:
        path = getattr(source, "path", None)
        if not path:
            raise DataError(
                f"no seed source path for domain {domain!r}: set domains.{domain}.seeds.<source>.path, "
                "or data.seed_source=local to use the seeds shipped with selfmoe"
            )
        fmt = str(getattr(source, "format", None) or "plain").lower()
        if fmt not in _DEFAULT_FIELDS:
            raise DataError(f"unknown seed format {fmt!r} for domain {domain!r}; choose one of {list(FORMATS)}")
        fields = {str(k): str(v) for k, v in dict(getattr(source, "fields", None) or {}).items()}
        unknown = sorted(set(fields) - set(_DEFAULT_FIELDS[fmt]))
        if unknown:
            raise DataError(
                f"seed fields {unknown} are not roles of format {fmt!r}; its roles are {sorted(_DEFAULT_FIELDS[fmt])}"
            )
        subsets = [str(s) for s in (getattr(source, "subsets", None) or [])]
        return cls(
            domain=domain,
            path=str(path),
            name=getattr(source, "name", None) or None,
            split=str(getattr(source, "split", None) or "train"),
            format=fmt,
            fields=fields,
            subsets=subsets,
        )

    @property
    def label(self) -> str:
        return self.path

    def column(self, role: str) -> str:
        return self.fields.get(role, _DEFAULT_FIELDS[self.format][role])


@dataclass(frozen=True)
class _Row:
    data: Mapping[str, Any]
    index: int  # 0-based position in its pool; goes into ids
    where: str  # "line 3" / "row 3", for error messages


@dataclass(frozen=True)
class _Pool:
    origin: str  # file path or hub dataset description, for error messages
    task: str  # BBH task / hub config; "" for a single table
    rows: list[_Row]


# --------------------------------------------------------------------------- loading


def _load_groups(spec: _Spec) -> list[list[Example]]:
    """Converted examples, one list per pool (task/config), each in source order."""
    local = _resolve_local(spec.path)
    if local is None:
        pools = _read_hub(spec)
    else:
        if spec.format == "plain" and not spec.fields and local.is_file() and local.name.endswith(".jsonl"):
            return [_read_plain_jsonl(local, spec.domain)]
        pools = _read_local(local, spec)
    return [_convert_pool(pool, spec) for pool in pools]


def _resolve_local(path: str) -> Path | None:
    """The local path ``path`` names, or None when it is a hub dataset id."""
    if path.startswith(PKG_PREFIX):
        resolved = _PKG_ROOT / path[len(PKG_PREFIX) :]
        if not resolved.exists():
            shipped = sorted(p.name for p in SEEDS_DIR.glob("*.jsonl"))
            raise DataError(f"packaged seed file {path} not found at {resolved}; shipped seed files: {shipped}")
        return resolved
    local = Path(path).expanduser()
    if local.exists():
        return local
    if _looks_like_path(path):
        raise DataError(
            f"seed file {path} not found (resolved to {local.resolve()}). Fix the path, or use "
            "data.seed_source=local for the seeds shipped with selfmoe."
        )
    return None


def _looks_like_path(path: str) -> bool:
    # Hub ids are "name" or "owner/name", so one "/" alone does not make a path.
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or path.endswith(_FILE_SUFFIXES)
        or _HUB_ID.match(path) is None
    )


def _read_plain_jsonl(path: Path, domain: str) -> list[Example]:
    examples, bad = read_jsonl_report(path, domain=domain)
    if bad:
        lines = "; ".join(f"line {n}: {why}" for n, why in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DataError(f"seed file {path}: {len(bad)} broken line(s): {lines}{more}. Expected {_SCHEMAS['plain']}.")
    return examples


def _read_local(path: Path, spec: _Spec) -> list[_Pool]:
    if path.is_file():
        return [_Pool(str(path), _stem(path) if spec.format == "bbh" else "", _read_rows(path))]
    files = _directory_files(path, spec)
    return [_Pool(str(f), _stem(f), _read_rows(f)) for f in files]


def _directory_files(path: Path, spec: _Spec) -> list[Path]:
    """The files of a seed directory: the named subsets, all BBH task files, or the split's file."""
    candidates = {_stem(f): f for f in sorted(path.iterdir()) if f.is_file() and f.name.endswith(_FILE_SUFFIXES)}
    if spec.subsets:
        missing = [s for s in spec.subsets if s not in candidates]
        if missing:
            raise DataError(f"seed subsets {missing} not found in {path}; available: {sorted(candidates)}")
        return [candidates[s] for s in spec.subsets]
    if spec.format == "bbh":
        files = [f for f in candidates.values() if f.suffix == ".json"]
    else:
        files = [candidates[spec.split]] if spec.split in candidates else []
    if not files:
        want = "*.json task files" if spec.format == "bbh" else f"a {spec.split}.jsonl/.json/.jsonl.gz file"
        raise DataError(f"seed directory {path} has no {want}")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_rows(path: Path) -> list[_Row]:
    """Raw rows of a .jsonl, .jsonl.gz or .json file (a list, or an object with ``examples``)."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return _jsonl_rows(fh, path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            return _jsonl_rows(fh, path)
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"seed file {path} is not valid JSON: {exc}") from exc
        items = obj.get("examples") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DataError(f'seed file {path}: expected a JSON list of rows or {{"examples": [...]}}')
        bad = [i for i, item in enumerate(items) if not isinstance(item, dict)]
        if bad:
            raise DataError(f"seed file {path}: rows {bad[:10]} are not JSON objects")
        return [_Row(item, i, f"row {i}") for i, item in enumerate(items)]
    raise DataError(f"seed file {path}: unsupported file type; use .jsonl, .jsonl.gz, .json or a BBH directory")


def _jsonl_rows(lines: Iterable[str], path: Path) -> list[_Row]:
    rows: list[_Row] = []
    bad: list[str] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {n}: {exc}")
            continue
        if not isinstance(obj, dict):
            bad.append(f"line {n}: not a JSON object")
            continue
        rows.append(_Row(obj, len(rows), f"line {n}"))
    if bad:
        raise DataError(f"seed file {path}: {len(bad)} broken line(s): {'; '.join(bad[:10])}")
    return rows


# --------------------------------------------------------------------------- hub


def _read_hub(spec: _Spec) -> list[_Pool]:
    env = [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if env:
        # Fail before `datasets` gets a chance to try the network (or hang on a timeout).
        raise _offline_error(spec, f"offline mode is set ({', '.join(f'{v}=1' for v in env)})")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"seed source {spec.path!r} is a hub dataset, which needs the `datasets` package: "
            "pip install datasets (or pip install 'selfmoe[hub]'); or use data.seed_source=local, or "
            f"domains.{spec.domain}.seeds.hub.path=/path/to/local/file"
        ) from exc
    configs: list[str | None] = list(spec.subsets) or [spec.name]
    if spec.format == "bbh" and configs == [None]:
        configs = list(_hub_call(spec, None, lambda: datasets.get_dataset_config_names(spec.path)))
    pools = []
    for config in configs:
        ds = _hub_call(spec, config, lambda c=config: datasets.load_dataset(spec.path, c, split=spec.split))
        origin = f"{spec.path} (config {config!r}, split {spec.split!r})"
        rows = [_Row(dict(row), i, f"row {i}") for i, row in enumerate(ds)]
        pools.append(_Pool(origin, config or "", rows))
    return pools


def _hub_call(spec: _Spec, config: str | None, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:
        if _is_network_error(exc):
            raise _offline_error(spec, f"{type(exc).__name__}: {exc}", config) from exc
        raise DataError(
            f"could not load seed dataset {spec.path!r} (config {config!r}, split {spec.split!r}) "
            f"for domain {spec.domain!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _is_network_error(exc: BaseException) -> bool:
    markers = ("Connection", "Timeout", "Offline", "LocalEntryNotFound", "NetworkError")
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(m in type(seen).__name__ for m in markers):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _offline_error(spec: _Spec, reason: str, config: str | None = None) -> OfflineError:
    config = config if config is not None else (",".join(spec.subsets) or spec.name)
    return OfflineError(
        f"cannot load seed dataset {spec.path!r} (config {config!r}, split {spec.split!r}) for domain "
        f"{spec.domain!r}: the Hugging Face hub is unreachable ({reason}). Use local seeds instead: "
        f"data.seed_source=local (the seeds shipped with selfmoe), or "
        f"domains.{spec.domain}.seeds.hub.path=/path/to/local/file pointing at a local copy in the hub "
        f"schema ({_SCHEMAS[spec.format]})."
    )


# --------------------------------------------------------------------------- converting


class _MissingField(Exception):
    def __init__(self, role: str, column: str) -> None:
        super().__init__(role, column)
        self.role, self.column = role, column


class _BadRow(Exception):
    """A row has the fields but a value the converter cannot use."""


@dataclass(frozen=True)
class _Ctx:
    spec: _Spec
    task: str

    def get(self, row: Mapping[str, Any], role: str) -> Any:
        column = self.spec.column(role)
        if column not in row or row[column] is None:
            if role in _OPTIONAL_ROLES:
                return None
            raise _MissingField(role, column)
        return row[column]

    def text(self, row: Mapping[str, Any], role: str) -> str:
        value = self.get(row, role)
        if not isinstance(value, str):
            raise _BadRow(f"field {self.spec.column(role)!r} must be a string, got {type(value).__name__}")
        return value


_Converter = Callable[[Mapping[str, Any], int, _Ctx], "Example | None"]


def _convert_pool(pool: _Pool, spec: _Spec) -> list[Example]:
    convert = _CONVERTERS[spec.format]
    ctx = _Ctx(spec, pool.task)
    out: list[Example] = []
    skipped = 0
    for row in pool.rows:
        try:
            example = convert(row.data, row.index, ctx)
        except _MissingField as exc:
            override = "" if exc.column == exc.role else f" (mapped from role {exc.role!r})"
            raise DataError(
                f"seed source {pool.origin}, {row.where}: missing field {exc.column!r}{override} that format "
                f"{spec.format!r} needs. Expected {_SCHEMAS[spec.format]}. Map other column names with "
                f"domains.{spec.domain}.seeds.<source>.fields, e.g. {{{exc.role}: <column>}}."
            ) from None
        except _BadRow as exc:
            raise DataError(
                f"seed source {pool.origin}, {row.where}: {exc}. Expected {_SCHEMAS[spec.format]}."
            ) from None
        if example is None:
            skipped += 1
        else:
            out.append(example)
    if skipped:
        log.warning(
            "seed source %s: skipped %d of %d rows that could not be converted", pool.origin, skipped, len(pool.rows)
        )
    return out


def _convert_plain(row: Mapping[str, Any], index: int, ctx: _Ctx) -> Example:
    data = dict(row)
    for role in _DEFAULT_FIELDS["plain"]:
        value = ctx.get(row, role)
        if value is not None:
            data[role] = value
    try:
        return Example.from_dict(data, domain=ctx.spec.domain)
    except (ValueError, TypeError) as exc:
        raise _BadRow(str(exc)) from None


# MMLU ------------------------------------------------------------------------


def mmlu_instruction(question: str, choices: Sequence[str]) -> str:
    """The canonical knowledge instruction: the question, then one ``"A. ..."`` line per choice."""
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{options}"


def _convert_mmlu(row: Mapping[str, Any], index: int, ctx: _Ctx) -> Example:
    row = _unwrap_mmlu(row, ctx)
    question = ctx.text(row, "question")
    choices = _mmlu_choices(row, ctx)
    letter = _mmlu_letter(ctx.get(row, "answer"), len(choices))
    subject = ctx.get(row, "subject")
    subject = str(subject).strip() if subject else ""
    return Example(
        id=f"mmlu/{subject}/{index}" if subject else f"mmlu/{index}",
        domain=ctx.spec.domain,
        instruction=mmlu_instruction(question, choices),
        output=f"The answer is {letter}.",
        source="mmlu",
        meta={"subject": subject} if subject else {},
    )


def _unwrap_mmlu(row: Mapping[str, Any], ctx: _Ctx) -> Mapping[str, Any]:
    # Some cais/mmlu revisions nest auxiliary_train rows as {"train": {question, choices, ...}}.
    column = ctx.spec.column("question")
    if column not in row and len(row) == 1:
        (inner,) = row.values()
        if isinstance(inner, Mapping) and column in inner:
            return inner
    return row


def _mmlu_choices(row: Mapping[str, Any], ctx: _Ctx) -> list[str]:
    column = ctx.spec.column("choices")
    if "," in column:
        # Mirrors that keep one column per option (A, B, C, D): fields={choices: "A,B,C,D"}.
        names = [c.strip() for c in column.split(",")]
        missing = [c for c in names if c not in row]
        if missing:
            raise _MissingField("choices", missing[0])
        choices = [row[c] for c in names]
    else:
        choices = ctx.get(row, "choices")
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= 26:
        raise _BadRow(f"field {column!r} must be a list of 2-26 options, got {choices!r}")
    return [str(c).strip() for c in choices]


def _mmlu_letter(answer: Any, n_choices: int) -> str:
    if isinstance(answer, str):
        answer = answer.strip()
        if answer.isdigit():
            answer = int(answer)
        elif len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < n_choices:
        raise _BadRow(f"answer must be an index 0-{n_choices - 1} or a letter, got {answer!r}")
    return chr(ord("A") + answer)


# BBH -------------------------------------------------------------------------


def _convert_bbh(row: Mapping[str, Any], index: int, ctx: _Ctx) -> Example:
    task = ctx.task or "bbh"
    target = ctx.get(row, "target")
    return Example(
        id=f"bbh/{task}/{index}",
        domain=ctx.spec.domain,
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


def _convert_gsm8k(row: Mapping[str, Any], index: int, ctx: _Ctx) -> Example:
    question = ctx.text(row, "question").strip()
    try:
        output = gsm8k_output(ctx.text(row, "answer"))
    except ValueError as exc:
        raise _BadRow(f"field {ctx.spec.column('answer')!r}: {exc}") from None
    return Example(
        id=f"gsm8k/{ctx.spec.split}/{index}",
        domain=ctx.spec.domain,
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


def _top_level_defs(code: str, tree: ast.Module | None) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef | None]:
    if tree is not None:
        return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
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


def _signature(code: str, name: str, node: ast.FunctionDef | ast.AsyncFunctionDef | None) -> str | None:
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


def _convert_mbpp(row: Mapping[str, Any], index: int, ctx: _Ctx) -> Example | None:
    task_id = ctx.get(row, "task_id")
    text = ctx.text(row, "text")
    code = _normalize_code(ctx.text(row, "code"))
    tests = ctx.get(row, "test_list")
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        raise _BadRow(f"field {ctx.spec.column('test_list')!r} must be a list of assert strings, got {tests!r}")
    tests = [t.strip() for t in tests]
    tree = _parse(code)
    defs = _top_level_defs(code, tree)
    entry = _entry_point(tests, defs)
    signature = _signature(code, entry, defs[entry]) if entry else None
    if entry is None or signature is None:
        return None
    examples: list[tuple[str, str]] = []
    others: list[str] = []
    for test in tests:
        pair = _as_doctest(test, entry)
        if pair is None:
            others.append(test)
        else:
            examples.append(pair)
    meta: dict[str, Any] = {"entry_point": entry, "tests": tests, "task_id": task_id}
    setup = ctx.get(row, "test_setup_code")
    if isinstance(setup, str) and setup.strip():
        meta["test_setup_code"] = _normalize_code(setup)
    return Example(
        id=f"mbpp/{task_id}",
        domain=ctx.spec.domain,
        instruction=humaneval_prompt(signature, text, examples, others, _imports(code, tree)),
        output=code,
        source="mbpp",
        meta=meta,
    )


_CONVERTERS: dict[str, _Converter] = {
    "plain": _convert_plain,
    "mmlu": _convert_mmlu,
    "bbh": _convert_bbh,
    "gsm8k": _convert_gsm8k,
    "mbpp": _convert_mbpp,
}


# --------------------------------------------------------------------------- sampling


def _check_unique_ids(groups: Sequence[Sequence[Example]], label: str) -> None:
    seen: set[str] = set()
    dupes: list[str] = []
    for group in groups:
        for example in group:
            if example.id in seen:
                dupes.append(example.id)
            seen.add(example.id)
    if dupes:
        raise DataError(f"seed source {label}: duplicate id(s) {sorted(set(dupes))[:10]}; seed ids must be unique")


def _sample(groups: Sequence[Sequence[Example]], count: int, rng: random.Random) -> list[Example]:
    if len(groups) == 1:
        return rng.sample(list(groups[0]), min(count, len(groups[0])))
    # Stratified: shuffle each pool, then deal one item per pool in fixed pool order.
    queues = [rng.sample(list(g), len(g)) for g in groups]
    out: list[Example] = []
    depth = 0
    while len(out) < count and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(out) < count:
                out.append(queue[depth])
        depth += 1
    return out
