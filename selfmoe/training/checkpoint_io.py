"""Checkpoint files written atomically and read back without unpickling arbitrary objects.

Lightning's default writer opens the target path itself, so a kill or a full disk mid-write can
leave a truncated ``last.ckpt`` where the previous good one was. Here the checkpoint is
serialised in memory (it holds the trainable weights only), written to a temporary sibling,
fsynced and renamed over the target: the file is either the previous checkpoint or the new
one. Loading always uses ``weights_only=True``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from selfmoe.artifacts import atomic_write_bytes
from selfmoe.training.faults import is_write_error, write_error


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:
            if is_write_error(exc):
                kept = "The previous checkpoint there, if any, is unchanged."
                raise write_error(exc, Path(path).parent, kept, path=Path(path)) from exc
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict:
        # Checkpoints hold tensors and plain state only: never unpickle arbitrary objects.
        return torch.load(path, map_location=map_location, weights_only=True)
