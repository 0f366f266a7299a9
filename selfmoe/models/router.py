"""Routers and gate math (PAPER §1.3): pure functions plus the small router modules.

Gates are computed in float32: ``probs = softmax(W_r u / temperature)``, then every probability
outside the top-k is zeroed, *without* renormalising by default (with top-1 the chosen expert is
scaled by its probability < 1, which leaves the base weights more say). No function here syncs
with the host or has data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

MODES = ("learned", "random", "uniform", "fixed")


@dataclass(frozen=True)
class GateSpec:
    """How logits become gates; ``top_k=None`` keeps every expert (dense softmax)."""

    num_experts: int
    top_k: int | None = 1
    renormalize: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"a mixture needs at least one expert, got {self.num_experts}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the number of experts ({self.num_experts})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def k(self) -> int:
        return self.num_experts if self.top_k is None else self.top_k


def topk_mask(probs: torch.Tensor, k: int, renormalize: bool = False) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of the last dim; optionally rescale them to sum to 1."""
    if k >= probs.shape[-1]:
        gates = probs
    else:
        values, idx = probs.topk(k, dim=-1)  # the values are the gathered probabilities: no extra gather
        gates = torch.zeros_like(probs).scatter_(-1, idx, values)  # in place: no copy of the zeros
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return gates


def gates_from_logits(logits: torch.Tensor, spec: GateSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, gates)``, both float32, from router logits (..., N)."""
    logits = logits.float()
    # x / 1.0 == x exactly: skip the kernel (routing runs once per layer per step while decoding).
    probs = F.softmax(logits if spec.temperature == 1.0 else logits / spec.temperature, dim=-1)
    return probs, topk_mask(probs, spec.k, spec.renormalize)


def load_balancing_loss(probs: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``N * sum_i f_i * P_i`` over the tokens where ``mask`` is 1.

    ``f_i`` is the share of routed tokens whose top-k includes expert i (normalised over experts),
    ``P_i`` the mean router probability of expert i. It is 1 for perfectly balanced routing and
    grows as routing concentrates; padding tokens (``mask`` 0) do not count.
    """
    n = probs.shape[-1]
    probs, routed = probs.reshape(-1, n), (gates.reshape(-1, n) > 0).float()
    weight = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.reshape(-1).float()
    total = weight.sum().clamp_min(1.0)
    f = (routed * weight[:, None]).sum(0) / (routed.sum(-1) * weight).sum().clamp_min(1.0)
    p = (probs * weight[:, None]).sum(0) / total
    return n * (f * p).sum()


class Router(nn.Module):
    """``W_r``: one linear map from a token's hidden state to one logit per expert.

    ``num_routers`` is 1 for the paper's router shared by every layer, or the number of decoder
    layers for one router per layer; ``forward(u, layer)`` picks the right one.
    """

    def __init__(self, hidden_size: int, num_experts: int, num_routers: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_routers, num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init: logits of order 1 for unit-scale hidden states.
        bound = self.weight.shape[-1] ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_routers(self) -> int:
        return self.weight.shape[0]

    def layer_weight(self, layer: int = 0) -> torch.Tensor:
        """``W_r`` (N, H) of ``layer``."""
        return self.weight[layer if self.num_routers > 1 else 0]

    def forward(self, hidden: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Logits (..., N) in float32 for hidden states (..., H)."""
        w = self.layer_weight(layer)
        if low_precision_logits(hidden, w):
            # The operands autocast would give the GEMM (bf16 hidden, weights rounded to bf16),
            # accumulated and returned in float32 on tensor cores: no float32 copy of the hidden
            # states and no SIMT float32 GEMM (1.6 ms of an 8B scoring forward, docs/performance.md).
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = torch.mm(flat, w.to(hidden.dtype).t(), out_dtype=torch.float32)
            return logits.view(*hidden.shape[:-1], w.shape[0])
        return F.linear(hidden.float(), w.float())


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any([t.requires_grad for t in tensors])  # a list: no generator to trace


def low_precision_logits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether router logits may come from a half-precision GEMM with float32 output.

    Only on CUDA (``mm`` with ``out_dtype`` has no CPU kernel), for half-precision hidden states
    outside autocast (under autocast the float32 path is already cast to bf16 by autocast), and
    without autograd (the mixed-dtype ``mm`` is an inference kernel).
    """
    return (
        hidden.is_cuda
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_autocast_enabled(hidden.device.type)
        and not tracks_grad(hidden, weight)
    )
