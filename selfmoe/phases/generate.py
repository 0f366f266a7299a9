"""`python -m selfmoe generate domain=<d>`: self-generate a domain's training data (PAPER §1.1).

Writes ``outputs/<model>/data/<domain>/``: ``train.jsonl`` and ``val.jsonl`` (the kept items,
split), ``raw.jsonl`` (every answered instruction, dropped ones with ``meta.drop``),
``seeds.jsonl`` (the seeds used), ``config.yaml`` and ``manifest.json`` (seed ids, counts per
filter, throughput). A finished set made with the same settings is reused.

Generation runs on the devices of ``cfg.trainer`` (``trainer=ddp trainer.devices=N``): each call's
batches are spread over the ranks and merged in order, so the data does not depend on the
world size. Finished batches are journaled in ``<data dir>/partial/``; a killed run resumes
from them when rerun with the same settings, and the journal goes when the artifact is written.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfmoe.artifacts import Layout, atomic_dir, sha256_text
from selfmoe.config import Config
from selfmoe.data.generation import TextGenerator
from selfmoe.data.journal import BatchJournal
from selfmoe.data.schema import Example, write_jsonl
from selfmoe.data.seeds import load_seeds
from selfmoe.data.selfgen import domain_seed, self_generate, split_train_val
from selfmoe.data.sharded import Collective, ShardedGenerator
from selfmoe.errors import DataError
from selfmoe.models.base import load_base, model_id
from selfmoe.phases.common import artifact_key, is_done, log, reporting_write_errors, write_metadata
from selfmoe.progress import make_progress
from selfmoe.training.generate import run_on_ranks

PARTIAL_DIR = "partial"  # the journal of an unfinished run, inside the data dir
DATA_FILES = ("train.jsonl", "val.jsonl", "raw.jsonl", "seeds.jsonl", "config.yaml", "manifest.json")


def seed_source(cfg: Config, domain: str):
    seeds = cfg.domains[domain].seeds
    return seeds.hub if cfg.data.seed_source == "hub" else seeds.local


BaseLoader = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def lazy_base(cfg: Config) -> BaseLoader:
    """The base model, loaded on first call only: finished domains never pay for loading it.

    It is loaded on the CPU: the generation strategy moves it to each rank's device.
    """
    return functools.cache(lambda: load_base(cfg))


def run(cfg: Config, domains: list[str] | None = None) -> dict[str, Path]:
    """Generate the data of each of ``domains`` (default ``cfg.domain_names``) not up to date."""
    base = lazy_base(cfg)
    return {domain: ensure_data(cfg, domain, base) for domain in domains or cfg.domain_names}


def ensure_data(cfg: Config, domain: str, base: BaseLoader | None = None) -> Path:
    """The data dir of ``domain``, generated first unless an up-to-date one exists."""
    dom = cfg.domains[domain]
    target = Layout.for_model(cfg.output_dir, cfg.model.name).data(domain)
    seeds = load_seeds(
        domain, seed_source(cfg, domain), count=dom.seeds.count, seed=cfg.seed, on_bad_line=cfg.data.on_bad_line
    )
    seeds_hash = sha256_text("\n".join(repr(s.to_dict()) for s in seeds))
    base_id = model_id(cfg)
    key = artifact_key(cfg, ("model", "data", f"domains.{domain}", "seed"), base=base_id, seeds=seeds_hash)
    if is_done(target, key, cfg, f"data for {domain!r}", DATA_FILES):
        return target
    if cfg.data.source == "seeds":
        log.info("%s: data.source=seeds, training on the %d seeds themselves (no generation)", domain, len(seeds))
    model, tokenizer = (base or lazy_base(cfg))()
    job = _Job(cfg, domain, target, key, base_id, tokenizer, seeds)
    run_on_ranks(cfg, model, job)
    return target


@dataclass
class _Job:
    """Generate one domain's data on every rank; rank zero writes the artifact.

    A plain picklable object (not a closure) so spawning strategies can ship it to their workers.
    """

    cfg: Config
    domain: str
    target: Path
    key: str
    base_id: str
    tokenizer: PreTrainedTokenizerBase
    seeds: list[Example]

    def __call__(self, model: PreTrainedModel, collective: Collective) -> None:
        cfg, domain, dom = self.cfg, self.domain, self.cfg.domains[self.domain]
        if cfg.data.source == "seeds":  # the seed-only control (PAPER §1.4): the seeds are the data
            if collective.rank == 0:
                self._write(list(self.seeds), [], len(self.seeds), {"source": "seeds"}, 0.0)
            collective.barrier()
            return
        # The model is on this rank's device by now. Compiling on the CPU would cost seconds to minutes
        # per shape and gain little, so data.compile applies on a GPU only.
        on_gpu = next(model.parameters()).device.type == "cuda"
        gen = ShardedGenerator(
            TextGenerator(model, self.tokenizer, compile=cfg.data.compile and on_gpu),
            batch_size=cfg.data.batch_size,
            collective=collective,
            journal=BatchJournal(self.target / PARTIAL_DIR, self.key),
            fresh=cfg.force,
        )
        rank0 = collective.rank == 0
        target_count = cfg.data.num_examples or dom.num_examples
        started = time.time()
        with make_progress(disable=not rank0) as progress:
            tasks = {
                stage: progress.add_task(f"{domain}: {stage}", total=target_count, rate="")
                for stage in ("brainstorm", "respond")
            }

            def report(stage: str, done: int, total: int) -> None:
                rate = f"{gen.throughput.tokens_per_second:,.0f} tok/s"
                progress.update(tasks[stage], completed=done, total=total, rate=rate)

            result = self_generate(gen, dom, self.seeds, cfg.data, target=target_count, seed=cfg.seed, progress=report)
        stats = {**result.stats(), "batches": dict(sorted(gen.batches.items())), "world_size": gen.world_size}
        if rank0:
            # Falling short of the target is legal (the model stopped producing usable items) but loud.
            log.log(
                logging.INFO if len(result.items) == target_count else logging.WARNING,
                "%s: kept %d of %d requested; drops %s; %d batches generated, %d replayed; %.0f tok/s",
                domain,
                len(result.items),
                target_count,
                stats["counts"],
                gen.batches["generated"],
                gen.batches["replayed"],
                stats["tokens_per_second"],
            )
        if not result.items:  # every rank has the same result, so every rank stops here
            raise DataError(
                f"self-generation for {domain!r} kept no items (drops by reason: {stats['counts']}). "
                "The model did not follow the prompt format: check configs/domain/"
                f"{domain}.yaml (checks, prompts) or raise data.max_new_tokens_*."
            )
        if rank0:
            self._write(result.items, result.rejected, target_count, stats, time.time() - started)
        collective.barrier()  # the other ranks go on only once the artifact is in place

    def _write(
        self, items: list[Example], rejected: list[Example], requested: int, stats: dict[str, Any], seconds: float
    ) -> None:
        """Swap the finished artifact in; the journal inside the old directory goes with it."""
        cfg, domain = self.cfg, self.domain
        train, val = split_train_val(items, cfg.data.val_fraction, domain_seed(cfg.seed, domain))
        kept = f"The previous data at {self.target}, if any, is unchanged (and so is the batch journal)."
        with reporting_write_errors(self.target.parent, kept), atomic_dir(self.target) as tmp:
            write_jsonl(tmp / "train.jsonl", train)
            write_jsonl(tmp / "val.jsonl", val)
            write_jsonl(tmp / "raw.jsonl", [*items, *rejected])
            write_jsonl(tmp / "seeds.jsonl", self.seeds)
            write_metadata(
                tmp,
                cfg,
                {
                    "kind": "data",
                    "domain": domain,
                    "key": self.key,
                    "base_model": self.base_id,
                    "seed_source": cfg.data.seed_source,
                    "seed_ids": [s.id for s in self.seeds],
                    "requested": requested,
                    "train": len(train),
                    "val": len(val),
                    "generation": stats,
                    "seconds": round(seconds, 2),
                },
            )
