"""Run-directory layout, manifests and atomic writes.

Every artifact a later phase trusts is written to a temporary sibling and renamed into place,
so a crash (or a full disk) leaves either the previous artifact or none, never half of one.
All paths derive from config (model slug, domain), never from the clock: under DDP every rank
re-runs the same command and must agree on them. What is recorded next to an artifact goes through
:func:`redact` first, so no token from the config or the environment ends up in a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None if there is none (or it is unreadable)."""
    p = Path(directory) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


REDACTED = "<redacted>"
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials", "apikey"}
_KEY_QUALIFIERS = {"api", "access", "private", "secret", "auth"}  # "api_key", "access_key" (not "cache_key")
# Token formats that are secrets wherever they appear (HF and GitHub tokens).
_TOKEN_PATTERNS = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}")
_MIN_SECRET_LEN = 8  # shorter env values (flags like HF_HUB_DISABLE_IMPLICIT_TOKEN=1) are not secrets


def is_secret_key(key: str) -> bool:
    """Whether a key names a secret: ``token``, ``hf_token``, ``WANDB_API_KEY``, ``password``, ``client_secret``.

    Words are split on non-alphanumerics and camelCase, so ``max_new_tokens`` or ``pad_token_id``
    are not secrets: a token is the *last* word, a key needs a qualifier (``api_key``).
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    last = words[-1]
    return last == "token" or (last == "key" and len(words) > 1 and words[-2] in _KEY_QUALIFIERS)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables (``HF_TOKEN``, ``WANDB_API_KEY``...), longest first."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_key(k) and len(v.strip()) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """``obj`` (plain dicts, lists, scalars) with secrets replaced by ``"<redacted>"``.

    A value under a secret-named key (:func:`is_secret_key`) is replaced whole; in any string,
    the values of secret environment variables and known token formats are replaced where they
    occur (a token pasted into some other setting).
    """
    return _redact(obj, secret_values(env))


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, Mapping):
        return {
            k: REDACTED if is_secret_key(str(k)) and v not in (None, "") else _redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_redact(x, secrets) for x in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        return _TOKEN_PATTERNS.sub(REDACTED, obj)
    return obj
