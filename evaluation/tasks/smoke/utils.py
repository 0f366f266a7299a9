"""Data loaders and the code metric of the smoke tasks (lm-eval imports this by file path).

The data sit next to this file, so the tasks work from any working directory and in an
installed package (lm-eval resolves ``data_files`` against the working directory instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from evaluation.code_exec import passes

DATA = Path(__file__).parent / "data"


def _split(name: str) -> datasets.Dataset:
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return datasets.Dataset.from_list(rows)


def load_mc(**_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("mc_test")})


def load_arith(**_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": _split("arith_train"), "test": _split("arith_test")})


def load_code(**_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("code_test")})


def code_program(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: the function prompt plus its completion, for each sample."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def pass_at_1(references: list[str], predictions: list[list[str]]) -> float:
    """Share of items whose first completion passes its tests (greedy: pass@1)."""
    results = [passes(pred[0] + "\n" + ref) for ref, pred in zip(references, predictions, strict=True)]
    return sum(results) / len(results)
