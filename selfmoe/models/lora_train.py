"""A leaner PEFT LoRA for training: same adapters, same saved files, fewer passes over the output.

PEFT stays the owner of the LoRA layers (creation, config, save/load). Two things change how a
training step runs (performance issue E3, docs/performance.md):

1. **Input cast off under autocast.** PEFT casts every LoRA input to the adapters' dtype
   (float32 on a bf16 base); under bf16/fp16 autocast the LoRA GEMMs cast it straight back. That
   is two full copies of every adapted linear's input per step, forward and backward, for GEMMs
   whose operands are bf16 either way. :func:`lora_training_model` switches PEFT's own per-layer
   flag (``cast_input_dtype_enabled``) off when the caller trains under autocast.
2. **One accumulating GEMM.** PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling``: a
   multiply and an add, each a full pass over the (tokens x out_features) output, and again in
   the backward. :class:`LeanLoraLinear` computes the same function as
   ``addmm(result, h, Bᵀ, alpha=scaling)``: the expand GEMM's epilogue does the scaling and the
   accumulation, and its backward needs no pass over the output either (the gradient of
   ``result`` is the incoming gradient itself; ``alpha`` lands on the rank-sized products).

:class:`LeanLoraLinear` subclasses PEFT's ``lora.Linear`` and is installed through PEFT's
custom-module registry (``LoraConfig._register_custom_module``), so its state dict, and hence
the saved adapter, is exactly PEFT's, and anything it does not handle (several active adapters,
DoRA and other variants, merged weights, mixed-batch ``adapter_names``, a LoRA bias) goes to
PEFT's own forward. Never imports Lightning.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["LeanLoraLinear", "autocast_precision", "lean_layers", "lora_training_model", "set_input_cast"]

# Lightning precision settings that train under torch.autocast (the rest run in one dtype).
AUTOCAST_PRECISIONS = ("16-mixed", "bf16-mixed", "16", "bf16")


def autocast_precision(precision: str) -> bool:
    """Whether Lightning's ``precision`` setting runs the forward under autocast."""
    return precision in AUTOCAST_PRECISIONS


class _ExactType(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return type(obj) is nn.Linear


class _PlainLinear(metaclass=_ExactType):
    """``isinstance`` matches ``nn.Linear`` itself, not its subclasses.

    PEFT's custom-module dispatch tests ``isinstance`` and runs before its own dispatchers, and
    quantized layers (bitsandbytes' ``Linear8bitLt``/``Linear4bit``) subclass ``nn.Linear``:
    they must keep PEFT's dedicated LoRA layers.
    """


class LeanLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` with a one-GEMM epilogue for the common training case.

    The fast path runs for one active vanilla LoRA adapter on unmerged weights, called as
    ``layer(x)``. It follows PEFT's order of operations (base output first, then the input cast
    if enabled, then the adapter's dropout), so it consumes the random stream exactly as PEFT
    does and draws the same dropout masks under the same seed.
    """

    def _lean_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fast path computes, or None when PEFT's forward must run."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_A or name in self.lora_variant:
            return None
        if self.lora_B[name].bias is not None or not isinstance(self.scaling[name], (int, float)):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._lean_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        h = lora_A(self.lora_dropout[name](x))
        weight, scaling = lora_B.weight, self.scaling[name]
        autocast = torch.is_autocast_enabled(result.device.type)
        if not autocast and not (result.dtype == h.dtype == weight.dtype):
            # Mixed dtypes outside autocast (a bf16 base with float32 adapters): addmm would refuse
            # them, and PEFT's arithmetic (promote, then cast back) is what must happen anyway.
            return (result + lora_B(h) * scaling).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(), alpha=scaling)
        return out.view(result.shape)


def lean_layers(model: nn.Module) -> list[LeanLoraLinear]:
    return [m for m in model.modules() if isinstance(m, LeanLoraLinear)]


def set_input_cast(model: nn.Module, enabled: bool) -> None:
    """PEFT's per-layer input cast to the adapter dtype, on every tuner layer of ``model``.

    Off is only valid where the LoRA GEMMs run under autocast (they cast their operands to one
    dtype themselves); without autocast a bf16 input meets float32 adapter weights and fails.
    """
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = enabled


def lora_training_model(base: nn.Module, config: LoraConfig, *, fused: bool, autocast: bool) -> PeftModel:
    """``get_peft_model(base, config)`` set up for training.

    ``fused``: plain ``nn.Linear`` targets get :class:`LeanLoraLinear` (``config`` itself is not
    changed, and the saved ``adapter_config.json`` does not mention it). ``autocast``: training
    runs under bf16/fp16 autocast, so PEFT's input cast is switched off.
    """
    if fused:
        config = copy.copy(config)
        # The registry lives on the config instance: a shallow copy must not share the dict.
        config._custom_modules = dict(config._custom_modules or {})
        config._register_custom_module({_PlainLinear: LeanLoraLinear})
    model = get_peft_model(base, config)
    if autocast:
        set_input_cast(model, False)
    return model
