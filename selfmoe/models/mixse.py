"""MiXSE: a frozen base model, N self-specialized LoRA experts, and a token-level router.

For every LoRA-target linear ``W0`` and experts ``(A_i, B_i)`` with scaling ``s_i = alpha_i / r_i``::

    h = W0 x + sum_i g_i * s_i * B_i A_i x,        g = topk_mask(softmax(W_r u / T))

computed densely with the experts stacked: ``A_cat`` is ``(sum r_i) x d_in`` and ``B_cat`` is
``d_out x (sum r_i)``, so ``h = W0 x + ((x A_cat^T) * G) B_cat^T`` where ``G`` expands each
token's gates over its expert's rank columns (zeros outside the top-k) and folds in ``s_i``.
Two GEMMs per module whatever N, no Python loop over experts, no host sync, no data-dependent
shapes. Experts of different ranks stack naturally.

Router input (``input``): ``layer`` (default) reads the hidden state entering each decoder layer,
and every gated linear of that layer uses those gates: one pass, KV cache intact. ``final_hidden``
is the X-LoRA reading: an adapter-free pass produces each token's final hidden state, which the
router maps to the gates of every layer; it costs a second pass and needs ``use_cache=False``.
Scope: one router shared by all layers (the paper) or one per layer. For inference on a GPU a
layer's routing (logits, softmax, top-k and the column gates) is one Triton kernel
(:mod:`selfmoe.models.routing_kernel`); training and CPUs route in torch.

The model stays a ``transformers`` model (``generate()``, the KV cache and lm-eval's HFLM work
unchanged): linears are replaced in place and the router lives at ``model.mixse``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from torch.nn import functional as F

from selfmoe.artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from selfmoe.errors import DataError, SelfMoEError
from selfmoe.models import routing_kernel
from selfmoe.models.adapter import ADAPTER_FILES, check_fits, read_lora
from selfmoe.models.base import decoder_layers
from selfmoe.models.router import GateSpec, Router, gates_from_logits, tracks_grad

ROUTER_FILE, EXPERTS_FILE, MIXSE_FILE = "router.safetensors", "experts.safetensors", "mixse.json"
FORMAT_VERSION = 1
ADD_INTO = ("base", "expand", "fold")  # the fast path's ways of adding the expert delta (GatedLoraLinear.add_into)


@dataclass(frozen=True)
class RouterSettings:
    """How MiXSE routes (the ``router.*`` config keys that shape the model)."""

    scope: str = "shared"  # shared | per_layer
    input: str = "layer"  # layer | final_hidden
    top_k: int | None = 1  # None: every expert (dense softmax)
    renormalize: bool = False
    temperature: float = 1.0
    mode: str = "learned"  # learned | random | uniform | fixed:<expert>

    def __post_init__(self) -> None:
        if self.scope not in ("shared", "per_layer"):
            raise ValueError(f"router.scope={self.scope!r}: use shared or per_layer")
        if self.input not in ("layer", "final_hidden"):
            raise ValueError(f"router.input={self.input!r}: use layer or final_hidden")
        if self.mode not in ("learned", "random", "uniform") and not self.mode.startswith("fixed:"):
            raise ValueError(f"router.mode={self.mode!r}: use learned, random, uniform or fixed:<expert>")


@dataclass
class RoutingRecord:
    """One layer's routing in the latest forward (kept while ``MiXSE.record`` is on)."""

    probs: torch.Tensor  # (B, T, N) float32 router probabilities
    gates: torch.Tensor  # (B, T, N) float32 gates applied (zeros outside the top-k)


@dataclass(frozen=True)
class Expert:
    """One LoRA adapter read from disk: per target module ``(A (r, d_in), B (d_out, r), scale)``."""

    name: str
    path: Path
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)


def adapter_hash(directory: str | Path) -> str:
    """Content hash of an adapter directory (its config and weights); a missing file is a clear error."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        try:
            h.update(sha256_file(Path(directory) / name).encode())
        except OSError as exc:
            file = Path(directory) / name
            raise DataError(f"cannot read {file} ({exc.strerror or exc}); train the expert or fix the path.") from None
    return h.hexdigest()


def read_expert(name: str, directory: str | Path) -> Expert:
    """Read a PEFT LoRA adapter directory as a MiXSE expert; errors name the expert and the fix.

    Only adapters that a gated linear computes exactly as PEFT does are accepted: plain LoRA on
    ``nn.Linear`` targets (``(out, in)`` weights). Embedding LoRA, ``fan_in_fan_out`` (Conv1D) and
    everything :func:`~selfmoe.models.adapter.read_lora` refuses (variants, biases, stray tensors,
    pickles, corrupt files) is an error rather than a silently different model.
    """
    directory = Path(directory)
    where = f"expert {name!r} at {directory}"
    adapter = read_lora(directory, where=where, fix=f"train it again (`make expert DOMAIN={name} force=true`)")
    embeddings = [m for m, f in adapter.factors.items() if f.embedding]
    if embeddings:
        raise DataError(
            f"{where} adapts embedding layer(s) {embeddings[:3]}: MiXSE gates linear layers only. "
            "Train the expert on linear targets (model.lora_targets)."
        )
    if adapter.fan_in_fan_out:
        raise DataError(
            f"{where} has fan_in_fan_out=true (Conv1D-style (in, out) weights): MiXSE supports nn.Linear "
            "targets only; use a base model with linear projections."
        )
    deltas = {m: (f.a, f.b, f.scale) for m, f in adapter.factors.items()}
    return Expert(name=name, path=directory, deltas=deltas)


class RoutingSlot:
    """Where a decoder layer's pre-hook leaves the gates that its gated linears read.

    It also keeps, for the current gates only, the per-column gates of each column pattern
    (computed once per layer, not once per linear). Plain attributes, no property and no
    ``__slots__``: torch 2.11's dynamo lost a property setter's store on such an object and read
    the stale gates of the real object (measured: 7 graphs for a 2-layer model instead of 1).
    """

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None
        self.fast = True  # False: every gated linear takes the reference path (tests, benchmarks)
        self._column_gates: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._column_gates_of: torch.Tensor | None = None  # the gates the cached column gates belong to
        self.columns_of: GatedLoraLinear | None = None  # a linear of the layer's most common column pattern

    def prime(self, gates: torch.Tensor, columns: torch.Tensor) -> None:
        """Cache ``columns``, computed with ``gates`` by the fused routing kernel, for ``columns_of``'s pattern."""
        self._column_gates_of = gates
        self._column_gates = {(self.columns_of.pattern, columns.dtype): columns}

    def column_gates(self, module: GatedLoraLinear, dtype: torch.dtype) -> torch.Tensor:
        """``G`` (..., R) in ``dtype``: each column's expert gate times its scale, for ``module``'s columns."""
        gates = self.gates
        if self._column_gates_of is not gates:  # new gates: a strong reference, so identity cannot be recycled
            self._column_gates, self._column_gates_of = {}, gates
        key = (module.pattern, dtype)
        cached = self._column_gates.get(key)
        if cached is not None:
            return cached
        picked = gates.index_select(-1, module.column_expert)  # (..., R) float32
        if tracks_grad(gates):
            cached = (picked * module.column_scale).to(dtype)
        else:
            # One kernel: multiply in float32 and round once into the compute dtype, as the reference path does.
            cached = torch.empty(picked.shape, dtype=dtype, device=picked.device)
            torch.mul(picked, module.column_scale, out=cached)
        self._column_gates[key] = cached
        return cached


class LinearGroup:
    """Gated linears that read one input (q/k/v, gate/up, or a linear alone), laid out for few GEMMs.

    Each member's weights live in one fused matrix; its parameters (``base.weight``, ``base.bias``,
    ``lora_A``, ``lora_B``) are views of it, so in-place loads and optimiser steps reach both, and a
    move (``.to()``) that splits them is detected and the matrices are laid out again:

    - the *leader* (the member with the fewest outputs) holds ``[W0; A_1; ...; A_M]`` (``out + M*R``
      rows): its base GEMM also computes every member's shrink ``x A_m^T`` (N-concatenation), and
      ``A_all`` (the last ``M*R`` rows) is the stacked shrink matrix of the other epilogues;
    - every other member holds ``[W0 | 0 .. B_m .. 0]`` (``d_in + M*R`` columns, ``B_m`` at its own
      block of the group's shrink columns): one GEMM over ``[x | h_g]`` gives ``x W0^T + h_g B_m^T``
      (K-concatenation).

    With ``GatedLoraLinear.add_into = "fold"`` a group of M linears costs M GEMMs plus the leader's
    expand, a gate product and a concatenation; the other epilogues run one shrink GEMM for the
    group. The first member called with a given ``(x, G)`` computes the shared part; the others
    reuse it. Used only while the experts are frozen.
    """

    def __init__(self, members: list[GatedLoraLinear]) -> None:
        self.members = members
        self.rank = members[0].lora_A.shape[0]
        self.leader = min(range(len(members)), key=lambda i: members[i].out_features)
        for i, m in enumerate(members):
            # Own parameter objects: laying out must not touch a model that shares the base's tensors.
            base = m.base
            base.weight = nn.Parameter(base.weight.detach(), requires_grad=base.weight.requires_grad)
            if base.bias is not None:
                base.bias = nn.Parameter(base.bias.detach(), requires_grad=base.bias.requires_grad)
            m.group, m.group_index = self, i
        self._layout()
        self._key: tuple[torch.Tensor, torch.Tensor, str] | None = None
        self._shared: tuple[torch.Tensor, ...] = ()
        self._left = 0

    @torch.inference_mode(False)
    @torch.no_grad()
    def _layout(self) -> None:
        # Normal tensors even when the first call after a move runs under inference mode (a
        # validation loop): the parameters become views of them and may be saved for backward later.
        members, r, lead = self.members, self.rank, self.members[self.leader]
        m_r, d_in, out = len(members) * r, lead.in_features, lead.out_features
        fused = torch.cat([lead.base.weight.detach()] + [m.lora_A.detach() for m in members], 0)
        views = [(lead.base.weight, fused[:out])]
        views += [(m.lora_A, fused[out + i * r : out + (i + 1) * r]) for i, m in enumerate(members)]
        self.lead_bias = None
        if lead.base.bias is not None:
            self.lead_bias = torch.cat([lead.base.bias.detach(), fused.new_zeros(m_r)])
            views.append((lead.base.bias, self.lead_bias[:out]))
        self.lead, self.cats = fused, []
        for i, m in enumerate(members):
            if i == self.leader:
                self.cats.append(None)
                continue
            cat = fused.new_zeros(m.out_features, d_in + m_r)
            cat[:, :d_in] = m.base.weight.detach()
            cat[:, d_in + i * r : d_in + (i + 1) * r] = m.lora_B.detach()
            views += [(m.base.weight, cat[:, :d_in]), (m.lora_B, cat[:, d_in + i * r : d_in + (i + 1) * r])]
            self.cats.append(cat)
        for param, view in views:
            param.data = view
        self._views = [(param, param.data_ptr()) for param, _ in views]

    @property
    def stacked(self) -> torch.Tensor:
        """``A_all`` (M*R, d_in): every member's ``lora_A`` stacked, the rows under the leader's ``W0``."""
        return self.lead[self.members[self.leader].out_features :]

    def _current(self) -> bool:
        """Whether the fused matrices are valid, laying them out again if a move split them.

        False (only while compiling): use the members one by one.
        """
        lead = self.lead
        if torch.compiler.is_compiling():
            # Storage addresses cannot be traced. Dynamo guards on the parameters' device and dtype,
            # so a move retraces and lands here; the layout is redone on the next eager call.
            return all(p.device == lead.device and p.dtype == lead.dtype for p, _ in self._views)
        if any(p.data_ptr() != ptr or p.device != lead.device or p.dtype != lead.dtype for p, ptr in self._views):
            self._layout()
        return True

    def _begin(self, x: torch.Tensor, g: torch.Tensor, kind: str) -> bool:
        """Whether ``(x, g)`` starts a new round of calls (the shared part must be computed)."""
        key = self._key
        return key is None or key[0] is not x or key[1] is not g or key[2] != kind

    def _served(self) -> None:
        self._left -= 1
        if self._left <= 0:  # every member served: drop the activation references
            self._key, self._shared = None, ()

    def gated_shrink(self, x: torch.Tensor, g: torch.Tensor, member: int) -> torch.Tensor:
        """``member``'s slice (..., R) of ``(x A_all^T) * G``; computed once per (x, G) for the group."""
        if self._begin(x, g, "shrink"):
            if not self._current():
                return gated_shrink(x, self.members[member].lora_A, g, 1)
            # Strong references: identity checks can never match a recycled object.
            self._key, self._left = (x, g, "shrink"), len(self.members)
            self._shared = (gated_shrink(x, self.stacked, g, len(self.members)),)  # (..., M*R)
        h = self._shared[0]
        self._served()
        return h[..., member * self.rank : (member + 1) * self.rank]

    def folded(self, x: torch.Tensor, g: torch.Tensor, member: int) -> torch.Tensor | None:
        """``member``'s output ``x W0^T + b + ((x A^T) * G) B^T`` through the fused matrices.

        None (only while compiling, after a move): the caller takes the unfused path.
        """
        members, r = self.members, self.rank
        lead_out = members[self.leader].out_features
        if self._begin(x, g, "fold"):
            if not self._current():
                return None
            x2 = x.reshape(-1, x.shape[-1])
            # The leader's GEMM: its own outputs, then every member's shrink columns.
            lead, bias = self.lead.t(), self.lead_bias
            y = torch.mm(x2, lead) if bias is None else torch.addmm(bias, x2, lead)
            hg = gate_columns(y[:, lead_out:], g.reshape(-1, g.shape[-1]), len(members))
            xh = torch.cat([x2, hg], 1) if len(members) > 1 else None  # [x | h_g], the siblings' input
            self._key, self._left, self._shared = (x, g, "fold"), len(members), (y, hg, xh)
        y, hg, xh = self._shared
        module = members[member]
        if member == self.leader:
            h = hg[:, member * r : (member + 1) * r]
            out = y[:, :lead_out]
            if tracks_grad(out, h):
                out = torch.addmm(out, h, module.lora_B.t())  # in place would bump the version autograd saved
            else:
                out.addmm_(h, module.lora_B.t())  # the expand accumulates onto the leader's outputs (beta=1)
        else:
            cat, bias = self.cats[member], module.base.bias
            out = torch.mm(xh, cat.t()) if bias is None else torch.addmm(bias, xh, cat.t())
        self._served()
        return out.view(*x.shape[:-1], out.shape[-1])


class GatedLoraLinear(nn.Module):
    """A frozen linear plus stacked LoRA experts, mixed per token by the gates in ``slot``.

    ``forward`` takes the fast path (DESIGN §4, measured in docs/performance.md): column gates
    once per layer, one shrink per group of siblings sharing the input (:class:`LinearGroup`),
    and no separate add. ``add_into`` picks where the expert delta joins the base output:

    - ``"fold"`` (default): inside the base GEMMs, through the group's fused matrices (the
      leader's GEMM also computes the shrinks, the others run over ``[x | h_g]``): no shrink
      GEMM and one expand per group. It trades a little work for fewer kernel launches, which
      pays only where launches dominate: calls of at most ``fold_max_tokens`` tokens (decoding)
      on the devices in ``fold_device_types``. Longer calls take ``"base"`` (the fused
      matrices' odd shapes, say 14336+64 outputs, make cuBLAS's large GEMMs 15 % slower), and
      so do CPUs (no launch cost to save);
    - ``"base"``: the frozen base GEMM accumulates onto the expand's output in its epilogue
      (``out = h_g B^T; out += x W0^T``, beta=1);
    - ``"expand"``: the expand GEMM accumulates onto the base output (``y = x W0^T; y += h_g B^T``).

    Every path equals ``reference_forward`` up to floating-point rounding (tested).
    """

    add_into = "fold"  # class-wide: where the expert delta is added (one of ADD_INTO)
    fold_max_tokens = 128  # "fold" for calls of at most this many tokens, "base" above (measured on the H200)
    fold_device_types = ("cuda",)  # where "fold" applies (docs/performance.md: slower on a CPU)

    def __init__(
        self,
        base: nn.Linear,
        slot: RoutingSlot,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        column_expert: torch.Tensor,
        column_scale: torch.Tensor,
        pattern: int = 0,
    ) -> None:
        super().__init__()
        self.base = base
        self.slot = slot
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(lora_a.to(device, dtype), requires_grad=False)  # (R, d_in)
        self.lora_B = nn.Parameter(lora_b.to(device, dtype), requires_grad=False)  # (d_out, R)
        self.register_buffer("column_expert", column_expert.to(device), persistent=False)  # (R,) expert of column
        self.register_buffer("column_scale", column_scale.to(device), persistent=False)  # (R,) s_i, float32
        self.pattern = pattern  # modules with equal (column_expert, column_scale) share an id: G computed once
        self.group: LinearGroup | None = None
        self.group_index = 0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The defining computation, one module at a time: ``W0 x + ((x A^T) * G) B^T``."""
        y = self.base(x)
        gates = self.slot.gates
        if gates is None:
            return y
        column_gates = gates.index_select(-1, self.column_expert) * self.column_scale  # (B, T, R) float32
        h = F.linear(x, self.lora_A) * column_gates.to(x.dtype)  # (B, T, R)
        return y + F.linear(h, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.slot
        if slot.gates is None:  # adapter-free (the X-LoRA scouting pass)
            return self.base(x)
        if not slot.fast:
            return self.reference_forward(x)
        g = slot.column_gates(self, x.dtype)  # (..., R)
        group = self.group if not self.lora_A.requires_grad else None
        if group is not None and self.add_into == "fold" and self._folds(x):
            out = group.folded(x, g, self.group_index)
            if out is not None:
                return out
        if group is not None and len(group.members) > 1:
            h = group.gated_shrink(x, g, self.group_index)  # (..., R), a column slice
        else:
            h = gated_shrink(x, self.lora_A, g, 1)
        w0, bias = self.base.weight, self.base.bias
        if not _same_dtype(x, w0, self.lora_B, h):
            return self.base(x) + F.linear(h, self.lora_B)  # mixed precision: let autocast cast
        h2 = h.reshape(-1, h.shape[-1])  # (B*T, R)
        if self.add_into == "expand":
            y = self.base(x)  # the base model's own GEMM, untouched
            y.view(-1, y.shape[-1]).addmm_(h2, self.lora_B.t())  # the expand GEMM adds onto it (beta=1)
            return y
        x2 = x.reshape(-1, x.shape[-1])  # (B*T, d_in)
        out = torch.mm(h2, self.lora_B.t()) if bias is None else torch.addmm(bias, h2, self.lora_B.t())
        out.addmm_(x2, w0.t())  # the base GEMM adds onto the expert delta in its epilogue (beta=1)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether the fused matrices compute this call: few tokens on a GPU, nothing in them trains, one dtype."""
        pays = x.device.type in self.fold_device_types and x.numel() <= self.fold_max_tokens * x.shape[-1]
        frozen = not (self.lora_B.requires_grad or self.base.weight.requires_grad)
        return pays and frozen and _same_dtype(x, self.lora_A, self.base.weight)


def gated_shrink(x: torch.Tensor, a: torch.Tensor, g: torch.Tensor, members: int) -> torch.Tensor:
    """``(x A^T) * G`` (..., members*R), ``G`` (..., R) repeated over the ``members`` row blocks of ``A``."""
    return gate_columns(F.linear(x, a), g, members)


def gate_columns(h: torch.Tensor, g: torch.Tensor, members: int) -> torch.Tensor:
    """``h * G`` for shrink outputs ``h`` (..., members*R), ``G`` (..., R) repeated over the member blocks."""
    if members > 1:
        return (h.unflatten(-1, (members, h.shape[-1] // members)) * g.unsqueeze(-2)).flatten(-2)
    return h * g


def _same_dtype(x: torch.Tensor, *others: torch.Tensor) -> bool:
    if any(t.dtype != x.dtype for t in others):
        return False
    device = x.device.type
    return not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == x.dtype


# Siblings that HF decoders call on the same input tensor; LinearGroup checks identity at run time.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def _group_linears(gated: dict[str, GatedLoraLinear]) -> None:
    """One :class:`LinearGroup` per set of siblings with the same expert columns, one per other linear."""
    for name, module in gated.items():
        parent, _, leaf = name.rpartition(".")
        for siblings in SHARED_INPUT_SIBLINGS:
            if leaf != siblings[0]:
                continue
            members = [gated.get(f"{parent}.{s}" if parent else s) for s in siblings]
            members = [m for m in members if m is not None]
            uniform = all(
                m.pattern == module.pattern
                and m.lora_A.shape == module.lora_A.shape
                and m.lora_A.dtype == module.lora_A.dtype
                and m.lora_A.device == module.lora_A.device
                for m in members
            )
            if len(members) > 1 and uniform:
                LinearGroup(members)
    for module in gated.values():
        if module.group is None:
            LinearGroup([module])


class MiXSE(nn.Module):
    """The router(s) and routing state of a MiXSE model, registered at ``model.mixse``."""

    def __init__(self, experts: list[str], hidden_size: int, num_layers: int, settings: RouterSettings) -> None:
        super().__init__()
        self.experts = list(experts)
        self.settings = settings
        self.spec = GateSpec(len(experts), settings.top_k, settings.renormalize, settings.temperature)
        self.router = Router(hidden_size, len(experts), num_layers if settings.scope == "per_layer" else 1)
        self.slots = [RoutingSlot() for _ in range(num_layers)]
        self.fixed = None
        if settings.mode.startswith("fixed:"):
            name = settings.mode.split(":", 1)[1]
            if name not in self.experts:
                raise SelfMoEError(f"router.mode={settings.mode!r}: no expert {name!r}; experts are {self.experts}.")
            self.fixed = self.experts.index(name)
        # The Triton routing kernel where it applies (GPU inference, learned router); False: torch.
        self.fused_routing = True
        self.record = False
        self.records: list[RoutingRecord | None] = [None] * num_layers
        # With collect_aux on, each layer's (probs, gates) are kept with their graph (aux losses).
        self.collect_aux = False
        self.aux_records: list[tuple[torch.Tensor, torch.Tensor] | tuple[None, None]] = [(None, None)] * num_layers
        self._scouting = False

    @property
    def fast(self) -> bool:
        """Whether the gated linears take the fast path (default) or ``reference_forward``."""
        return all(slot.fast for slot in self.slots)

    @fast.setter
    def fast(self, value: bool) -> None:
        for slot in self.slots:
            slot.fast = value

    def _keep(self, layer: int, probs: torch.Tensor, gates: torch.Tensor) -> None:
        if self.record:
            self.records[layer] = RoutingRecord(probs.detach(), gates.detach())
        if self.collect_aux:
            self.aux_records[layer] = (probs, gates)

    def _fused_route(self, hidden: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(probs, gates)`` from the Triton routing kernel, which also fills the layer's column
        gates; None where it does not apply (autograd, autocast, a CPU, no tokens, switched off)."""
        slot, weight = self.slots[layer], self.router.layer_weight(layer)
        if not (self.fused_routing and hidden.numel() and slot.fast and slot.columns_of is not None):
            return None
        if not routing_kernel.available(hidden, weight):
            return None
        spec, source = self.spec, slot.columns_of
        probs, gates, columns = routing_kernel.fused_route(
            hidden, weight, spec.k, spec.renormalize, spec.temperature,
            source.column_expert, source.column_scale, hidden.dtype,
        )  # fmt: skip
        slot.prime(gates, columns)
        return probs, gates

    def route(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Gates (..., N) float32 for hidden states (..., H) entering ``layer``."""
        mode, n = self.settings.mode, len(self.experts)
        if mode == "learned":
            routed = self._fused_route(hidden, layer)
            probs, gates = routed if routed is not None else gates_from_logits(self.router(hidden, layer), self.spec)
        elif mode == "random":
            probs, gates = gates_from_logits(torch.randn(*hidden.shape[:-1], n, device=hidden.device), self.spec)
        elif mode == "uniform":
            probs = torch.full((*hidden.shape[:-1], n), 1.0 / n, device=hidden.device)
            gates = probs
        else:
            probs = F.one_hot(torch.full(hidden.shape[:-1], self.fixed, device=hidden.device), n).float()
            gates = probs
        self._keep(layer, probs, gates)
        return gates


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def build_mixse(model: nn.Module, experts: list[Expert], settings: RouterSettings) -> nn.Module:
    """Turn ``model`` (in place) into MiXSE over ``experts``; returns the same model object.

    Every parameter is frozen except the router's (when ``settings.mode`` is learned).
    """
    if not experts:
        raise SelfMoEError("MiXSE needs at least one expert (router.experts is empty).")
    if hasattr(model, "mixse"):
        raise SelfMoEError("this model is already a MiXSE model; build from a fresh base model.")
    layers = decoder_layers(model)
    layer_of = {id(layer): i for i, layer in enumerate(layers)}
    layer_names = {name: layer_of[id(m)] for name, m in model.named_modules() if id(m) in layer_of}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mixse = MiXSE([e.name for e in experts], config.hidden_size, len(layers), settings)

    targets = sorted({m for e in experts for m in e.deltas})
    patterns: dict[tuple[tuple[int, ...], tuple[float, ...]], int] = {}
    gated_modules: dict[str, GatedLoraLinear] = {}
    for module_name in targets:
        try:
            base = model.get_submodule(module_name)
        except AttributeError:
            base = None
        owner = next((i for prefix, i in layer_names.items() if module_name.startswith(prefix + ".")), None)
        if not isinstance(base, nn.Linear) or owner is None:
            raise SelfMoEError(
                f"expert target {module_name!r} is not a linear layer inside a decoder layer of this base "
                "model: the experts were made from another base model (or target unsupported modules)."
            )
        a_parts, b_parts, col_expert, col_scale = [], [], [], []
        for index, expert in enumerate(experts):
            if module_name not in expert.deltas:
                continue
            a, b, scale = expert.deltas[module_name]
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise SelfMoEError(
                    f"expert {expert.name!r} does not fit this base model at {module_name}: LoRA shapes "
                    f"{tuple(a.shape)}/{tuple(b.shape)} vs a {base.in_features}->{base.out_features} linear. "
                    "It was trained on another base model; retrain it on this one."
                )
            a_parts.append(a)
            b_parts.append(b)
            col_expert += [index] * a.shape[0]
            col_scale += [scale] * a.shape[0]
        gated = GatedLoraLinear(
            base,
            mixse.slots[owner],
            torch.cat(a_parts, 0),
            torch.cat(b_parts, 1),
            torch.tensor(col_expert, dtype=torch.long),
            torch.tensor(col_scale, dtype=torch.float32),
            pattern=patterns.setdefault((tuple(col_expert), tuple(col_scale)), len(patterns)),
        )
        _replace_module(model, module_name, gated)
        gated_modules[module_name] = gated

    _group_linears(gated_modules)
    for slot in mixse.slots:
        layer_linears = [m for m in gated_modules.values() if m.slot is slot]
        if layer_linears:
            common = Counter(m.pattern for m in layer_linears).most_common(1)[0][0]
            slot.columns_of = next(m for m in layer_linears if m.pattern == common)
    model.requires_grad_(False)
    mixse.to(next(model.parameters()).device)
    model.mixse = mixse  # registers the router as a submodule: .to(), state_dict(), parameters()
    mixse.router.requires_grad_(settings.mode == "learned")
    _install_hooks(model, mixse, layers)
    return model


def _install_hooks(model: nn.Module, mixse: MiXSE, layers: nn.ModuleList) -> None:
    def layer_hook(index: int):
        def hook(module, args, kwargs):
            if mixse.settings.input == "layer" and not mixse._scouting:
                hidden = args[0] if args else kwargs["hidden_states"]
                mixse.slots[index].gates = mixse.route(hidden, index)

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True)

    def scout(module, args, kwargs):
        """X-LoRA reading: an adapter-free pass gives the final hidden state the router reads."""
        if mixse.settings.input != "final_hidden" or mixse._scouting:
            return
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # the name differs across transformers 5.x
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise SelfMoEError("router.input=final_hidden re-reads the whole sequence: generate with use_cache=False.")
        inputs = {k: kwargs.get(k) for k in ("input_ids", "attention_mask", "inputs_embeds", "position_ids")}
        if args:
            inputs["input_ids"] = args[0]
        mixse._scouting = True
        for slot in mixse.slots:
            slot.gates = None
        try:
            with torch.no_grad():
                hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        finally:
            mixse._scouting = False
        for i, slot in enumerate(mixse.slots):
            slot.gates = mixse.route(hidden, i)

    model.register_forward_pre_hook(scout, with_kwargs=True)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert matrices of every gated linear (frozen unless trained jointly)."""
    return [p for m in model.modules() if isinstance(m, GatedLoraLinear) for p in (m.lora_A, m.lora_B)]


def save_mixse(
    model: nn.Module, directory: str | Path, *, base_model: str, expert_dirs: Mapping[str, str | Path]
) -> None:
    """Write ``router.safetensors`` (+ ``experts.safetensors`` when experts were trained) and ``mixse.json``."""
    directory = Path(directory)
    mixse: MiXSE = model.mixse
    router = {k: v.detach().contiguous().cpu() for k, v in mixse.router.state_dict().items()}
    atomic_write_bytes(directory / ROUTER_FILE, _safetensors_bytes(router))
    trained_experts = any(p.requires_grad for p in expert_parameters(model))
    if trained_experts:
        stacked = {
            f"{name}.{part}": getattr(module, part).detach().contiguous().cpu()
            for name, module in model.named_modules()
            if isinstance(module, GatedLoraLinear)
            for part in ("lora_A", "lora_B")
        }
        atomic_write_bytes(directory / EXPERTS_FILE, _safetensors_bytes(stacked))
    atomic_write_json(
        directory / MIXSE_FILE,
        {
            "format": FORMAT_VERSION,
            "base_model": base_model,
            # Relative to this directory, so a copied or moved outputs/ tree still loads.
            "experts": [
                {
                    "name": name,
                    "path": os.path.relpath(Path(expert_dirs[name]).resolve(), directory.resolve()),
                    "sha256": adapter_hash(expert_dirs[name]),
                }
                for name in mixse.experts
            ],
            "router": asdict(mixse.settings),
            "experts_trained": trained_experts,
        },
    )


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def read_mixse_json(directory: str | Path) -> dict[str, Any]:
    """``mixse.json`` of a saved MiXSE, checked for the fields :func:`load_mixse` needs."""
    path = Path(directory) / MIXSE_FILE
    fix = "train the router again (`make router force=true`)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelfMoEError(
            f"{path} is missing or unreadable ({exc}); train the router first (`make router`)."
        ) from None
    experts = meta.get("experts") if isinstance(meta, dict) else None
    entries_ok = (
        isinstance(experts, list)
        and bool(experts)
        and all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "path", "sha256")) for e in experts
        )
    )
    if not entries_ok or not isinstance(meta.get("router"), dict) or not isinstance(meta.get("base_model"), str):
        raise SelfMoEError(f"{path} is not a valid MiXSE description (experts, router, base_model); {fix}.")
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise SelfMoEError(f"{path} has format {meta.get('format')!r}, this selfmoe reads {FORMAT_VERSION}; {fix}.")
    return meta


def load_mixse(
    model: nn.Module, directory: str | Path, *, base_model: str | None = None, **overrides: Any
) -> nn.Module:
    """Rebuild a saved MiXSE on ``model`` (a fresh base): experts verified by hash, router restored.

    ``overrides`` replace saved router settings (e.g. ``top_k=2`` or ``mode="random"`` for the
    routing ablations); a mismatching ``base_model`` id, a changed or unfitting expert, or a damaged
    router file is refused before ``model`` is changed.
    """
    directory = Path(directory)
    meta = read_mixse_json(directory)
    fix = "retrain the router (`make router force=true`)"
    if base_model is not None and meta["base_model"] != base_model:
        raise SelfMoEError(
            f"{directory} was built on base model {meta['base_model']!r}, not {base_model!r}; "
            "rebuild it with `make router` for this model."
        )
    experts = []
    for entry in meta["experts"]:
        path = directory / entry["path"]  # an absolute path stays as it is
        if not path.is_dir():
            raise SelfMoEError(f"{directory}: expert {entry['name']!r} not found at {path}.")
        if adapter_hash(path) != entry["sha256"]:
            raise SelfMoEError(
                f"{directory}: expert {entry['name']!r} at {path} changed since the router was trained "
                f"(hash mismatch); {fix}."
            )
        expert = read_expert(entry["name"], path)
        shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b, _) in expert.deltas.items()}
        check_fits(model, shapes, where=f"expert {expert.name!r} at {path}", fix=f"rebuild {directory} on this model")
        experts.append(expert)
    try:
        settings = RouterSettings(**{**meta["router"], **overrides})
    except (TypeError, ValueError) as exc:
        raise SelfMoEError(f"{directory / MIXSE_FILE}: invalid router settings ({exc}); {fix}.") from None
    router = _load_tensors(directory / ROUTER_FILE, fix)
    stacked = _load_tensors(directory / EXPERTS_FILE, fix) if meta.get("experts_trained") else None
    build_mixse(model, experts, settings)
    try:
        model.mixse.router.load_state_dict(router)
        if stacked is not None:
            for name, module in model.named_modules():
                if isinstance(module, GatedLoraLinear):
                    module.lora_A.data.copy_(stacked[f"{name}.lora_A"])
                    module.lora_B.data.copy_(stacked[f"{name}.lora_B"])
    except (KeyError, RuntimeError) as exc:  # another expert set or model: names or shapes differ
        raise SelfMoEError(f"{directory}: saved weights do not match its experts ({exc}); {fix}.") from None
    return model


def _load_tensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SelfMoEError(f"{path} is missing or unreadable ({exc}); {fix}.") from None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise SelfMoEError(f"{path} holds NaN or inf values: the file is corrupt; {fix}.")
    return tensors


__all__ = [
    "MiXSE",
    "RouterSettings",
    "RoutingRecord",
    "build_mixse",
    "expert_parameters",
    "load_mixse",
    "read_expert",
    "save_mixse",
]
