"""Real-shaped models with random weights, random LoRA experts, and weight-sharing copies.

No downloads: a model is built from its config alone. Every variant of a benchmark (base,
MiXSE, peers) is a structural copy of one base model that shares its parameter tensors, so all
of them run on identical weights and the 8B weights exist once in memory.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from selfmoe.models.attention import NAME as SELFMOE_SDPA
from selfmoe.models.mixse import Expert

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Public configs of the paper's base models (architecture only: rope θ and vocab size matter for shapes and speed).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
    },
    "gemma-7b": {
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    # The CPU regression benchmark: a mid-size Llama (hidden 1024, 8 layers).
    "cpu-mid": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # For the harness's own tests: seconds on one CPU core.
    "tiny": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "tiny-gemma": {
        "model_type": "gemma",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
}


def build_model(
    shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0, attn: str = SELFMOE_SDPA
) -> PreTrainedModel:
    """A causal LM of ``shape`` with random weights (the model's own init), in eval mode, on ``device``.

    The attention is the project's (``load_base`` selects ``selfmoe_sdpa``), so every benchmark
    times the model the phases run.
    """
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds for 8B on a GPU instead of minutes on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval().requires_grad_(False)


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter tensor with ``model``."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def target_linears(model: nn.Module, targets: Iterable[str] = TARGETS) -> dict[str, nn.Linear]:
    """The LoRA-target linears of the decoder layers, by module name."""
    wanted = set(targets)
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in wanted and ".layers." in f".{name}"
    }


def random_experts(
    model: nn.Module, n: int, r: int, *, seed: int = 0, alpha: float | None = None, b_std: float = 0.01
) -> list[Expert]:
    """``n`` random rank-``r`` LoRA experts on every target linear, made on the model's device and dtype.

    A follows PEFT's init scale (about 1/sqrt(d_in)); B is non-zero (a trained expert's is) so that
    the experts change the logits and the numerics checks mean something.
    """
    weight = next(model.parameters())
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    scale = (alpha if alpha is not None else 2 * r) / r
    experts = []
    for i in range(n):
        deltas = {}
        for name, lin in target_linears(model).items():
            a = torch.randn(r, lin.in_features, generator=gen, device=weight.device, dtype=weight.dtype)
            b = torch.randn(lin.out_features, r, generator=gen, device=weight.device, dtype=weight.dtype)
            deltas[name] = (a.mul_(lin.in_features**-0.5), b.mul_(b_std), scale)
        experts.append(Expert(name=f"e{i}", path=Path(f"random/e{i}"), deltas=deltas))
    return experts


def slice_experts(experts: list[Expert], n: int, r: int) -> list[Expert]:
    """The first ``n`` experts cut to rank ``r`` (views: a sweep makes its largest set once)."""
    out = []
    for e in experts[:n]:
        deltas = {k: (a[:r], b[:, :r], s) for k, (a, b, s) in e.deltas.items()}
        out.append(Expert(name=e.name, path=e.path, deltas=deltas))
    return out


def write_adapter(expert: Expert, directory: Path, targets: Iterable[str] = TARGETS) -> Path:
    """Save ``expert`` as a plain PEFT LoRA adapter directory (what PEFT's loaders and read_expert read)."""
    from peft import LoraConfig

    directory.mkdir(parents=True, exist_ok=True)
    (a, _, scale) = next(iter(expert.deltas.values()))
    r = a.shape[0]
    alpha = scale * r
    config = LoraConfig(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(str(directory))
    tensors = {}
    for module, (a, b, _) in expert.deltas.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """Shape facts for the report: parameters, layers, widths, KV bytes per token."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    return {
        "model_type": c.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": head_dim,
        "vocab": c.vocab_size,
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "kv_bytes_per_token": kv_bytes,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def adapter_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "adapter_config.json").read_text())
