"""Reading PEFT LoRA adapter directories: safetensors only, plain LoRA only, every tensor checked.

MiXSE (stacked experts) and the merging baselines compute with an adapter's factors themselves
instead of through PEFT, so whatever PEFT would compute differently from ``W0 x + s·B·A x`` must be
refused here, by name, rather than silently computed another way: DoRA and other variants, trained
biases, ``modules_to_save``, stray tensors, initialisations that rewrite ``W0``. Weights are read
from ``adapter_model.safetensors`` only; an ``adapter_model.bin`` is a pickle, which can run code
when loaded, and is never opened.

A file that parses may still be damaged (a flipped exponent bit reads as inf or NaN), so factors
must be finite; their ranks must agree with the config (``r``/``rank_pattern``), and a base model
can be checked for fit (:func:`fit_problems`) before any module is touched.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from selfmoe.errors import DataError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Config switches whose adapters are not ``W0 + s·B·A`` on the saved base (variants, extra trained tensors).
UNSUPPORTED = (
    "use_dora", "use_qalora", "use_bdlora", "alora_invocation_tokens", "monteclora_config", "arrow_config",
    "kasa_config", "lora_ga_config", "lora_bias", "layer_replication", "target_parameters", "modules_to_save",
    "trainable_token_indices",
)  # fmt: skip
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")  # they rewrite W0 (or the forward)
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "EA", ".lora_embedding_B": "EB"}
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ``ΔW = scale · B A`` (float tensors as stored).

    Linear: ``a`` is ``(r, d_in)`` and ``b`` is ``(d_out, r)``. Embedding (PEFT's
    ``lora_embedding_A/B``): ``a`` is ``(r, num_embeddings)`` and ``b`` is ``(dim, r)``, so ``B A``
    is the transpose of the weight's layout.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter directory: its config and its factors by base module name."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactors]

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base weights are stored ``(in, out)`` (GPT-2's Conv1D); ΔW is then transposed."""
        return bool(self.config.get("fan_in_fan_out"))


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule (``get_pattern_key``): the first key, in dict order, matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(directory: str | Path, *, where: str | None = None, fix: str = "retrain the expert") -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory.

    ``where`` names the adapter in messages (default ``adapter <dir>``) and ``fix`` says how to
    get a good one. Raises :class:`DataError` for missing, unreadable, corrupt (non-finite) or
    unsupported adapters; an adapter stored only as a pickle is refused without being opened.
    """
    path = Path(directory)
    where = where or f"adapter {path}"
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    pickles = [f for f in PICKLE_WEIGHTS if (path / f).is_file()]
    if ADAPTER_WEIGHTS in missing and pickles:
        raise DataError(
            f"{where} holds {pickles[0]} but no {ADAPTER_WEIGHTS}: selfmoe loads weights from safetensors only "
            "(a .bin/.pt file is a pickle, which can run code when loaded). Re-save the adapter with PEFT's "
            "save_pretrained (safetensors by default) in an environment you trust, or "
            f"{fix}."
        )
    if missing:
        raise DataError(f"{where} is missing {', '.join(missing)}: {fix}, or fix the path.")
    config = _read_config(path / ADAPTER_CONFIG, where, fix)
    _check_supported(config, where)
    try:
        tensors = load_file(path / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"{where}: {path / ADAPTER_WEIGHTS} is unreadable ({exc}); it is truncated or corrupt: {fix}."
        ) from None
    factors = _factors(tensors, config, where, fix)
    if not factors:
        raise DataError(f"{where} holds no LoRA weights; {fix}.")
    return LoraAdapter(path=path, config=config, factors=factors)


def _read_config(file: Path, where: str, fix: str) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: {file} is unreadable ({exc}); {fix}.") from None
    if not isinstance(config, dict):
        raise DataError(f"{where}: {file} is not a JSON object; {fix}.")
    return config


def _check_supported(config: Mapping[str, Any], where: str) -> None:
    bad = [k for k in UNSUPPORTED if config.get(k)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        bad.append(f"init_lora_weights={init!r}")
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none":
        bad.append(f"peft_type={config.get('peft_type')!r}, bias={config.get('bias')!r}")
    if bad:
        raise DataError(
            f"{where}: {'; '.join(bad)} is not a plain LoRA (W0 + s·B·A); selfmoe composes and merges plain "
            "LoRA only. Train the expert with selfmoe (`make expert`) or without those options."
        )


def _factors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str, fix: str):
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(name.removesuffix(suffix), {})[_SUFFIXES[suffix]] = tensor
        elif not name.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' base copies
            raise DataError(
                f"{where}: unexpected tensor {key!r} (not a LoRA factor: a trained bias, modules_to_save or "
                "trainable tokens?); selfmoe needs plain LoRA adapters."
            )
    factors: dict[str, LoraFactors] = {}
    for module, p in sorted(parts.items()):
        if set(p) not in ({"A", "B"}, {"EA", "EB"}):
            raise DataError(f"{where}: incomplete LoRA pair for {module}; {fix}.")
        embedding = "EA" in p
        a, b = (p["EA"], p["EB"]) if embedding else (p["A"], p["B"])
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise DataError(f"{where}: {module} is not a linear/embedding LoRA pair (A {a.shape}, B {b.shape}).")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise DataError(f"{where}: {module} has non-float LoRA factors ({a.dtype}, {b.dtype}); {fix}.")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DataError(f"{where}: {module} holds NaN or inf values: the file is corrupt; {fix}.")
        r = a.shape[0]
        if r != pattern_value(config.get("rank_pattern"), module, config.get("r")):
            raise DataError(f"{where}: {module} has rank {r} but its config says otherwise; {fix}.")
        alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise DataError(f"{where}: lora_alpha for {module} is {alpha!r}, not a number; {fix}.")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[module] = LoraFactors(a=a, b=b, scale=float(scale), embedding=embedding)
    return factors


def weight_shapes(factors: Mapping[str, LoraFactors], *, fan_in_fan_out: bool = False) -> dict[str, tuple[int, int]]:
    """The base weight shape each adapted module needs: ``B A`` for linears, transposed for embeddings/Conv1D."""
    out = {}
    for module, f in factors.items():
        delta = (int(f.b.shape[0]), int(f.a.shape[1]))
        out[module] = delta[::-1] if f.embedding or fan_in_fan_out else delta
    return out


def fit_problems(model: nn.Module, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Why adapted modules of these weight ``shapes`` do not fit ``model`` (empty when they do).

    Checked before anything is built, so a mismatch is one clear message instead of a shape error
    deep in a forward pass.
    """
    problems = []
    for module, expected in shapes.items():
        try:
            weight = model.get_submodule(module).weight
        except AttributeError:
            problems.append(f"{module}: no such module with a weight in this base model")
            continue
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(expected):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            problems.append(f"{module}: the adapter needs a weight of shape {tuple(expected)}, this model's is {got}")
    return problems


def check_fits(model: nn.Module, shapes: Mapping[str, tuple[int, int]], *, where: str, fix: str) -> None:
    """Refuse when :func:`fit_problems` finds anything (the first three problems named)."""
    problems = fit_problems(model, shapes)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(
            f"{where} does not fit this base model: {'; '.join(problems[:3])}{more}. It was made for another "
            f"base model: {fix}."
        )


def check_adapter(model: nn.Module, directory: str | Path, *, where: str | None = None) -> LoraAdapter:
    """Read, validate and fit-check an adapter for ``model`` before PEFT (or anything) loads it."""
    where = where or f"adapter {directory}"
    adapter = read_lora(directory, where=where)
    shapes = weight_shapes(adapter.factors, fan_in_fan_out=adapter.fan_in_fan_out)
    check_fits(model, shapes, where=where, fix="retrain it on this base model")
    return adapter
