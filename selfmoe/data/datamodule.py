"""The one LightningDataModule over self-generated data, shared by the expert and router phases.

One domain for an expert; several (optionally balanced) for instance merging and the router.
Batches are ``micro_batch_size`` per rank; the trainer accumulates gradients so that
``micro_batch_size x accumulation x world size`` is the configured global batch at any scale.
Training batches come from :mod:`selfmoe.data.batching`: the global batches (and their
micro-batches) depend only on (seed, epoch, batch sizes), not on the world size, each carries
its global token count for the loss, and the loader resumes mid-epoch. Validation batches are
the examples in order, rank ``r`` taking every ``world_size``-th one (no padding duplicates, so
the token-weighted validation loss is the same at any world size).
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from selfmoe.data.batching import (
    EpochPermutation,
    GlobalBatchSampler,
    PlannedDataset,
    ResumableLoader,
    planned_collate,
)
from selfmoe.data.schema import Example, read_jsonl
from selfmoe.data.sft import Features, SFTDataset, collate, loss_tokens, tokenize_example
from selfmoe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class SFTDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dirs: dict[str, Path],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str,
        max_length: int,
        micro_batch_size: int,
        global_batch_size: int | None = None,
        balance: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        on_bad_line: str = "error",
    ) -> None:
        super().__init__()
        # Domain order is the caller's (e.g. router.experts), so routing matrices line up with experts.
        self.data_dirs = dict(data_dirs)
        self.domains = list(self.data_dirs)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size  # None: micro batch x world size x the trainer's accumulation
        self.balance = balance
        self.seed = seed
        self.num_workers = num_workers
        self.on_bad_line = on_bad_line
        self.datasets: dict[str, SFTDataset] = {}
        self.skipped_too_long = 0
        self.train_sampler: GlobalBatchSampler | None = None
        self._resume_state: dict[str, int] | None = None  # the trained position from a checkpoint
        # A rank may hold no validation example when the set is smaller than the world size.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def read_split(self, split: str) -> dict[str, list[Example]]:
        """Examples per domain for ``split``; a missing or empty file is an error naming the fix."""
        out: dict[str, list[Example]] = {}
        for domain, directory in self.data_dirs.items():
            path = Path(directory) / f"{split}.jsonl"
            rows = read_jsonl(path, domain=domain, on_error="raise" if self.on_bad_line == "error" else "skip")
            if not rows and split == "train":
                raise DataError(
                    f"{path} has no examples. Regenerate it (`make data DOMAIN={domain}` with force=true) "
                    "or check the generation counts in its manifest.json."
                )
            out[domain] = rows
        if self.balance and split == "train":
            out = _balanced(out, self.seed)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split in SPLITS:
            features: list[Features] = []
            for index, (_, rows) in enumerate(self.read_split(split).items()):
                for ex in rows:
                    f = tokenize_example(
                        ex, self.tokenizer, template=self.template, max_length=self.max_length, domain=index
                    )
                    if f is None:
                        self.skipped_too_long += 1
                    else:
                        features.append(f)
            self.datasets[split] = SFTDataset(features)
        if not self.datasets["train"]:
            raise DataError(
                f"no training example fits model.max_length={self.max_length}: all {self.skipped_too_long} prompts "
                "are longer. Raise model.max_length."
            )
        if self.skipped_too_long:
            log.warning("skipped %d example(s) whose prompt alone exceeds model.max_length", self.skipped_too_long)

    def _world(self) -> tuple[int, int, int | None]:
        """(world size, rank, gradient accumulation) of the attached trainer; one process without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, None
        return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches

    def _collate(self) -> functools.partial:
        return functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world, rank, accumulation = self._world()
        global_batch = self.global_batch_size or self.micro_batch_size * world * (accumulation or 1)
        if accumulation is not None and global_batch != self.micro_batch_size * world * accumulation:
            raise ConfigError(
                f"global batch {global_batch} != micro batch {self.micro_batch_size} x world size {world} x "
                f"gradient accumulation {accumulation}: build the trainer with accumulate_grad_batches="
                f"{global_batch // (self.micro_batch_size * world) or 1} (see selfmoe.config.grad_accumulation)."
            )
        self.train_sampler = GlobalBatchSampler(
            EpochPermutation(len(dataset), self.seed),
            [loss_tokens(f) for f in dataset.features],
            global_batch_size=global_batch,
            micro_batch_size=self.micro_batch_size,
            world_size=world,
            rank=rank,
        )
        if self._resume_state:
            self.train_sampler.load_state_dict(self._resume_state)
            self._resume_state = None
        return ResumableLoader(
            PlannedDataset(dataset),
            batch_sampler=self.train_sampler,
            collate_fn=planned_collate(self._collate()),
            num_workers=self.num_workers,
            # Its own generator: creating the iterator must not draw from the global RNG, or a
            # resumed run's dropout masks would drift from an uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.datasets["val"]
        world, rank, _ = self._world()
        return DataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=list(range(rank, len(dataset), world)),
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    # The trained position is saved twice: in the loader's state (which Lightning 2.6 restores
    # only if it builds the train loader after restoring its loops, not when configure_optimizers
    # asked for estimated_stepping_batches first) and here, which Lightning restores before any
    # loader is built. Both hold the same value.

    def state_dict(self) -> dict[str, int]:
        return self.train_sampler.state_dict() if self.train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_state = dict(state_dict) or None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch about to be trained (not for one prefetched ahead): the loader's
        # saved position is what has really been trained.
        if isinstance(batch, dict) and "step" in batch and self.train_sampler is not None:
            self.train_sampler.mark_trained(batch["step"])
        return batch


def _balanced(per_domain: dict[str, list[Example]], seed: int) -> dict[str, list[Example]]:
    """Downsample every domain to the smallest one's size (seeded), so none dominates the mix."""
    n = min(len(rows) for rows in per_domain.values())
    rng = random.Random(seed)
    return {d: rng.sample(rows, n) if len(rows) > n else rows for d, rows in per_domain.items()}
