"""Seed/evaluation overlap: evaluated items that equal a seed used to generate training data.

The generator saw ~100 seeds per domain (``data/<domain>/seeds.jsonl``); if one of them is also
a test item, that item's score is contaminated. An evaluated document *equals* a seed when one
of its text fields, normalised (case, whitespace, surrounding punctuation), equals the seed's
instruction or input, or contains it (for fields that render the question with extras, e.g.
``Question: ... Answer:``). Only texts of at least ``MIN_WORDS`` words are compared, so short
answers and option letters never match by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from selfmoe.artifacts import Layout
from selfmoe.config import Config
from selfmoe.data.schema import read_jsonl

MIN_WORDS = 6
SEEDS_FILE = "seeds.jsonl"


def normalize(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end."""
    return re.sub(r"\s+", " ", text).strip().strip(".,;:!?\"'()[]").strip().lower()


def seed_texts(cfg: Config) -> dict[str, str]:
    """Normalised seed instruction/input -> seed id, over every domain's recorded seeds."""
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    texts: dict[str, str] = {}
    for domain in sorted(cfg.domains):
        path: Path = layout.data(domain) / SEEDS_FILE
        if not path.is_file():
            continue
        for ex in read_jsonl(path, domain=domain):
            for text in (ex.instruction, ex.input):
                norm = normalize(text)
                if len(norm.split()) >= MIN_WORDS:
                    texts.setdefault(norm, f"{domain}/{ex.id}")
    return texts


def _doc_strings(doc: Any) -> Iterable[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, Mapping):
        for value in doc.values():
            yield from _doc_strings(value)
    elif isinstance(doc, (list, tuple)):
        for value in doc:
            yield from _doc_strings(value)


def find_overlap(samples: Mapping[str, list[Mapping[str, Any]]], seeds: Mapping[str, str]) -> list[dict[str, Any]]:
    """``{task, doc_id, seed}`` for each evaluated document that equals a seed."""
    if not seeds:
        return []
    hits = []
    for task, rows in samples.items():
        for sample in rows:
            for text in _doc_strings(sample.get("doc", {})):
                norm = normalize(text)
                if len(norm.split()) < MIN_WORDS:
                    continue
                seed = seeds.get(norm) or next((sid for s, sid in seeds.items() if s in norm), None)
                if seed is not None:
                    hits.append({"task": task, "doc_id": sample.get("doc_id"), "seed": seed})
                    break
    return hits
