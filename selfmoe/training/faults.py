"""What a training run can stop with, besides a bug: a diverged loss, a full disk, a pre-emption.

Each is raised with a message that says what happened, what was kept and what to do. The first
two are :class:`~selfmoe.errors.SelfMoEError` (the CLI prints them and exits 2);
:class:`TrainingPreempted` is a ``SystemExit`` with status :data:`PREEMPTED_EXIT_CODE`, like
Lightning's own SIGTERM exit, so that it passes through every ``except Exception`` and a job script
can tell "rerun me" from a failure.
"""

from __future__ import annotations

import errno
from pathlib import Path

from selfmoe.errors import SelfMoEError

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, retrying is expected to work

# The errors a full, read-only or over-quota output location gives when written to.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class NonFiniteLossError(SelfMoEError):
    """The training loss became NaN or infinite; no checkpoint was written after the last good one."""


class OutputWriteError(SelfMoEError):
    """An artifact or checkpoint could not be written (disk full, read-only, no permission)."""


class TrainingPreempted(SystemExit):
    """A pre-emption signal arrived; a resumable checkpoint was saved and the process exits."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_write_error(exc: BaseException) -> bool:
    """True for an OSError a full or unwritable output location raises (or safetensors' wrapping of one)."""
    if isinstance(exc, OSError):
        return exc.errno in WRITE_ERRNOS
    # safetensors writes from Rust and raises its own error type around the OS error's text.
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and any(
        s in text for s in ("No space", "Read-only", "Permission denied", "too large", "StorageFull", "FileTooLarge")
    )


def write_error(exc: BaseException, where: Path, kept: str, path: Path | None = None) -> OutputWriteError:
    """The user-facing form of ``exc``: what could not be written, what was kept, how to fix it."""
    path = path or getattr(exc, "filename", None) or where
    reason = getattr(exc, "strerror", None) or str(exc)
    return OutputWriteError(
        f"cannot write {path}: {reason}. {kept} Free space (or fix the permissions) under {where}, "
        "or point output_dir at a writable disk with room, then rerun the same command."
    )
