"""Weight-merging baselines of the LoRA experts: linear (task arithmetic), TIES and DARE.

All methods act on the true weight deltas. A PEFT LoRA on a weight ``W0`` adds ``ΔW = s · B A``
(``A`` is ``r x d_in``, ``B`` is ``d_out x r``; ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, where
``r`` and ``alpha`` come per module from ``rank_pattern`` / ``alpha_pattern``; transposed for
``fan_in_fan_out`` and embedding layers). PEFT's own ``add_weighted_adapter`` modes ``linear``/``ties``/``dare_*``
combine A and B separately (cross terms ``B_i A_j``), which is neither TIES nor DARE on weights. Here,
per module, for experts ``ΔW_1..ΔW_N`` (float32), entries indexed by ``p``:

* ``linear`` (task arithmetic): ``ΔW = Σ_i λ_i ΔW_i``; ``λ_i`` default ``1/N``.
* ``ties`` (Yadav et al. 2023, Algorithm 1): (1) trim: ``τ̂_i = ΔW_i ⊙ [|ΔW_i| ≥ t_i]`` where ``t_i`` is the
  ``k``-th largest ``|entry|`` of ``ΔW_i``, ``k = max(1, ⌊density · numel + 1/2⌋)`` (entries tied with ``t_i``
  are all kept); (2) elect sign: ``γ = sgn(Σ_i τ̂_i)``; (3) disjoint merge:
  ``A^p = {i : sgn(τ̂_i^p) = γ^p ≠ 0}``, ``τ^p = (1/|A^p|) Σ_{i∈A^p} τ̂_i^p`` (``0`` where ``A^p`` is empty);
  ``ΔW = λ · τ`` (``λ = scale``, default 1). The paper trims over the whole task vector; we trim each
  module's matrix on its own (as PEFT and mergekit do), which lets us stream module by module.
* ``dare`` (Yu et al. 2023, DARE + task arithmetic): ``δ̂_i = m_i ⊙ ΔW_i / (1 - p)`` with ``m_i^p`` i.i.d.
  ``Bernoulli(1 - p)`` (each entry dropped with probability ``p``), then ``ΔW = Σ_i λ_i δ̂_i``.
* ``dare_ties``: DARE's drop-and-rescale replaces TIES's trim, then sign election and disjoint merge, ``× λ``.

DARE masks are reproducible and independent of which modules are merged or in what order: expert ``i``'s
mask on ``module`` is ``torch.rand(shape, generator=g) >= p`` (CPU, float32) with ``g`` seeded by
:func:`dare_seed` ``(seed, module, i)``. Memory: ``ΔW`` of a whole 7B model is about the model's size, so
:func:`merge_deltas` materialises one module's ``N`` deltas at a time (experts are read lazily by
:class:`LoraDeltas`) and stores only the merged result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfmoe.artifacts import atomic_dir, atomic_write_json, sha256_file, versions
from selfmoe.errors import ConfigError, DataError
from selfmoe.models.adapter import read_lora
from selfmoe.models.mixse import adapter_hash

METHODS = ("linear", "ties", "dare", "dare_ties")
MERGED_FILE, MERGE_JSON, FORMAT_VERSION = "merged.safetensors", "merge.json", 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoraDeltas(Mapping[str, torch.Tensor]):
    """One PEFT LoRA adapter as a lazy ``{base module name: ΔW (float32)}`` mapping.

    A and B (small) are read at once and validated (:func:`~selfmoe.models.adapter.read_lora`);
    each dense ``ΔW`` is computed only when accessed.
    """

    def __init__(self, adapter_dir: str | Path, *, device: str | torch.device = "cpu") -> None:
        self.path, self.device = Path(adapter_dir), torch.device(device)
        adapter = read_lora(self.path)
        # PEFT stores embeddings' factors transposed, and Conv1D-style weights (fan_in_fan_out) as (in, out).
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {
            module: (f.a, f.b, f.scale, f.embedding or adapter.fan_in_fan_out) for module, f in adapter.factors.items()
        }

    def __getitem__(self, module: str) -> torch.Tensor:
        a, b, scale, transpose = self._factors[module]
        delta = (b.to(self.device, torch.float32) @ a.to(self.device, torch.float32)) * scale
        return delta.T.contiguous() if transpose else delta

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)


def lora_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The dense float32 ``ΔW`` of every adapted module of one PEFT LoRA adapter, by base module name."""
    return dict(LoraDeltas(adapter_dir))


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its hyperparameters; parameters a method does not use must stay unset."""

    method: str
    weights: tuple[float, ...] | None = None  # linear, dare: λ_i per expert (None: 1/N each)
    density: float | None = None  # ties: fraction of each ΔW_i kept by magnitude, in (0, 1]
    drop_p: float | None = None  # dare, dare_ties: drop probability, in [0, 1)
    scale: float | None = None  # ties, dare_ties: λ on the disjoint mean (None: 1.0)
    seed: int | None = None  # dare, dare_ties: the masks' seed

    def __post_init__(self) -> None:
        if self.weights is not None:  # a list from a config file: store a hashable tuple
            object.__setattr__(self, "weights", tuple(self.weights))
        if self.method not in METHODS:
            raise ConfigError(f"merge method {self.method!r}: use one of {', '.join(METHODS)}.")
        uses = {"weights": self.method in ("linear", "dare"), "density": self.method == "ties",
                "drop_p": self.method.startswith("dare"), "seed": self.method.startswith("dare"),
                "scale": self.method.endswith("ties")}  # fmt: skip
        unused = [k for k, used in uses.items() if not used and getattr(self, k) is not None]
        if unused:
            raise ConfigError(f"merge method {self.method!r} does not use {', '.join(unused)}; unset it.")
        if uses["density"] and not (self.density is not None and 0 < self.density <= 1):
            raise ConfigError(f"ties needs density in (0, 1] (fraction of entries kept), got {self.density}.")
        if uses["drop_p"] and not (self.drop_p is not None and 0 <= self.drop_p < 1):
            raise ConfigError(f"{self.method} needs drop_p in [0, 1) (drop probability), got {self.drop_p}.")
        if uses["seed"] and not isinstance(self.seed, int):
            raise ConfigError(f"{self.method} needs an integer seed for its random masks, got {self.seed!r}.")
        if not all(math.isfinite(x) for x in (*(self.weights or ()), self.scale or 0.0)):
            raise ConfigError(f"merge weights/scale must be finite numbers: {self.weights}, {self.scale}.")

    def expert_weights(self, n: int) -> list[float]:
        """λ_i for ``n`` experts (1/N each unless given); errors if the count differs."""
        if self.weights is None:
            return [1.0 / n] * n
        if len(self.weights) != n:
            raise ConfigError(f"{len(self.weights)} merge weights for {n} experts; give one weight per expert.")
        return [float(w) for w in self.weights]

    def params(self, n: int) -> dict[str, Any]:
        """The hyperparameters that shape the result, resolved (for merge.json)."""
        out: dict[str, Any] = {"weights": self.expert_weights(n)} if self.method in ("linear", "dare") else {}
        if self.method.endswith("ties"):
            out["scale"] = 1.0 if self.scale is None else self.scale
        out.update({k: getattr(self, k) for k in ("density", "drop_p", "seed") if getattr(self, k) is not None})
        return out


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = max(1, round-half-up(density · numel))`` largest-magnitude entries (ties kept); zero the rest."""
    n = delta.numel()
    k = max(1, int(density * n + 0.5))
    if k >= n:
        return delta
    threshold = delta.abs().flatten().kthvalue(n - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_disjoint_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elect ``γ = sgn(Σ_i τ_i)``; mean over ``i`` of the non-zero entries whose sign is ``γ`` (0 if none)."""
    stacked = torch.stack(list(deltas))
    agree = (torch.sign(stacked) == torch.sign(stacked.sum(0))) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_seed(seed: int, module: str, index: int) -> int:
    """The generator seed of expert ``index``'s DARE mask on ``module``: first 8 bytes of
    ``sha256(f"{seed}/{module}/{index}")``, big-endian, top bit cleared."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{module}/{index}".encode()).digest()[:8], "big") >> 1


def dare_drop(delta: torch.Tensor, p: float, seed: int, module: str, index: int) -> torch.Tensor:
    """Zero each entry with probability ``p`` and rescale the survivors by ``1/(1-p)``."""
    if p == 0:
        return delta
    generator = torch.Generator().manual_seed(dare_seed(seed, module, index))
    keep = torch.rand(delta.shape, generator=generator) >= p  # on CPU: masks do not depend on the device
    return delta * keep.to(delta.device) / (1 - p)


def merge_module(module: str, deltas: Sequence[torch.Tensor], spec: MergeSpec) -> torch.Tensor:
    """Merge one module's float32 deltas (one per expert, in expert order) by ``spec``."""
    if spec.method.startswith("dare"):
        deltas = [dare_drop(d, spec.drop_p, spec.seed, module, i) for i, d in enumerate(deltas)]
    if spec.method in ("linear", "dare"):
        out = torch.zeros_like(deltas[0])
        for w, d in zip(spec.expert_weights(len(deltas)), deltas, strict=True):
            out.add_(d, alpha=w)
        return out
    if spec.method == "ties":
        deltas = [ties_trim(d, spec.density) for d in deltas]
    return ties_disjoint_merge(deltas) * (1.0 if spec.scale is None else spec.scale)


def merge_deltas(
    experts: Sequence[Mapping[str, torch.Tensor]],
    spec: MergeSpec,
    *,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Merge per-expert ``{module: ΔW}`` mappings module by module (lazy mappings stream)."""
    names = list(names) if names is not None else [f"expert #{i}" for i in range(len(experts))]
    if not experts or len(names) != len(experts):
        raise ConfigError(f"merge needs at least one expert and one name per expert; got {len(experts)}, {names}.")
    spec.expert_weights(len(experts))  # fail on a bad weight count before any work
    modules = list(experts[0])
    for name, expert in zip(names[1:], experts[1:], strict=True):
        if set(expert) != set(modules):
            diff = sorted(set(expert) ^ set(modules))[:3]
            raise DataError(
                f"{name} adapts other modules than {names[0]} (e.g. {diff}); train all with one target set."
            )
    merged = {}
    for module in modules:
        deltas = [expert[module].float() for expert in experts]
        if len({d.shape for d in deltas}) != 1:
            shapes = {n: tuple(d.shape) for n, d in zip(names, deltas, strict=True)}
            raise DataError(f"{module}: experts' deltas differ in shape {shapes}; were they trained on one base model?")
        merged[module] = merge_module(module, deltas, spec).to(dtype)
    return merged


def merge_adapters(
    experts: Mapping[str, str | Path],
    spec: MergeSpec,
    *,
    base_model: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge adapter directories (``{name: dir}``, in order) by ``spec``; returns the deltas and merge.json's meta."""
    readers = [LoraDeltas(path, device=device) for path in experts.values()]
    merged = merge_deltas(readers, spec, names=list(experts), dtype=dtype)
    meta = {
        "method": spec.method,
        "params": spec.params(len(experts)),
        "experts": [{"name": n, "sha256": adapter_hash(p)} for n, p in experts.items()],
        "base_model": base_model,
    }
    return merged, meta


def save_merged(
    out_dir: str | Path,
    deltas: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    dtype: torch.dtype | str = "float32",
) -> None:
    """Write ``merged.safetensors`` (ΔW per module in ``dtype``) and ``merge.json``; ``out_dir`` is replaced whole."""
    missing = [k for k in ("method", "params", "experts", "base_model") if k not in meta]
    if missing:
        raise ConfigError(f"merge meta lacks {', '.join(missing)}; build it with merge_adapters().")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in deltas.items()}
    with atomic_dir(out_dir) as tmp:  # both files or neither
        save_file(tensors, tmp / MERGED_FILE)
        info = {"format": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."), "modules": len(tensors)}
        atomic_write_json(
            tmp / MERGE_JSON, {**meta, **info, "sha256": sha256_file(tmp / MERGED_FILE), "versions": versions()}
        )


def load_merged(directory: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The merged deltas (as stored) and merge.json; ``verify`` checks the weights' sha256."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / MERGE_JSON).read_text())
        if verify and sha256_file(directory / MERGED_FILE) != meta.get("sha256"):
            raise DataError(f"{directory / MERGED_FILE} does not match {MERGE_JSON}; re-run the merge.")
        return load_file(directory / MERGED_FILE), meta
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"merged weights at {directory} are missing or unreadable ({exc}); re-run the merge.") from None


def _targets(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Check every module before touching any, so a mismatch leaves the model as it was.
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    weights, problems = {}, []
    for name, delta in deltas.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            problems.append(f"{name}: no such module with a weight")
            continue
        if tuple(weight.shape) != tuple(delta.shape) or not weight.is_floating_point():
            problems.append(f"{name}: weight {tuple(weight.shape)} {weight.dtype} vs delta {tuple(delta.shape)}")
        elif counts.get(id(weight), 1) > 1:  # e.g. tied embeddings: an in-place add would change both
            problems.append(f"{name}: its weight is shared with another module")
        weights[name] = weight
    if problems:
        raise ConfigError(
            f"merged deltas do not fit this model ({'; '.join(problems[:3])}); load the base they were merged for."
        )
    return weights


def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """``W ← W0 + ΔW`` in place for every module in ``deltas`` (added in float32, stored in W's dtype/device)."""
    with torch.no_grad():
        for name, weight in _targets(model, deltas).items():
            weight.copy_(weight.float() + deltas[name].to(weight.device, torch.float32))


@contextlib.contextmanager
def merged_weights(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Apply ``deltas`` for the ``with`` block, then restore the exact original weights (kept on CPU)."""
    backup = {name: w.detach().to("cpu", copy=True) for name, w in _targets(model, deltas).items()}
    apply_deltas(model, deltas)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, saved in backup.items():
                model.get_submodule(name).weight.copy_(saved)
