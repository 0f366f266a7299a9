"""The one LightningDataModule over self-generated data, shared by the expert and router phases.

One domain for an expert; several (optionally balanced) for instance merging and the router.
Batches are ``micro_batch_size`` per rank; the trainer accumulates gradients so that
``micro_batch_size x accumulation x world size`` is the configured global batch at any scale.
Sampling is a seeded :class:`~torch.utils.data.DistributedSampler` even on one process, so
the data order depends only on (seed, epoch, world size): a resumed run sees the same batches.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from selfmoe.data.schema import Example, read_jsonl
from selfmoe.data.sft import Features, SFTDataset, collate, tokenize_example
from selfmoe.errors import DataError

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
        self.balance = balance
        self.seed = seed
        self.num_workers = num_workers
        self.on_bad_line = on_bad_line
        self.datasets: dict[str, SFTDataset] = {}
        self.skipped_too_long = 0

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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


def _balanced(per_domain: dict[str, list[Example]], seed: int) -> dict[str, list[Example]]:
    """Downsample every domain to the smallest one's size (seeded), so none dominates the mix."""
    n = min(len(rows) for rows in per_domain.values())
    rng = random.Random(seed)
    return {d: rng.sample(rows, n) if len(rows) > n else rows for d, rows in per_domain.items()}
