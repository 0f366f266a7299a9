"""Run a generation job on every rank of the configured Lightning strategy (glue only).

Self-generation is a loop of generation calls, each followed by order-dependent filtering,
so it cannot be one flat predict dataset. Instead the whole loop runs inside a single
``trainer.predict`` step on every rank: Lightning launches the processes (``ddp`` re-runs the
command, ``ddp_notebook`` forks, torchrun and SLURM start them), sets up the process group,
places the model on each rank's device and applies the precision plugin. The job spreads each
call over the ranks through a :class:`TorchCollective` (see ``selfmoe.data.sharded``).

One predict for the whole loop also keeps the model on its device: Lightning moves it back to
the CPU at the end of every predict. Under forking strategies the job runs in the worker
processes only, so it must write its own results (rank zero writes the artifact).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from selfmoe.config import Config
from selfmoe.data.sharded import Collective, LocalCollective, TorchCollective
from selfmoe.training.trainer import placement

Job = Callable[[PreTrainedModel, Collective], None]


class GenerationJob(L.LightningModule):
    """A one-step predict whose step runs ``job(model, collective)`` on every rank."""

    def __init__(self, model: PreTrainedModel, job: Job) -> None:
        super().__init__()
        self.model = model  # a submodule, so the strategy moves it to each rank's device
        self.job = job

    def predict_step(self, batch: Any, batch_idx: int) -> int:
        world = self.trainer.world_size
        collective = LocalCollective() if world == 1 else TorchCollective(self.trainer.global_rank, world)
        self.job(self.model, collective)
        return self.trainer.global_rank  # not None, which Lightning would warn about

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a placeholder item: the job brings its own data


def generation_trainer(cfg: Config) -> L.Trainer:
    """A predict-only Trainer on the configured devices and strategy: no logger, checkpoints or bars."""
    t = cfg.trainer
    return L.Trainer(
        **placement(t),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # every rank runs the one step; the job shards the work
        deterministic=t.deterministic,
    )


def run_on_ranks(cfg: Config, model: PreTrainedModel, job: Job) -> None:
    """Run ``job`` once on every rank of ``cfg.trainer``'s strategy, inside one predict step."""
    trainer = generation_trainer(cfg)
    # One placeholder item per rank: its loader is built per rank and never sharded.
    loader = DataLoader([0], batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.predict(GenerationJob(model, job), dataloaders=loader, return_predictions=False)
