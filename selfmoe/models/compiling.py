"""Regional compilation: ``torch.compile`` each decoder layer of an HF causal LM, not the model.

Why per layer (performance issue E3, docs/performance.md):

- **One compile serves all layers.** The decoder layers are the same code on parameters of the
  same shapes, and torch.compile passes a module's parameters in as graph inputs, so the graph
  traced for one layer is reused by the others. A whole-model compile traces every layer again;
  here compile time does not grow with depth and is a fraction of the whole model's. (The first
  layer gets a graph of its own while training a LoRA: its input, from the frozen embeddings,
  needs no gradient; every later layer's does.) A KV cache defeats the sharing: each layer
  indexes its own cache slot, so the graph specializes on the layer. Training callers turn it
  off (``config.use_cache = False``); the expert phase does.
- **The model stays the same object.** ``nn.Module.compile`` compiles the layer's call in place:
  no ``OptimizedModule`` wrapper, no ``_orig_mod.`` prefix in parameter names, so state dicts,
  checkpoints and saved PEFT adapters are unchanged, and Lightning, DDP and PEFT wrap or walk
  the model as before. What stays outside the layers (embeddings, final norm, LM head, loss) runs
  eagerly.

Compilation is lazy: nothing is traced until a layer first runs. Never imports Lightning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from selfmoe.errors import SelfMoEError
from selfmoe.models.base import decoder_layers

__all__ = ["compile_decoder_layers"]


def compile_decoder_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """``layer.compile(**compile_kwargs)`` on every decoder layer of ``model``; how many.

    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).
    """
    layers = decoder_layers(model)
    if not len(layers):
        raise SelfMoEError(f"{type(model).__name__}: no decoder layers to compile (an empty model.layers).")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
