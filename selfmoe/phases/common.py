"""What every phase shares: the device, skip-if-done, and the artifact's config + manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from selfmoe.artifacts import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_manifest,
    redact,
    sha256_text,
    versions,
)
from selfmoe.config import Config, fingerprint, to_yaml
from selfmoe.training.faults import OutputWriteError, is_write_error, write_error
from selfmoe.training.trainer import LAST

log = logging.getLogger("selfmoe")


def device_for(cfg: Config) -> torch.device:
    """Where non-Lightning work (generation) runs: the first GPU when the trainer asks for GPUs."""
    if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Settings of a training section that change how a run goes, not what it makes: changing them
# neither invalidates a finished artifact nor discards an interrupted run's checkpoints.
# fused_lora computes the same function with the same dropout masks (equal in float32; in bf16
# it rounds once where PEFT rounds twice), so an expert made either way stays valid; compile
# (torch.compile on a GPU) computes the same function up to rounding.
RUNTIME_ONLY = ("checkpoint_every_n_steps", "num_workers", "fused_lora", "compile")


def artifact_key(cfg: Config, sections: tuple[str, ...], **inputs: Any) -> str:
    """Hash of what an artifact depends on: config sections (less RUNTIME_ONLY) plus input hashes."""
    config = fingerprint(cfg, *sections)
    for values in config.values():
        if isinstance(values, dict):
            for name in RUNTIME_ONLY:
                values.pop(name, None)
    return sha256_text(json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str))


def is_done(directory: Path, key: str, cfg: Config, what: str, files: tuple[str, ...] = ()) -> bool:
    """True when ``directory`` holds a finished artifact made with ``key`` (and force is off).

    An artifact made from other settings or inputs, or missing one of ``files``, is never
    reused: it is rebuilt, with a note.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        log.warning("%s at %s lacks %s: rebuilding it", what, directory, ", ".join(missing))
        return False
    if cfg.force:
        log.info("force=true: rebuilding %s at %s", what, directory)
        return False
    if manifest.get("key") == key:
        log.info("%s is up to date at %s (force=true to redo)", what, directory)
        return True
    log.warning("%s at %s was made with other settings or inputs: rebuilding it", what, directory)
    return False


def write_metadata(directory: Path, cfg: Config, manifest: dict[str, Any]) -> None:
    """``config.yaml`` (resolved) and ``manifest.json`` (what made it) into an artifact dir, secrets redacted."""
    atomic_write_text(directory / "config.yaml", to_yaml(cfg))
    atomic_write_json(directory / "manifest.json", redact({**manifest, "versions": versions()}))


def resume_point(run_dir: Path, key: str, cfg: Config) -> str | None:
    """``last.ckpt`` of an interrupted run made with ``key``; stale checkpoints are discarded."""
    checkpoints = run_dir / "checkpoints"
    for leftover in checkpoints.glob(f".{LAST}.*.tmp"):  # a write cut short by a kill: never a resume point
        leftover.unlink(missing_ok=True)
    last = checkpoints / LAST
    if not last.is_file():
        return None
    if cfg.force or read_json(run_dir / "run.json").get("key") != key:
        log.warning("discarding checkpoints in %s: they belong to other settings (or force=true)", run_dir)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return None
    return str(last)


@contextlib.contextmanager
def reporting_write_errors(where: Path, kept: str) -> Iterator[None]:
    """Turn a full disk or an unwritable directory under ``where`` into an OutputWriteError naming the fix."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as exc:
        if is_write_error(exc):
            raise write_error(exc, where, kept) from exc
        raise
