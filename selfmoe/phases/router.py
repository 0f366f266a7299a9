"""`python -m selfmoe router`: compose the experts into MiXSE and train the router (PAPER §1.3).

Reads ``outputs/<model>/experts/<d>/`` for every domain in ``router.experts`` (failing fast,
naming the missing ones) and the union of their data, balanced across domains. Writes
``outputs/<model>/<router.name>/`` = ``router.safetensors`` + ``mixse.json`` (expert dirs and
hashes, router settings, base model id) + ``config.yaml`` + ``manifest.json`` + ``routing/``
(routing statistics as JSON and PNG heatmaps, token-level views). Checkpoints (router only)
live in ``outputs/<model>/runs/<router.name>/`` and a rerun resumes from them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.routing import RoutingStatsCallback, TokenRoutingCallback
from selfmoe.artifacts import Layout, atomic_dir, read_manifest
from selfmoe.config import Config, RouterConfig, grad_accumulation
from selfmoe.data.prompts import sft_prompt
from selfmoe.data.schema import read_jsonl
from selfmoe.errors import SelfMoEError
from selfmoe.models.base import load_base, model_id
from selfmoe.models.mixse import (
    MIXSE_FILE,
    ROUTER_FILE,
    RouterSettings,
    adapter_hash,
    build_mixse,
    expert_parameters,
    read_expert,
    save_mixse,
)
from selfmoe.phases import generate
from selfmoe.phases.common import artifact_key, is_done, reporting_write_errors, resume_point, write_metadata
from selfmoe.phases.fitting import data_hashes, datamodule_for, fit, training_manifest
from selfmoe.training.router import RouterLitModule
from selfmoe.training.trainer import build_trainer

MIXSE_FILES = (ROUTER_FILE, MIXSE_FILE, "config.yaml", "manifest.json")
TOKEN_VIEW_PROMPTS = 1  # validation prompts per domain shown token by token


def settings_of(router: RouterConfig) -> RouterSettings:
    return RouterSettings(
        scope=router.scope,
        input=router.input,
        top_k=router.top_k,
        renormalize=router.renormalize,
        temperature=router.temperature,
        mode=router.mode,
    )


def expert_dirs(cfg: Config, base: str, experts: list[str] | None = None) -> dict[str, Path]:
    """The trained experts (default: router.experts); fails fast naming any not trained, or not on ``base``."""
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    dirs = {d: layout.expert(d) for d in (cfg.router.experts if experts is None else experts)}
    missing = [d for d, p in dirs.items() if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        hint = " ".join(f"`make expert DOMAIN={d}`" for d in missing)
        raise SelfMoEError(f"missing expert(s) {missing} under {layout.root / 'experts'}: train them first ({hint}).")
    for domain, path in dirs.items():
        made_from = (read_manifest(path) or {}).get("base_model")
        if made_from is not None and made_from != base:
            raise SelfMoEError(
                f"expert {domain!r} at {path} was trained on base model {made_from!r}, not {base!r}; "
                f"retrain it (`make expert DOMAIN={domain} force=true`)."
            )
    return dirs


def run(cfg: Config, callbacks: list[Callback] | None = None) -> Path:
    r = cfg.router
    base_id = model_id(cfg)
    experts = expert_dirs(cfg, base_id)
    expert_paths = {d: str(p) for d, p in experts.items()}
    data_dirs = generate.run(cfg, r.experts)
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    target = layout.root / r.name
    hashes = data_hashes(data_dirs)
    key = artifact_key(
        cfg,
        ("model", "router", "seed"),
        base=base_id,
        experts={d: adapter_hash(p) for d, p in experts.items()},
        data=hashes,
    )
    if is_done(target, key, cfg, f"MiXSE {r.name!r}", MIXSE_FILES):
        return target
    started = time.time()
    run_dir = layout.run(r.name)
    resume = resume_point(run_dir, key, cfg)

    L.seed_everything(cfg.seed, workers=True)
    base, tokenizer = load_base(cfg)
    model = build_mixse(base, [read_expert(d, p) for d, p in experts.items()], settings_of(r))
    if r.train_experts:
        for p in expert_parameters(model):
            p.requires_grad_(True)
    datamodule = datamodule_for(cfg, data_dirs, tokenizer, r, balance=r.balance)
    module = RouterLitModule(model, r)
    routing_dir = run_dir / "routing"
    if resume is None:  # a fresh run: no routing views of an earlier run may leak into this artifact
        shutil.rmtree(routing_dir, ignore_errors=True)
    prompts = _token_view_prompts(cfg, data_dirs, tokenizer)
    trainer = build_trainer(
        cfg,
        run_dir,
        max_epochs=r.epochs,
        accumulate=grad_accumulation(cfg),
        checkpoint_every_n_steps=r.checkpoint_every_n_steps,
        callbacks=[
            RoutingStatsCallback(routing_dir),
            TokenRoutingCallback(prompts, tokenizer, routing_dir),
            *(callbacks or []),
        ],
    )
    result = fit(trainer, module, datamodule, run_dir=run_dir, key=key, resume=resume)
    metrics = result.metrics
    kept = f"The previous artifact at {target}, if any, is unchanged."
    if trainer.is_global_zero:
        with reporting_write_errors(target.parent, kept), atomic_dir(target) as tmp:
            save_mixse(model, tmp, base_model=base_id, expert_dirs=expert_paths)
            if routing_dir.is_dir():
                shutil.copytree(routing_dir, tmp / "routing")
            write_metadata(
                tmp,
                cfg,
                {
                    "kind": "mixse",
                    "name": r.name,
                    "key": key,
                    "base_model": base_id,
                    "experts": expert_paths,
                    "data": hashes,
                    **training_manifest(cfg, result, module, datamodule, r),
                    "metrics": metrics,
                    "seconds": round(time.time() - started, 2),
                },
            )
    trainer.strategy.barrier()
    return target


def _token_view_prompts(cfg: Config, data_dirs: dict[str, Path], tokenizer) -> list[str]:
    """A few held-out examples per domain, in the training format, for the token-level view."""
    prompts = []
    on_error = "raise" if cfg.data.on_bad_line == "error" else "skip"
    for path in data_dirs.values():
        rows = read_jsonl(path / "val.jsonl", on_error=on_error) or read_jsonl(path / "train.jsonl", on_error=on_error)
        prompts += [sft_prompt(ex, cfg.model.template, tokenizer) + ex.output for ex in rows[:TOKEN_VIEW_PROMPTS]]
    return prompts
