"""The training skeleton the expert and router phases share: data, validate, fit/resume, manifest."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from transformers import PreTrainedTokenizerBase

from selfmoe.artifacts import atomic_write_json, read_json, sha256_file
from selfmoe.config import Config, OptimConfig, world_size
from selfmoe.data.datamodule import SFTDataModule
from selfmoe.phases.common import log, reporting_write_errors
from selfmoe.training.sft import SFTLitModule
from selfmoe.training.trainer import LOG_DIRS


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
        global_batch_size=optim.global_batch_size,
        balance=balance,
        seed=cfg.seed,
        num_workers=optim.num_workers,
        on_bad_line=cfg.data.on_bad_line,
    )


@dataclass
class FitResult:
    metrics: dict[str, float | None]  # val_loss_before and the final train/, val/, router/ metrics
    steps: int  # optimizer steps taken in all (including those of an interrupted run resumed here)


def fit(
    trainer: L.Trainer,
    module: SFTLitModule,
    datamodule: SFTDataModule,
    *,
    run_dir: Path,
    key: str,
    resume: str | None,
) -> FitResult:
    """Validate once before a fresh run, fit (resuming from ``resume``), return the metrics.

    The pre-training validation loss is kept in ``run_dir/run.json`` so a resumed run still
    reports it. A module with nothing to train is only validated. A full or unwritable
    ``run_dir`` is reported as :class:`~selfmoe.training.faults.OutputWriteError`.
    """
    # Here rather than inside fit: a fork-launched strategy (ddp_notebook) then inherits the
    # tokenized data, and the manifest's counts are known in the process that writes it.
    datamodule.setup("fit")
    if resume is None and trainer.is_global_zero:
        # A fresh run: the CSV logger appends, so an earlier run's metrics must not stay there.
        for name in LOG_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    state = read_json(run_dir / "run.json")
    with reporting_write_errors(run_dir, "The last checkpoint there, if any, is unchanged."):
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
        metrics = _final_metrics(trainer)
        if module.num_trainable and "val/loss" not in metrics and datamodule.datasets["val"]:
            # Resumed from a checkpoint taken after the last step: nothing was left to run.
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = {**_final_metrics(trainer), **metrics}
    steps = metrics.pop("train/steps", None)
    return FitResult(
        metrics={"val_loss_before": state.get("val_loss_before"), **metrics},
        steps=int(steps) if steps is not None else trainer.global_step,
    )


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "router/"))}


def training_manifest(
    cfg: Config, result: FitResult, module: SFTLitModule, datamodule: SFTDataModule, optim: OptimConfig
) -> dict[str, Any]:
    """The manifest fields every trained artifact records."""
    return {
        "train_examples": len(datamodule.datasets["train"]),
        "val_examples": len(datamodule.datasets["val"]),
        "skipped_too_long": datamodule.skipped_too_long,
        "trainable_params": module.num_trainable,
        "total_params": module.num_total,
        "steps": result.steps,
        "epochs": optim.epochs,
        "global_batch_size": optim.global_batch_size,
        "world_size": world_size(cfg.trainer),
    }
