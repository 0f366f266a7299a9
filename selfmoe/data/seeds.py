"""Seed loaders: the ~100 examples per domain that start self-specialization (PAPER.md §1.1).

A seed source is a local file/directory, a hub dataset, or the seeds shipped with the package
(``pkg://seeds/<domain>.jsonl``). Its rows are read here and converted by the source format's
converter (:mod:`selfmoe.data.seed_formats`) into the canonical per-domain format, the same
format the shipped seeds use.

Seed ids name their source row (``gsm8k/train/17``, ``bbh/navigate/3``, ``mbpp/601``), so the
rows used as seeds can be recorded and excluded from evaluation. Sampling uses a private
``random.Random(seed)`` and is deterministic.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfmoe.data.schema import SHOWN, Example, iter_json_lines, read_jsonl_report
from selfmoe.data.seed_formats import FORMATS, ROLES, SCHEMAS, BadRow, MissingField, RowContext, convert
from selfmoe.errors import DataError, OfflineError

__all__ = [
    "FORMATS",
    "PKG_PREFIX",
    "SEEDS_DIR",
    "SeedSource",
    "load_seeds",
    "seed_ids",
    "shipped_seed_source",
]

log = logging.getLogger(__name__)

_PKG_ROOT = Path(__file__).resolve().parent
SEEDS_DIR = _PKG_ROOT / "seeds"
PKG_PREFIX = "pkg://"

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


def load_seeds(domain: str, source: Any, *, count: int, seed: int, on_bad_line: str = "error") -> list[Example]:
    """Load ``count`` seed examples for ``domain`` from ``source``, converted to the canonical format.

    ``source`` has ``path``, ``name``, ``split``, ``format``, ``fields`` and ``subsets`` (see
    :class:`SeedSource`). The draw is deterministic in ``seed``; several subsets (BBH tasks) are
    drawn round-robin so the count is spread evenly. With fewer rows than ``count`` all rows are
    returned and a warning is logged. Broken lines or rows (bad JSON or UTF-8, missing or unusable
    fields) are all named by number, then raise (``on_bad_line="error"``) or are skipped with that
    warning (``"skip"``, the ``data.on_bad_line`` setting). Raises :class:`DataError` for missing,
    empty or malformed sources and :class:`OfflineError` when a hub dataset is needed but the hub is
    unreachable.
    """
    if on_bad_line not in ("error", "skip"):
        raise DataError(f"on_bad_line={on_bad_line!r}: use error or skip.")
    spec = _Spec.of(source, domain, on_bad_line)
    if count < 1:
        raise DataError(f"seed count for domain {domain!r} must be at least 1, got {count}")
    groups = _load_groups(spec)
    _check_unique_ids(groups, spec.path)
    total = sum(len(g) for g in groups)
    if total == 0:
        raise DataError(
            f"seed source {spec.path} for domain {domain!r} has no usable rows. "
            f"Expected {SCHEMAS[spec.format]}; fix the file or point the seed path elsewhere."
        )
    if total < count:
        # The shipped seeds are deliberately few (offline smoke runs); only a real source that
        # falls short of the paper's count deserves a warning.
        log.log(
            logging.DEBUG if spec.path.startswith(PKG_PREFIX) else logging.WARNING,
            "seed source %s has %d usable rows, fewer than the %d requested; using all",
            spec.path,
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
    on_bad_line: str = "error"

    @classmethod
    def of(cls, source: Any, domain: str, on_bad_line: str = "error") -> _Spec:
        path = getattr(source, "path", None)
        if not path:
            raise DataError(
                f"no seed source path for domain {domain!r}: set domains.{domain}.seeds.<source>.path, "
                "or data.seed_source=local to use the seeds shipped with selfmoe"
            )
        fmt = str(getattr(source, "format", None) or "plain").lower()
        if fmt not in ROLES:
            raise DataError(f"unknown seed format {fmt!r} for domain {domain!r}; choose one of {list(FORMATS)}")
        fields = {str(k): str(v) for k, v in dict(getattr(source, "fields", None) or {}).items()}
        unknown = sorted(set(fields) - set(ROLES[fmt]))
        if unknown:
            raise DataError(
                f"seed fields {unknown} are not roles of format {fmt!r}; its roles are {sorted(ROLES[fmt])}"
            )
        return cls(
            domain=domain,
            path=str(path),
            name=getattr(source, "name", None) or None,
            split=str(getattr(source, "split", None) or "train"),
            format=fmt,
            fields=fields,
            subsets=[str(s) for s in (getattr(source, "subsets", None) or [])],
            on_bad_line=on_bad_line,
        )


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
    elif spec.format == "plain" and not spec.fields and local.is_file() and local.name.endswith(".jsonl"):
        return [_read_plain_jsonl(local, spec)]
    else:
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


def _read_plain_jsonl(path: Path, spec: _Spec) -> list[Example]:
    examples, bad = read_jsonl_report(path, domain=spec.domain)
    _bad_rows(f"seed file {path}", [f"line {n}: {why}" for n, why in bad], spec)
    return examples


def _bad_rows(origin: str, bad: list[str], spec: _Spec, hint: str = "") -> None:
    """Stop on broken rows (``on_bad_line=error``) or warn and go on; either way each is named."""
    if not bad:
        return
    shown = "; ".join(bad[:SHOWN]) + (f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else "")
    if spec.on_bad_line == "skip":
        log.warning("%s: skipped %d broken row(s) (data.on_bad_line=skip): %s", origin, len(bad), shown)
        return
    raise DataError(
        f"{origin}: {len(bad)} broken row(s): {shown}. Expected {SCHEMAS[spec.format]}.{hint} "
        "Fix or delete those rows, or set data.on_bad_line=skip to drop them."
    )


def _read_local(path: Path, spec: _Spec) -> list[_Pool]:
    if path.is_file():
        return [_Pool(str(path), _stem(path) if spec.format == "bbh" else "", _read_rows(path, spec))]
    files = _directory_files(path, spec)
    return [_Pool(str(f), _stem(f), _read_rows(f, spec)) for f in files]


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


def _read_rows(path: Path, spec: _Spec) -> list[_Row]:
    """Raw rows of a .jsonl, .jsonl.gz or .json file (a list, or an object with ``examples``)."""
    if path.name.endswith(".gz") or path.suffix == ".jsonl":
        rows: list[_Row] = []
        bad: list[str] = []
        for n, obj, error in iter_json_lines(path):
            if error is None:
                rows.append(_Row(obj, len(rows), f"line {n}"))
            else:
                bad.append(f"line {n}: {error}")
        _bad_rows(f"seed file {path}", bad, spec)
        return rows
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(
                f"seed file {path} is not valid JSON: {exc}. Fix the file or point the seed path elsewhere."
            ) from None
        items = obj.get("examples") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DataError(f'seed file {path}: expected a JSON list of rows or {{"examples": [...]}}')
        _bad_rows(
            f"seed file {path}",
            [f"row {i}: not a JSON object" for i, x in enumerate(items) if not isinstance(x, dict)],
            spec,
        )
        return [_Row(item, i, f"row {i}") for i, item in enumerate(items) if isinstance(item, dict)]
    raise DataError(f"seed file {path}: unsupported file type; use .jsonl, .jsonl.gz, .json or a BBH directory")


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
        f"schema ({SCHEMAS[spec.format]})."
    )


# --------------------------------------------------------------------------- converting


def _convert_pool(pool: _Pool, spec: _Spec) -> list[Example]:
    ctx = RowContext(spec.format, spec.domain, spec.split, pool.task, spec.fields)
    out: list[Example] = []
    bad: list[str] = []
    hint = ""
    unusable = 0
    for row in pool.rows:
        try:
            example = convert(row.data, row.index, ctx)
        except MissingField as exc:
            override = "" if exc.column == exc.role else f" (mapped from role {exc.role!r})"
            bad.append(f"{row.where}: missing field {exc.column!r}{override} that format {spec.format!r} needs")
            hint = (
                f" Map other column names with domains.{spec.domain}.seeds.<source>.fields, "
                f"e.g. {{{exc.role}: <column>}}."
            )
            continue
        except BadRow as exc:
            bad.append(f"{row.where}: {exc}")
            continue
        if example is None:
            unusable += 1
        else:
            out.append(example)
    _bad_rows(f"seed source {pool.origin}", bad, spec, hint)
    if unusable:
        log.warning(
            "seed source %s: skipped %d of %d rows that could not be converted", pool.origin, unusable, len(pool.rows)
        )
    return out


# --------------------------------------------------------------------------- sampling


def _check_unique_ids(groups: Sequence[Sequence[Example]], label: str) -> None:
    counts = Counter(example.id for group in groups for example in group)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise DataError(f"seed source {label}: duplicate id(s) {dupes[:10]}; seed ids must be unique")


def _sample(groups: Sequence[Sequence[Example]], count: int, rng: random.Random) -> list[Example]:
    if len(groups) == 1:
        return rng.sample(list(groups[0]), min(count, len(groups[0])))
    # Stratified: shuffle each pool, then deal one item per pool in fixed pool order.
    queues = [rng.sample(list(g), len(g)) for g in groups]
    dealt = [q[depth] for depth in range(max(map(len, queues), default=0)) for q in queues if depth < len(q)]
    return dealt[:count]
