"""Global batches that are the same at every world size, and a train loader that resumes mid-epoch.

An epoch is a seeded permutation of the training set cut into global batches of
``global_batch_size`` examples (the last one may be shorter). Each global batch is cut into
``world_size x accumulation`` micro-batch slots of ``micro_batch_size`` consecutive examples;
rank ``r`` takes slots ``k * world_size + r`` for ``k = 0 .. accumulation - 1``. So which examples
form an optimizer step, and even which examples share a micro-batch, depend only on
``(seed, epoch, global_batch_size, micro_batch_size)``, never on the world size. Slots past the
end of a short last batch are empty micro-batches: every rank still runs ``accumulation``
micro-batches per step, as DDP and gradient accumulation need.

Every micro-batch carries its :class:`StepPlan`: where it is, and the number of response
tokens and of non-empty micro-batches in its whole global batch. Every rank computes these from
the same permutation, so the training step can normalise the loss by the global batch without
any communication.

The loader is stateful in the sense Lightning checks (``state_dict``/``load_state_dict``): it
reports the global steps already trained in the current epoch and, after loading, skips them,
so a run resumed from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepPlan(TypedDict):
    """What a training step needs to know about the micro-batch it is given (plain ints)."""

    epoch: int
    step: int  # global step within the epoch
    micro: int  # micro-batch within the step, 0 .. accumulation - 1
    accumulation: int
    tokens: int  # response tokens in the whole global batch (after the label shift)
    micro_batches: int  # non-empty micro-batches in the whole global batch


class EpochPermutation(Sampler[int]):
    """A seeded permutation per epoch; Lightning calls ``set_epoch`` through the batch sampler."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.size


class GlobalBatchSampler(Sampler[list[tuple[int | None, StepPlan]]]):
    """Yields this rank's micro-batches as ``[(index, plan), ...]`` (``[(None, plan)]`` when empty).

    ``loss_tokens[i]`` is the number of response tokens of example ``i``. ``state_dict`` reports the
    steps trained so far in the current epoch, as recorded by :meth:`mark_trained`.
    """

    def __init__(
        self,
        sampler: EpochPermutation,
        loss_tokens: Sequence[int],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        slots = micro_batch_size * world_size
        if global_batch_size % slots:
            raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch x world size {slots}")
        self.sampler = sampler  # `.sampler.set_epoch` is what Lightning calls each epoch
        self.loss_tokens = list(loss_tokens)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation = global_batch_size // slots
        self.steps_per_epoch = math.ceil(len(self.loss_tokens) / global_batch_size)
        self._resume: tuple[int, int] | None = None  # (epoch, first step) for the next iteration
        self._trained = (0, 0)  # (epoch, steps completed in it)

    def __len__(self) -> int:
        # The full epoch even when resuming: Lightning counts the skipped batches as already done.
        return self.steps_per_epoch * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int | None, StepPlan]]]:
        epoch, first = self.sampler.epoch, 0
        if self._resume is not None:
            epoch, first = self._resume
            self._resume = None
            self.sampler.set_epoch(epoch)
        order = self.sampler.order(epoch)
        g, m, w = self.global_batch_size, self.micro_batch_size, self.world_size
        for step in range(first, self.steps_per_epoch):
            batch = order[step * g : (step + 1) * g]
            chunks = [batch[j * m : (j + 1) * m] for j in range(w * self.accumulation)]
            plan_base = {
                "epoch": epoch,
                "step": step,
                "accumulation": self.accumulation,
                "tokens": sum(self.loss_tokens[i] for i in batch),
                "micro_batches": sum(1 for c in chunks if c),
            }
            for k in range(self.accumulation):
                plan: StepPlan = {**plan_base, "micro": k}  # type: ignore[typeddict-item]
                chunk = chunks[k * w + self.rank]
                yield [(i, plan) for i in chunk] if chunk else [(None, plan)]

    def mark_trained(self, plan: StepPlan) -> None:
        """Record that the micro-batch of ``plan`` has entered training (it is done once its step is)."""
        done = plan["step"] + (1 if plan["micro"] == plan["accumulation"] - 1 else 0)
        self._trained = (plan["epoch"], done)

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._trained
        return {"epoch": epoch, "steps_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["steps_done"])
        if done >= self.steps_per_epoch:  # saved at the end of an epoch: the next one starts fresh
            epoch, done = epoch + 1, 0
        self._resume = (epoch, done)
        self._trained = (epoch, done)
        self.sampler.set_epoch(epoch)


class PlannedDataset(Dataset):
    """Wraps a dataset so the sampler's ``(index, plan)`` keys fetch ``(item or None, plan)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int | None, StepPlan]) -> tuple[Any, StepPlan]:
        index, plan = key
        return (None if index is None else self.dataset[index]), plan


def planned_collate(collate: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[tuple[Any, StepPlan]]], dict]:
    """A collate function for :class:`PlannedDataset` items: ``collate`` of the items + ``step``."""
    return _PlannedCollate(collate)


class _PlannedCollate:
    # A class rather than a closure so DataLoader workers can pickle it.
    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, StepPlan]]) -> dict[str, Any]:
        batch = self.collate([item for item, _ in items if item is not None])
        batch["step"] = dict(items[0][1])
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning's checkpoints."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]
