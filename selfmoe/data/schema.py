"""The one record type that flows through the data pipeline, and its jsonl I/O.

Seeds, generated items and training data are all :class:`Example` rows in jsonl files, one
object per line. Reading reports broken lines by number; writing is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from selfmoe.artifacts import atomic_write_text
from selfmoe.errors import DataError

REQUIRED = ("id", "instruction", "output")


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
        for key in ("id", "instruction", "output", "input", "domain", "source"):
            if key in kwargs and not isinstance(kwargs[key], str):
                if key == "id" and isinstance(kwargs[key], int):
                    kwargs[key] = str(kwargs[key])
                else:
                    raise ValueError(f"field {key!r} must be a string, got {type(kwargs[key]).__name__}")
        if domain is not None:
            kwargs["domain"] = domain
        kwargs.setdefault("domain", "")
        return cls(**kwargs)


def read_jsonl(path: str | Path, *, domain: str | None = None, on_error: str = "raise") -> list[Example]:
    """Read examples from a jsonl file.

    ``on_error="raise"`` fails naming every broken line by number; ``"skip"`` drops them (use
    :func:`read_jsonl_report` to get their numbers and reasons).
    """
    rows, bad = read_jsonl_report(path, domain=domain)
    if bad and on_error == "raise":
        lines = "; ".join(f"line {n}: {why}" for n, why in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DataError(
            f"{path}: {len(bad)} broken line(s): {lines}{more}. Fix or delete those lines, "
            "or set data.on_bad_line=skip to drop them."
        )
    return rows


def read_jsonl_report(path: str | Path, *, domain: str | None = None) -> tuple[list[Example], list[tuple[int, str]]]:
    """Read examples, returning ``(examples, [(line_number, reason), ...])`` for broken lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Run the phase that makes it (e.g. `make data`) or fix the path.")
    rows: list[Example] = []
    bad: list[tuple[int, str]] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                rows.append(Example.from_dict(obj, domain=domain))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                bad.append((n, str(exc)))
    return rows, bad


def write_jsonl(path: str | Path, examples: Iterable[Example | dict[str, Any]]) -> int:
    """Atomically write examples as jsonl; returns the number of rows."""
    lines = [json.dumps(e.to_dict() if isinstance(e, Example) else e, ensure_ascii=False) for e in examples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
