"""The models a benchmark compares, all on one base model's weights, and the numerics checks.

- ``base``: the base model itself.
- ``mixse``: MiXSE (fast path); the same model also runs as ``mixse-add<epilogue>`` (each other
  epilogue), ``mixse-torchrouting`` (routing in torch, not the fused kernel) and ``mixse-ref``
  (its reference path): :func:`mixse_paths`.
- ``loop``: a Mixtral-style per-expert loop over the same router and experts (gather each
  expert's tokens, run its LoRA, scatter-add): data-dependent shapes and a host sync per expert.
- ``xlora``: PEFT's own X-LoRA (the paper's tool) over the same adapters, ``top_k_lora`` set.
- ``lora``: one plain PEFT LoRA adapter (the cost floor of any adapter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.shapes import shared_copy
from selfmoe.models.mixse import ADD_INTO, Expert, GatedLoraLinear, RouterSettings, build_mixse


@dataclass(frozen=True)
class MixsePath:
    """One way of running a MiXSE model: its fast or reference path, the epilogue, the routing kernel."""

    fast: bool = True
    add_into: str | None = None  # None: GatedLoraLinear's default
    fused_routing: bool = True

    @contextmanager
    def on(self, model: nn.Module) -> Iterator[None]:
        """Run ``model`` on this path inside the block (a model without MiXSE is left alone)."""
        mixse = getattr(model, "mixse", None)
        default = GatedLoraLinear.add_into
        if mixse is not None:
            mixse.fast, mixse.fused_routing = self.fast, self.fused_routing
            GatedLoraLinear.add_into = self.add_into or default  # class-wide; graphs record it at capture
        try:
            yield
        finally:
            GatedLoraLinear.add_into = default
            if mixse is not None:
                mixse.fast, mixse.fused_routing = True, True


def mixse_paths(*, routing: bool = True) -> dict[str, MixsePath]:
    """The MiXSE variants a benchmark times: the default, each other epilogue, torch routing
    (without ``routing``: autograd never takes the kernel) and the reference path."""
    paths = {"mixse": MixsePath()}
    paths |= {f"mixse-add{e}": MixsePath(add_into=e) for e in ADD_INTO if e != GatedLoraLinear.add_into}
    if routing:
        paths["mixse-torchrouting"] = MixsePath(fused_routing=False)
    paths["mixse-ref"] = MixsePath(fast=False)
    return paths


def make_mixse(base: nn.Module, experts: list[Expert], settings: RouterSettings, *, router_seed: int = 0) -> nn.Module:
    """MiXSE over ``experts`` on a weight-sharing copy of ``base``; the router is seeded."""
    torch.manual_seed(router_seed)
    return build_mixse(shared_copy(base), experts, settings)


class LoopLoraLinear(GatedLoraLinear):
    """Peer: the per-expert loop of Mixtral-style MoE layers, over MiXSE's own gates and experts."""

    expert_blocks: list[tuple[int, int, int, float]]  # (expert, first column, end column, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gates = self.slot.gates
        if gates is None:
            return y
        flat_x, flat_g = x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1])
        out = y.reshape(-1, y.shape[-1])
        for expert, lo, hi, scale in self.expert_blocks:
            rows = torch.nonzero(flat_g[:, expert]).squeeze(-1)  # the tokens routed here: a host sync
            if rows.numel() == 0:
                continue
            g = (flat_g[rows, expert] * scale).to(x.dtype).unsqueeze(-1)
            h = F.linear(F.linear(flat_x.index_select(0, rows), self.lora_A[lo:hi]), self.lora_B[:, lo:hi]) * g
            out = out.index_add(0, rows, h)
        return out.view_as(y)


def make_loop(base: nn.Module, experts: list[Expert], settings: RouterSettings, *, router_seed: int = 0) -> nn.Module:
    """MiXSE's routing with Mixtral-style expert execution (same router seed: same gates)."""
    model = make_mixse(base, experts, settings, router_seed=router_seed)
    for m in model.modules():
        if isinstance(m, GatedLoraLinear):
            cols = m.column_expert.tolist()
            scales = m.column_scale.tolist()
            blocks = []
            for e in sorted(set(cols)):
                lo = cols.index(e)
                hi = len(cols) - cols[::-1].index(e)
                blocks.append((e, lo, hi, scales[lo]))
            m.__class__ = LoopLoraLinear
            m.expert_blocks = blocks
    return model


def make_lora(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """One plain PEFT LoRA adapter on a weight-sharing copy, in the base's dtype."""
    from peft import PeftModel

    dtype = next(base.parameters()).dtype
    return PeftModel.from_pretrained(shared_copy(base), str(adapter_dir)).to(dtype).eval()


def make_xlora(base: nn.Module, adapter_dirs: dict[str, Path], *, top_k: int = 1) -> nn.Module:
    """PEFT X-LoRA over ``adapter_dirs`` with ``top_k_lora``; it needs ``use_cache=False``."""
    from peft import XLoraConfig, get_peft_model

    model = shared_copy(base)
    model.config.use_cache = False  # X-LoRA refuses a model that caches
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=model.config.hidden_size,
        # PEFT loads the i-th adapter under the name str(i) and then activates the dict's keys, so
        # the keys must be "0", "1", ... (other names fail in disable_adapter_layers).
        adapters={str(i): str(v) for i, v in enumerate(adapter_dirs.values())},
        top_k_lora=top_k,
        xlora_depth=1,
    )
    dtype = next(base.parameters()).dtype
    # PEFT keeps adapters in float32 by default; the comparison is bf16 against bf16.
    return get_peft_model(model, config).to(dtype).eval()


def xlora_classifier(model: nn.Module) -> nn.Linear:
    """The X-LoRA classifier's (only, at depth 1) linear layer."""
    classifier = next(m for n, m in model.named_modules() if n.endswith("internal_xlora_classifier"))
    return next(m for m in classifier.modules() if isinstance(m, nn.Linear))


def copy_router_into_xlora(mixse: nn.Module, xlora: nn.Module) -> None:
    """Give X-LoRA's classifier MiXSE's shared router weights (zero bias): the same routing function."""
    linear = xlora_classifier(xlora)
    with torch.no_grad():
        linear.weight.copy_(mixse.mixse.router.weight[0])
        if linear.bias is not None:
            linear.bias.zero_()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def compare_logits(actual: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Max abs difference, relative L2 error and top-1 agreement of two logits tensors (..., V)."""
    a, r = actual.float(), reference.float()
    diff = (a - r).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "rel_l2": ((a - r).norm() / r.norm().clamp_min(1e-30)).item(),
        "argmax_agree": (a.argmax(-1) == r.argmax(-1)).float().mean().item(),
        "ref_max_abs": r.abs().max().item(),
    }
