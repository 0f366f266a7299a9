"""The generation journal: finished micro-batches on disk, so a killed run resumes where it stopped.

Each finished micro-batch is one small JSON file, written atomically (temp file, fsync, rename)
by the rank that generated it, and named by the hash of its request (prompts + decoding
options). A killed process therefore leaves only whole entries behind, and a rerun asks for
exactly the same requests (generation is deterministic given the earlier outputs), so it finds
them by name and skips them. Nothing is lost and nothing is generated twice.

The directory records the artifact key it belongs to (``journal.json``). A journal written
under other settings or inputs would replay outputs of another model or prompt, so it is
discarded with a warning, never reused. The journal lives inside the artifact's directory and
disappears with it when the finished artifact is swapped in atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfmoe.artifacts import atomic_write_json, atomic_write_text
from selfmoe.data.generation import Completion

log = logging.getLogger("selfmoe")

HEADER = "journal.json"
FORMAT = 1


def request_id(prompts: Sequence[str], options: dict[str, Any]) -> str:
    """The content hash of one micro-batch request: what the journal files are named by."""
    blob = json.dumps({"prompts": list(prompts), "options": options}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class BatchJournal:
    """Finished micro-batches of one artifact's generation, one atomic file per batch.

    Only one process (rank zero) calls :meth:`load`, before any rank calls :meth:`put`; every
    rank may :meth:`put` the batches it generated (the files are distinct by name).
    """

    def __init__(self, directory: str | Path, key: str) -> None:
        self.directory = Path(directory)
        self.key = key

    def load(self, *, fresh: bool = False) -> dict[str, list[Completion]]:
        """Prepare the directory and return the finished batches by request id.

        A journal of another key, or any journal when ``fresh`` (``force=true``), is deleted first.
        """
        header = self._header()
        if self.directory.exists() and (fresh or header.get("key") != self.key):
            why = "force=true" if fresh else "it was made with other settings or inputs"
            log.warning("discarding the partial generation in %s: %s", self.directory, why)
            shutil.rmtree(self.directory)
            header = {}
        if not header:
            atomic_write_json(self.directory / HEADER, {"key": self.key, "format": FORMAT})
            return {}
        entries: dict[str, list[Completion]] = {}
        for path in sorted(self.directory.glob("*.json")):
            if path.name == HEADER:
                continue
            entry = _read_entry(path)
            if entry is None:
                log.warning("ignoring unreadable journal entry %s (that batch is generated again)", path)
            else:
                entries[path.stem] = entry
        if entries:
            log.info("resuming generation: %d finished batch(es) in %s", len(entries), self.directory)
        return entries

    def put(self, rid: str, completions: Sequence[Completion]) -> None:
        """Record one finished micro-batch durably (atomic write + fsync)."""
        row = {"id": rid, "completions": [c.to_dict() for c in completions]}
        atomic_write_text(self.directory / f"{rid}.json", json.dumps(row, ensure_ascii=False))

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _header(self) -> dict[str, Any]:
        try:
            header = json.loads((self.directory / HEADER).read_text())
        except (OSError, ValueError):
            return {}
        return header if isinstance(header, dict) and header.get("format") == FORMAT else {}


def _read_entry(path: Path) -> list[Completion] | None:
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
        if row["id"] != path.stem:
            return None
        return [Completion.from_dict(c) for c in row["completions"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
