"""What can be evaluated: the base model, an expert, a baseline merge, or MiXSE, built from config.

A *target* is a short string, the same in ``eval.targets``, in lm-eval's ``--model_args`` and in
the results directory names::

    base                     the frozen base model
    expert:<domain>          one self-specialized LoRA expert (a plain PEFT adapter)
    instance                 instance merging: one LoRA trained on the union of all domains
    merge:<method>           ΔW-space weight merging of the experts (linear | ties | dare)
    mixse[:<name>]           MiXSE from outputs/<model>/<name>/ (default: router.name)
    mixse[:<name>]@k=v@...   ... with router settings changed at evaluation time
                             (top_k, renormalize, temperature, mode: the Table 2 ablations)

Every target is built on a fresh base model loaded from config, and refuses artifacts made from
another base model. This module never imports Lightning.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfmoe.artifacts import Layout, read_manifest, sha256_file
from selfmoe.config import ALL_DOMAINS, MERGE_METHODS, Config
from selfmoe.errors import ConfigError, SelfMoEError
from selfmoe.models.base import load_base, model_id
from selfmoe.models.mixse import ADAPTER_FILES, MIXSE_FILE, RouterSettings, load_mixse, read_mixse_json

KINDS = ("base", "expert", "instance", "merge", "mixse")
EVAL_SETTINGS = ("top_k", "renormalize", "temperature", "mode")  # router settings a target may change
MERGE_LABELS = {"linear": "linear merging", "ties": "TIES merging", "dare": "DARE merging"}


@dataclass(frozen=True)
class Target:
    """A parsed target string."""

    spec: str
    kind: str
    arg: str | None = None  # the domain, the merge method, or the MiXSE directory name
    settings: dict[str, Any] = field(default_factory=dict)  # MiXSE router settings set at eval time

    @property
    def slug(self) -> str:
        """A file-system-safe name for the results directory."""
        return re.sub(r"[^A-Za-z0-9_.=@+-]", "-", self.spec)

    @property
    def label(self) -> str:
        """The row name in the paper's tables."""
        if self.kind == "expert":
            return f"{self.arg} expert"
        if self.kind == "instance":
            return "instance merging"
        if self.kind == "merge":
            return MERGE_LABELS[str(self.arg)]
        if self.kind == "mixse":
            name = "MiXSE" if self.arg in (None, "mixse") else f"MiXSE ({self.arg})"
            extra = ", ".join(f"{k}={v}" for k, v in self.settings.items())
            return f"{name} [{extra}]" if extra else name
        return "base"


def parse_target(spec: str, cfg: Config) -> Target:
    """Parse and check a target string against the configured domains."""
    head, *pairs = spec.strip().split("@")
    kind, _, arg = head.partition(":")
    usage = "use base, expert:<domain>, instance, merge:<linear|ties|dare> or mixse[:<name>][@key=value...]"
    if kind not in KINDS:
        raise ConfigError(f"unknown eval target {spec!r}: {usage}.")
    if pairs and kind != "mixse":
        raise ConfigError(f"eval target {spec!r}: only mixse takes @key=value settings.")
    if kind == "expert" and arg not in cfg.domains:
        raise ConfigError(f"eval target {spec!r}: unknown domain {arg!r}; known: {sorted(cfg.domains)}.")
    if kind == "merge" and arg not in MERGE_METHODS:
        raise ConfigError(f"eval target {spec!r}: unknown merge method {arg!r}; use one of {list(MERGE_METHODS)}.")
    if kind in ("base", "instance") and arg:
        raise ConfigError(f"eval target {spec!r}: {kind} takes no argument; {usage}.")
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in EVAL_SETTINGS:
            raise ConfigError(f"eval target {spec!r}: {pair!r} is not one of {list(EVAL_SETTINGS)}=<value>.")
        settings[key] = yaml.safe_load(value)
    if settings:
        try:  # the same checks the router config gets
            RouterSettings(**{k: v for k, v in settings.items() if k in ("mode",)})
        except ValueError as exc:
            raise ConfigError(f"eval target {spec!r}: {exc}") from None
    return Target(spec.strip(), kind, arg or (cfg.router.name if kind == "mixse" else None), settings)


def artifact_dir(cfg: Config, target: Target) -> Path | None:
    """Where the target's trained weights live (None for the base model)."""
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    if target.kind == "expert":
        return layout.expert(str(target.arg))
    if target.kind == "instance":
        return layout.expert(ALL_DOMAINS)
    if target.kind == "merge":
        return layout.root / "merges" / str(target.arg)
    if target.kind == "mixse":
        return layout.root / str(target.arg)
    return None


def how_to_make(target: Target) -> str:
    """The command that builds a missing target."""
    return {
        "expert": f"make expert DOMAIN={target.arg}",
        "instance": "make expert DOMAIN=all",
        "merge": f"make baselines (or python -m selfmoe merge merge.method={target.arg})",
        "mixse": "make router" + ("" if target.arg == "mixse" else f" ARGS='router.name={target.arg} ...'"),
    }.get(target.kind, "")


def _required_file(target: Target) -> str:
    from selfmoe.models.merging import MERGED_FILE

    return {"expert": ADAPTER_FILES[1], "instance": ADAPTER_FILES[1], "merge": MERGED_FILE, "mixse": MIXSE_FILE}[
        target.kind
    ]


def check_available(cfg: Config, targets: list[Target]) -> None:
    """Fail before any model is loaded when a target's artifact is missing, naming how to make it."""
    missing = []
    for t in targets:
        directory = artifact_dir(cfg, t)
        if directory is not None and not (directory / _required_file(t)).is_file():
            missing.append(f"{t.spec} (expected under {directory}; run `{how_to_make(t)}`)")
    if missing:
        raise SelfMoEError("cannot evaluate missing target(s): " + "; ".join(missing) + ".")


@dataclass
class BuiltTarget:
    """A target ready for lm-eval: the model object, its tokenizer, and what it was made from."""

    target: Target
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    provenance: dict[str, Any]

    @property
    def is_mixse(self) -> bool:
        return hasattr(self.model, "mixse")


def _same_base(made_from: str | None, base: str, where: Path, fix: str) -> None:
    if made_from is not None and made_from != base:
        raise SelfMoEError(f"{where} was made from base model {made_from!r}, not {base!r}; rebuild it ({fix}).")


def build_target(cfg: Config, target: Target, device: str | torch.device = "cpu") -> BuiltTarget:
    """Load the base model and turn it into ``target``; eval mode, no gradients."""
    check_available(cfg, [target])
    base_id = model_id(cfg)
    directory = artifact_dir(cfg, target)
    model, tokenizer = load_base(cfg, device=device)
    provenance: dict[str, Any] = {"target": target.spec, "base_model": base_id}
    if target.kind in ("expert", "instance"):
        from peft import PeftModel

        from selfmoe.models.adapter import check_adapter

        assert directory is not None
        _same_base((read_manifest(directory) or {}).get("base_model"), base_id, directory, how_to_make(target))
        check_adapter(model, directory, where=f"{target.spec} at {directory}")
        model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
        provenance |= {"artifact": str(directory), "sha256": sha256_file(directory / ADAPTER_FILES[1])}
    elif target.kind == "merge":
        from selfmoe.models.merging import MERGED_FILE, apply_deltas, load_merged

        assert directory is not None
        deltas, meta = load_merged(directory)
        _same_base(meta.get("base_model"), base_id, directory, how_to_make(target))
        apply_deltas(model, deltas)
        provenance |= {"artifact": str(directory), "sha256": sha256_file(directory / MERGED_FILE), "merge": meta}
    elif target.kind == "mixse":
        assert directory is not None
        meta = read_mixse_json(directory)
        model = load_mixse(model, directory, base_model=base_id, **target.settings)
        settings = dataclasses.asdict(model.mixse.settings)
        provenance |= {"artifact": str(directory), "experts": meta["experts"], "router": settings}
    model.requires_grad_(False)
    model.eval()
    return BuiltTarget(target, model, tokenizer, provenance)
