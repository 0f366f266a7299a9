"""The one record type that flows through the data pipeline, and its jsonl I/O.

Seeds, generated items and training data are all :class:`Example` rows in jsonl files, one
object per line. Reading reports broken lines by number (bad JSON, bad UTF-8, missing or mistyped
fields) and, as configured (``data.on_bad_line``), stops or skips them with a warning; writing is
atomic.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from selfmoe.artifacts import atomic_write_text
from selfmoe.errors import DataError

REQUIRED = ("id", "instruction", "output")
TEXT_FIELDS = ("id", "instruction", "output", "input", "domain", "source")
SHOWN = 10  # broken lines named in a message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One instruction/response pair.

    ``id`` is unique within a file (seed ids come from the source dataset, so seed use can be
    traced and excluded from evaluation). ``meta`` carries source-specific extras such as a
    coding task's ``tests`` and ``entry_point``.
    """

    id: str
    domain: str
    instruction: str
    output: str
    input: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, domain: str | None = None) -> Example:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}; an example needs {list(REQUIRED)}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in row.items() if k in known}
        for key in TEXT_FIELDS:
            if key in kwargs and not isinstance(kwargs[key], str):
                if key == "id" and isinstance(kwargs[key], int) and not isinstance(kwargs[key], bool):
                    kwargs[key] = str(kwargs[key])
                else:
                    raise ValueError(f"field {key!r} must be a string, got {type(kwargs[key]).__name__}")
            if key in kwargs and not _is_utf8(kwargs[key]):
                # A "\\ud800" escape decodes to a lone surrogate, which no file can store as UTF-8.
                raise ValueError(f"field {key!r} holds a lone surrogate (an invalid \\u escape)")
        if not kwargs["id"].strip():
            raise ValueError("field 'id' is empty")
        meta = kwargs.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"field 'meta' must be an object, got {type(meta).__name__}")
        if meta and not _is_utf8(json.dumps(meta, ensure_ascii=False, default=str)):
            raise ValueError("field 'meta' holds a lone surrogate (an invalid \\u escape)")
        if domain is not None:
            kwargs["domain"] = domain
        kwargs.setdefault("domain", "")
        return cls(**kwargs)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe_bad_lines(bad: list[tuple[int, str]]) -> str:
    """``"line 3: reason; line 7: reason (and 4 more)"`` for the first few broken lines."""
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:SHOWN])
    return shown + (f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else "")


def read_jsonl(path: str | Path, *, domain: str | None = None, on_error: str = "raise") -> list[Example]:
    """Read examples from a jsonl file.

    ``on_error="raise"`` fails naming every broken line by number; ``"skip"`` drops them with a
    warning that names them (use :func:`read_jsonl_report` to get their numbers and reasons).
    """
    rows, bad = read_jsonl_report(path, domain=domain)
    if bad and on_error == "raise":
        raise DataError(
            f"{path}: {len(bad)} broken line(s): {describe_bad_lines(bad)}. Fix or delete those lines, "
            "or set data.on_bad_line=skip to drop them."
        )
    if bad:
        log.warning(
            "%s: skipped %d broken line(s) (data.on_bad_line=skip): %s", path, len(bad), describe_bad_lines(bad)
        )
    return rows


def read_jsonl_report(path: str | Path, *, domain: str | None = None) -> tuple[list[Example], list[tuple[int, str]]]:
    """Read examples, returning ``(examples, [(line_number, reason), ...])`` for broken lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Run the phase that makes it (e.g. `make data`) or fix the path.")
    rows: list[Example] = []
    bad: list[tuple[int, str]] = []
    for n, obj, error in iter_json_lines(path):
        if error is None:
            try:
                rows.append(Example.from_dict(obj, domain=domain))
                continue
            except (ValueError, TypeError) as exc:
                error = str(exc)
        bad.append((n, error))
    return rows, bad


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, JSON object, None)`` per non-blank line, or ``(n, None, reason)`` for a broken one.

    Lines are decoded one by one, so a stretch of bad bytes costs its own lines, not the file.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            yield from _json_lines(fh)
    except (OSError, EOFError) as exc:  # unreadable, or a truncated/corrupt gzip stream
        raise DataError(f"cannot read {path} ({exc}); fix or replace the file.") from None


def _json_lines(fh: Iterable[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    for n, raw in enumerate(fh, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield n, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, None, f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield n, None, f"not a JSON object (a {type(obj).__name__})"
            continue
        yield n, obj, None


def write_jsonl(path: str | Path, examples: Iterable[Example | dict[str, Any]]) -> int:
    """Atomically write examples as jsonl; returns the number of rows."""
    lines = [json.dumps(e.to_dict() if isinstance(e, Example) else e, ensure_ascii=False) for e in examples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
