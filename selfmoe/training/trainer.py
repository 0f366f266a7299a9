"""The Lightning Trainer every training phase uses: logger, checkpoints, precision, DDP.

Checkpoints: one resume point ``run_dir/checkpoints/last.ckpt`` (see
:class:`callbacks.checkpointing.ResumeCheckpoint`), written atomically through
:class:`~selfmoe.training.checkpoint_io.AtomicCheckpointIO` and read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from callbacks.checkpointing import LAST, ResumeCheckpoint
from selfmoe.config import Config, TrainerConfig
from selfmoe.errors import ConfigError
from selfmoe.training.checkpoint_io import AtomicCheckpointIO

__all__ = ["LAST", "LOG_DIRS", "build_logger", "build_trainer"]

LOG_DIRS = ("logs", "tb")  # under run_dir: the CSV and TensorBoard loggers' directories


def build_logger(cfg: Config, run_dir: Path) -> Logger | bool:
    kind = cfg.trainer.logger
    if kind == "csv":
        return CSVLogger(run_dir, name=LOG_DIRS[0], version="")
    if kind == "tensorboard":
        try:
            return TensorBoardLogger(run_dir, name=LOG_DIRS[1], version="")
        except ModuleNotFoundError:
            raise ConfigError(
                "trainer.logger=tensorboard needs tensorboard: pip install 'selfmoe[tensorboard]'"
            ) from None
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("trainer.logger=wandb needs wandb: pip install 'selfmoe[wandb]'") from None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=cfg.trainer.wandb_project, name=run_dir.name, save_dir=str(run_dir))
    return False


def placement(t: TrainerConfig) -> dict[str, Any]:
    """Where and how a Lightning Trainer (or Fabric) runs: the ``trainer.*`` device keys."""
    return {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": t.strategy,
        "precision": t.precision,
    }


def build_trainer(
    cfg: Config,
    run_dir: Path,
    *,
    max_epochs: int,
    accumulate: int,
    checkpoint_every_n_steps: int = 0,
    callbacks: list[Callback] | None = None,
) -> L.Trainer:
    """A Trainer whose checkpoints go to ``run_dir/checkpoints`` (``last.ckpt`` is the resume point)."""
    t = cfg.trainer
    checkpoint = ResumeCheckpoint(run_dir / "checkpoints", every_n_steps=checkpoint_every_n_steps)
    extra: list[Callback] = [checkpoint, *(callbacks or [])]
    logger = build_logger(cfg, run_dir)
    if logger:
        extra.append(LearningRateMonitor(logging_interval="step"))
    if t.progress_bar:
        extra.append(RichProgressBar(leave=True))
    return L.Trainer(
        **placement(t),
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=run_dir,
        logger=logger,
        callbacks=extra,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the DataModule builds its own seeded sampler
        deterministic=t.deterministic,
        # no_grad rather than inference_mode: metric states made in a validate() before fit() must
        # stay updatable during fit (inference tensors cannot be updated in place outside it).
        inference_mode=False,
    )
