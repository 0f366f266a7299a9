"""`python -m selfmoe generate domain=<d>`: self-generate a domain's training data (PAPER §1.1).

Writes ``outputs/<model>/data/<domain>/``: ``train.jsonl`` and ``val.jsonl`` (the kept items,
split), ``raw.jsonl`` (every answered instruction, dropped ones with ``meta.drop``),
``seeds.jsonl`` (the seeds used), ``config.yaml`` and ``manifest.json`` (seed ids, counts per
filter, throughput). A finished set made with the same settings is reused.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfmoe.artifacts import Layout, atomic_dir, sha256_text
from selfmoe.config import Config
from selfmoe.data.generation import TextGenerator
from selfmoe.data.schema import write_jsonl
from selfmoe.data.seeds import load_seeds
from selfmoe.data.selfgen import domain_seed, self_generate, split_train_val
from selfmoe.errors import DataError
from selfmoe.models.base import load_base, model_id
from selfmoe.phases.common import artifact_key, device_for, is_done, log, write_metadata
from selfmoe.progress import make_progress

DATA_FILES = ("train.jsonl", "val.jsonl", "raw.jsonl", "seeds.jsonl", "config.yaml", "manifest.json")


def seed_source(cfg: Config, domain: str):
    seeds = cfg.domains[domain].seeds
    return seeds.hub if cfg.data.seed_source == "hub" else seeds.local


BaseLoader = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def lazy_base(cfg: Config) -> BaseLoader:
    """The base model, loaded on first call only: finished domains never pay for loading it."""
    return functools.cache(lambda: load_base(cfg, device=device_for(cfg)))


def run(cfg: Config, domains: list[str] | None = None) -> dict[str, Path]:
    """Generate the data of each of ``domains`` (default ``cfg.domain_names``) not up to date."""
    base = lazy_base(cfg)
    return {domain: ensure_data(cfg, domain, base) for domain in domains or cfg.domain_names}


def ensure_data(cfg: Config, domain: str, base: BaseLoader | None = None) -> Path:
    """The data dir of ``domain``, generated first unless an up-to-date one exists."""
    dom = cfg.domains[domain]
    target = Layout.for_model(cfg.output_dir, cfg.model.name).data(domain)
    seeds = load_seeds(domain, seed_source(cfg, domain), count=dom.seeds.count, seed=cfg.seed)
    seeds_hash = sha256_text("\n".join(repr(s.to_dict()) for s in seeds))
    base_id = model_id(cfg)
    key = artifact_key(cfg, ("model", "data", f"domains.{domain}", "seed"), base=base_id, seeds=seeds_hash)
    if is_done(target, key, cfg, f"data for {domain!r}", DATA_FILES):
        return target
    gen = TextGenerator(*(base or lazy_base(cfg))())
    target_count = cfg.data.num_examples or dom.num_examples
    started = time.time()
    with make_progress() as progress:
        tasks = {
            stage: progress.add_task(f"{domain}: {stage}", total=target_count, rate="")
            for stage in ("brainstorm", "respond")
        }

        def report(stage: str, done: int, total: int) -> None:
            rate = f"{gen.throughput.tokens_per_second:,.0f} tok/s"
            progress.update(tasks[stage], completed=done, total=total, rate=rate)

        result = self_generate(gen, dom, seeds, cfg.data, target=target_count, seed=cfg.seed, progress=report)
    stats = result.stats()
    # Falling short of the target is legal (the model stopped producing usable items) but loud.
    log.log(
        logging.INFO if len(result.items) == target_count else logging.WARNING,
        "%s: kept %d of %d requested; drops %s; %.0f tok/s",
        domain,
        len(result.items),
        target_count,
        stats["counts"],
        stats["tokens_per_second"],
    )
    if not result.items:
        raise DataError(
            f"self-generation for {domain!r} kept no items (drops by reason: {stats['counts']}). "
            "The model did not follow the prompt format: check configs/domain/"
            f"{domain}.yaml (checks, prompts) or raise data.max_new_tokens_*."
        )
    train, val = split_train_val(result.items, cfg.data.val_fraction, domain_seed(cfg.seed, domain))
    with atomic_dir(target) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "raw.jsonl", [*result.items, *result.rejected])
        write_jsonl(tmp / "seeds.jsonl", seeds)
        write_metadata(
            tmp,
            cfg,
            {
                "kind": "data",
                "domain": domain,
                "key": key,
                "base_model": base_id,
                "seed_source": cfg.data.seed_source,
                "seed_ids": [s.id for s in seeds],
                "requested": target_count,
                "train": len(train),
                "val": len(val),
                "generation": stats,
                "seconds": round(time.time() - started, 2),
            },
        )
    return target
