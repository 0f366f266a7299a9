"""The resume point of a training run: one ``last.ckpt``, replaced atomically, at step boundaries.

Written every ``every_n_steps`` optimizer steps (0: never mid-epoch), at the end of every
epoch, and when a pre-emption signal (SIGTERM or SIGUSR1) has arrived; in that last case the
process then exits with :class:`~selfmoe.training.faults.TrainingPreempted` (status 75) and the
same command, rerun, resumes. Saving only right after an optimizer step means no gradient is
ever half accumulated in a checkpoint. What a checkpoint holds (trainable weights, optimizer,
scheduler, loop and data-loader position, every rank's RNG) is the LightningModule's and
Lightning's business; the file is written through the trainer's checkpoint IO, which is atomic.

Nothing is saved after an exception: a failed step (a NaN loss, a crashed rank) leaves the last
good checkpoint as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from callbacks.preemption import PreemptionFlag
from selfmoe.training.faults import TrainingPreempted

log = logging.getLogger("selfmoe")

LAST = "last.ckpt"


class ResumeCheckpoint(Checkpoint):
    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, preemption: PreemptionFlag | None = None) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.preemption = preemption if preemption is not None else PreemptionFlag()
        self.last_saved_step: int | None = None
        self._step_at_batch_start = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    # -- signals: only while the training loop runs -------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.preemption.install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.preemption.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.preemption.uninstall()

    # -- when to save ---------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # a micro-batch inside a gradient-accumulation window: not a step boundary
        stop = self._stop_requested(trainer)
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.save(trainer)
        if stop:
            self._exit(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Always, even right after a step save: this one records the finished epoch (and validation).
        self.save(trainer)
        if self._stop_requested(trainer):
            self._exit(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` (every rank must call this: the state is gathered from all of them)."""
        trainer.save_checkpoint(self.path, weights_only=False)  # the full resume state
        self.last_saved_step = trainer.global_step

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        # The signal may reach one rank only (a launcher's main process): any rank's flag stops all.
        return trainer.strategy.reduce_boolean_decision(self.preemption.received is not None, all=False)

    def _exit(self, trainer: L.Trainer) -> None:
        what = self.preemption.received.name if self.preemption.received is not None else "another rank's signal"
        message = (
            f"pre-empted ({what}): saved a resumable checkpoint at global step {trainer.global_step} to {self.path}; "
            "rerun the same command to resume from it."
        )
        if trainer.is_global_zero:
            log.warning(message)
        raise TrainingPreempted(message)

    # -- the callback's own state: nothing that a resumed run needs -----------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
