"""Broken lines in seed and data files: each named by its number, then stopped on or skipped
(``data.on_bad_line``), whatever the reader and whatever is wrong with the line."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from selfmoe.config import fingerprint, load_config
from selfmoe.data.schema import read_jsonl, read_jsonl_report
from selfmoe.data.seeds import SeedSource, load_seeds
from selfmoe.errors import DataError

GOOD = {"id": "a", "instruction": "What is 2 + 2?", "output": "4"}


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


BROKEN = lines(
    GOOD,
    b"\xff\xfe not utf-8",  # 2
    b'{"id": "s", "instruction": "\\ud800", "output": "x"}',  # 3: a lone surrogate cannot be written back
    {**GOOD, "id": "m", "meta": [1]},  # 4
    {**GOOD, "id": " "},  # 5
    {**GOOD, "id": 7, "input": True},  # 6
    {**GOOD, "id": "b"},
)
REASONS = {
    2: "not valid UTF-8",
    3: "lone surrogate",
    4: "field 'meta' must be an object",
    5: "field 'id' is empty",
    6: "field 'input' must be a string",
}


def test_every_broken_line_is_named_and_the_rest_is_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(BROKEN)
    rows, bad = read_jsonl_report(path)
    assert [r.id for r in rows] == ["a", "b"]
    assert [n for n, _ in bad] == list(REASONS)
    for (n, why), expected in zip(bad, REASONS.values(), strict=True):
        assert expected in why, (n, why)
    with pytest.raises(DataError, match=r"5 broken line\(s\): line 2: not valid UTF-8.*data\.on_bad_line=skip"):
        read_jsonl(path)


def test_skipping_names_the_lines_in_a_warning(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_bytes(BROKEN)
    with caplog.at_level(logging.WARNING, logger="selfmoe"):
        rows = read_jsonl(path, on_error="skip")
    assert [r.id for r in rows] == ["a", "b"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 5 broken line(s)" in message and all(f"line {n}:" in message for n in REASONS)


def test_many_broken_lines_are_summarised(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(*[b"{"] * 25))
    with pytest.raises(DataError, match=r"25 broken line\(s\): line 1: .*line 10: [^;]*\(and 15 more\)"):
        read_jsonl(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_seed_readers_stop_or_skip_as_configured(tmp_path, suffix, caplog):
    rows = [
        {"question": "Q1?", "answer": "1 + 1 = 2\n#### 2"},
        {"question": "Q2?", "answer": "no final line"},  # converts badly
        {"question": "Q3?"},  # lacks the answer
        {"question": "Q4?", "answer": "#### 4"},
    ]
    path = tmp_path / f"gsm8k{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([rows[0], 5, *rows[1:]]))
    else:
        data = lines(rows[0], b"{oops", *rows[1:])
        path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    source = SeedSource(path=str(path), format="gsm8k")
    with pytest.raises(DataError) as info:
        load_seeds("math", source, count=10, seed=0)
    assert "data.on_bad_line=skip" in str(info.value) and str(path) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="selfmoe"):
        seeds = load_seeds("math", source, count=10, seed=0, on_bad_line="skip")
    assert sorted(s.instruction for s in seeds) == ["Q1?", "Q4?"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    first = "row 1: not a JSON object" if suffix == ".json" else "line 2: not valid JSON"
    later = ("row 2", "row 3") if suffix == ".json" else ("line 3", "line 4")
    assert first in warned and f"{later[0]}: field 'answer': no final" in warned
    assert f"{later[1]}: missing field 'answer'" in warned


def test_plain_seed_file_skips_too(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(BROKEN)
    with pytest.raises(DataError, match=r"seed file .*5 broken row\(s\): line 2"):
        load_seeds("math", SeedSource(path=str(path)), count=10, seed=0)
    seeds = load_seeds("math", SeedSource(path=str(path)), count=10, seed=0, on_bad_line="skip")
    assert sorted(s.id for s in seeds) == ["a", "b"]


def test_the_policy_does_not_invalidate_artifacts():
    """Switching to skip (to get past a broken line) must not make finished data look stale."""
    error, skip = (load_config("generate", [f"data.on_bad_line={p}"]) for p in ("error", "skip"))
    assert fingerprint(error, "data") == fingerprint(skip, "data")
    assert fingerprint(error, "data") != fingerprint(load_config("generate", ["data.top_p=0.5"]), "data")


def test_a_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "seeds.jsonl.gz"
    path.write_bytes(gzip.compress(lines(*[GOOD] * 50))[:-20])
    with pytest.raises(DataError, match=r"cannot read .*seeds\.jsonl\.gz .*fix or replace the file"):
        load_seeds("math", SeedSource(path=str(path), format="plain", fields={"id": "id"}), count=3, seed=0)
