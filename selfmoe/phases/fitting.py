"""The training skeleton the expert and router phases share: data, validate, fit/resume, manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from transformers import PreTrainedTokenizerBase

from selfmoe.artifacts import atomic_write_json, sha256_file
from selfmoe.config import Config, OptimConfig, world_size
from selfmoe.data.datamodule import SFTDataModule
from selfmoe.phases.common import log, read_json
from selfmoe.training.sft import SFTLitModule


def data_hashes(data_dirs: dict[str, Path]) -> dict[str, dict[str, str]]:
    """What a trained artifact depends on in its data: the train and val files' hashes."""
    return {d: {s: sha256_file(p / f"{s}.jsonl") for s in ("train", "val")} for d, p in data_dirs.items()}


def datamodule_for(
    cfg: Config, data_dirs: dict[str, Path], tokenizer: PreTrainedTokenizerBase, optim: OptimConfig, *, balance: bool
) -> SFTDataModule:
    return SFTDataModule(
        data_dirs,
        tokenizer,
        template=cfg.model.template,
        max_length=cfg.model.max_length,
        micro_batch_size=optim.micro_batch_size,
        balance=balance,
        seed=cfg.seed,
        num_workers=optim.num_workers,
        on_bad_line=cfg.data.on_bad_line,
    )


def fit(
    trainer: L.Trainer,
    module: SFTLitModule,
    datamodule: SFTDataModule,
    *,
    run_dir: Path,
    key: str,
    resume: str | None,
) -> dict[str, float | None]:
    """Validate once before a fresh run, fit (resuming from ``resume``), return the metrics.

    The pre-training validation loss is kept in ``run_dir/run.json`` so a resumed run still
    reports it. A module with nothing to train is only validated.
    """
    state = read_json(run_dir / "run.json")
    if resume is None:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        before = results[0].get("val/loss") if results else None
        state = {"key": key, "val_loss_before": None if before is None else float(before)}
        if trainer.is_global_zero:
            atomic_write_json(run_dir / "run.json", state)
    else:
        log.info("resuming from %s", resume)
    if module.num_trainable:
        # Checkpoints hold tensors and plain state only: never unpickle arbitrary objects.
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "router/"))}
    return {"val_loss_before": state.get("val_loss_before"), **metrics}


def training_manifest(
    cfg: Config, trainer: L.Trainer, module: SFTLitModule, datamodule: SFTDataModule, optim: OptimConfig
) -> dict[str, Any]:
    """The manifest fields every trained artifact records."""
    return {
        "train_examples": len(datamodule.datasets["train"]),
        "val_examples": len(datamodule.datasets["val"]),
        "skipped_too_long": datamodule.skipped_too_long,
        "trainable_params": module.num_trainable,
        "total_params": module.num_total,
        "steps": trainer.global_step,
        "epochs": optim.epochs,
        "global_batch_size": optim.global_batch_size,
        "world_size": world_size(cfg.trainer),
    }
