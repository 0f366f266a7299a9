"""`python -m selfmoe expert domain=<d>`: train a LoRA expert on a domain's data (PAPER §1.2).

Generates the domain's data first when it is missing. ``domain=all`` trains one LoRA on the
union of every domain's data: the instance-merging baseline. Writes
``outputs/<model>/experts/<name>/`` = a plain PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``) + ``config.yaml`` + ``manifest.json``. Checkpoints (adapter +
optimizer only) live in ``outputs/<model>/runs/expert-<name>/`` and a rerun resumes from them.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, PeftModel
from torch import nn

from selfmoe.artifacts import Layout, atomic_dir
from selfmoe.config import Config, grad_accumulation
from selfmoe.models.base import load_base, model_id
from selfmoe.models.compiling import compile_decoder_layers
from selfmoe.models.lora_train import autocast_precision, lora_training_model
from selfmoe.models.mixse import ADAPTER_FILES
from selfmoe.phases import generate
from selfmoe.phases.common import (
    artifact_key,
    device_for,
    is_done,
    reporting_write_errors,
    resume_point,
    write_metadata,
)
from selfmoe.phases.fitting import data_hashes, datamodule_for, fit, training_manifest
from selfmoe.training.expert import ExpertLitModule
from selfmoe.training.trainer import build_trainer

EXPERT_FILES = (*ADAPTER_FILES, "config.yaml", "manifest.json")

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """The expert of ``cfg.domain`` (its data first, when missing)."""
    data_dirs = generate.run(cfg)
    return train_expert(cfg, cfg.domain, data_dirs)


def run_all(cfg: Config) -> list[Path]:
    """`python -m selfmoe experts`: every domain's data (one base load), then each expert."""
    data_dirs = generate.run(cfg, sorted(cfg.domains))
    return [train_expert(replace(cfg, domain=d), d, {d: path}) for d, path in data_dirs.items()]


def lora_config(cfg: Config) -> LoraConfig:
    lora = cfg.expert.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(cfg.model.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def compiles(cfg: Config) -> bool:
    """Whether the phase compiles the decoder layers: ``expert.compile`` and training on a GPU.

    Never on a CPU: there the compile (seconds to minutes) outlasts a tiny model's whole run.
    """
    return cfg.expert.compile and device_for(cfg).type == "cuda"


def expert_model(cfg: Config, base: nn.Module, *, compile: bool | None = None) -> PeftModel:
    """``base`` with a fresh LoRA expert, set up the way this phase trains it (also what E3 times).

    ``compile``: torch.compile each decoder layer (:mod:`selfmoe.models.compiling`); None
    decides from the config and the device (:func:`compiles`).
    """
    model = lora_training_model(
        base, lora_config(cfg), fused=cfg.expert.fused_lora, autocast=autocast_precision(cfg.trainer.precision)
    )
    # Training and validation forwards need no KV cache. With one, every layer also indexes its
    # own cache slot, so a compiled layer specializes on its index: a compile per layer, until
    # dynamo's recompile limit sends the rest back to eager.
    model.get_base_model().config.use_cache = False
    if compile is None:
        compile = compiles(cfg)
    if compile:
        # In place, after PEFT has installed its layers: the model stays the same object with the
        # same parameter names, so the saved adapter, checkpoints and Lightning's/DDP's wrapping
        # are as without it. Lazy: the first training steps (and validation's) pay for the compile.
        # dynamic=True: batches are padded to their longest row and the last one is short, so
        # automatic dynamic would add a recompile per changed dimension on top of the graphs for
        # train and eval and for the first layer (its input needs no gradient), close to dynamo's
        # recompile limit (8), past which layers silently run eagerly; symbolic shapes need ~4.
        n = compile_decoder_layers(model, dynamic=True)
        log.info("expert.compile: %d decoder layers are compiled with torch.compile at their first call", n)
    return model


def train_expert(cfg: Config, name: str, data_dirs: dict[str, Path], callbacks: list[Callback] | None = None) -> Path:
    """Train (or resume, or skip when up to date) the expert ``name`` on ``data_dirs``."""
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    target = layout.expert(name)
    hashes = data_hashes(data_dirs)
    base_id = model_id(cfg)
    key = artifact_key(cfg, ("model", "expert", "seed"), base=base_id, data=hashes)
    if is_done(target, key, cfg, f"expert {name!r}", EXPERT_FILES):
        return target
    started = time.time()
    run_dir = layout.run(f"expert-{name}")
    resume = resume_point(run_dir, key, cfg)

    L.seed_everything(cfg.seed, workers=True)
    base, tokenizer = load_base(cfg)
    model = expert_model(cfg, base)
    datamodule = datamodule_for(cfg, data_dirs, tokenizer, cfg.expert, balance=False)
    module = ExpertLitModule(model, cfg.expert)
    trainer = build_trainer(
        cfg,
        run_dir,
        max_epochs=cfg.expert.epochs,
        accumulate=grad_accumulation(cfg),
        checkpoint_every_n_steps=cfg.expert.checkpoint_every_n_steps,
        callbacks=callbacks,
    )
    result = fit(trainer, module, datamodule, run_dir=run_dir, key=key, resume=resume)
    metrics = result.metrics
    kept = f"The previous artifact at {target}, if any, is unchanged."
    if trainer.is_global_zero:
        with reporting_write_errors(target.parent, kept), atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            for extra in set(p.name for p in tmp.iterdir()) - set(ADAPTER_FILES):
                _remove(tmp / extra)  # PEFT's auto-generated model card is not part of the artifact
            write_metadata(
                tmp,
                cfg,
                {
                    "kind": "expert",
                    "domain": name,
                    "domains": sorted(data_dirs),
                    "key": key,
                    "base_model": base_id,
                    "data": hashes,
                    **training_manifest(cfg, result, module, datamodule, cfg.expert),
                    "metrics": {
                        "val_loss_before": metrics.get("val_loss_before"),
                        "val_loss_after": metrics.get("val/loss"),
                        "train_loss_last": metrics.get("train/loss"),
                    },
                    "seconds": round(time.time() - started, 2),
                },
            )
    trainer.strategy.barrier()
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _val_loss(results: list[dict[str, float]]) -> float | None:
    return float(results[0]["val/loss"]) if results and "val/loss" in results[0] else None
