"""Run-directory layout, manifests and atomic writes.

Every artifact a later phase trusts is written to a temporary sibling and renamed into place,
so a crash (or a full disk) leaves either the previous artifact or none, never half of one.
All paths derive from config (model slug, domain), never from the clock: under DDP every rank
re-runs the same command and must agree on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Where one base model's artifacts live: ``<output_dir>/<model-slug>/...``."""

    root: Path

    @classmethod
    def for_model(cls, output_dir: str | Path, model_name: str) -> Layout:
        return cls(Path(output_dir) / model_name)

    @property
    def base(self) -> Path:
        """The built-in tiny model's cached weights and tokenizer."""
        return self.root / "base"

    def data(self, domain: str) -> Path:
        return self.root / "data" / domain

    def expert(self, domain: str) -> Path:
        return self.root / "experts" / domain

    def run(self, name: str) -> Path:
        """Scratch space of a training run: checkpoints and logs (not an artifact)."""
        return self.root / "runs" / name


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts are shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and swap it into ``path`` on success.

    Yields the temp directory to fill. On an exception the temp directory is removed and any
    previous ``path`` is left untouched; on success the old directory (if any) is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous artifact back: a failed swap must not lose it
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an artifact."""
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "lightning", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover - all are dependencies
            continue
    return out


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None if there is none (or it is unreadable)."""
    p = Path(directory) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
