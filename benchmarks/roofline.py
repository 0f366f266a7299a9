"""The arithmetic that bounds each benchmark: bytes per decode step, FLOPs per token, ceilings.

Rooflines use the ceilings measured on the machine in the same run (a device-to-device copy,
counting bytes read plus written; a large bf16 matrix product), with the datasheet figures kept
beside them for MFU, which by convention divides by the datasheet peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import time_fn

# NVIDIA H200 SXM datasheet: dense bf16 tensor-core peak and HBM3e bandwidth.
H200_PEAK_BF16_FLOPS = 989.4e12
H200_PEAK_BYTES_PER_S = 4.8e12


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # measured: (read + write) bytes / s of a large device copy
    matmul_flops: float  # measured: bf16 8192^3 product FLOP/s


def measure_ceilings(device: torch.device | str, gib: float = 2.0, n: int = 8192) -> Ceilings:
    """Measure the copy bandwidth and the bf16 matmul rate on ``device`` (random data, never zeros)."""
    src = torch.randn(int(gib * 2**30) // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device=device, iters=20, warmup=3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = time_fn(lambda: a @ b, device=device, iters=20, warmup=3)
    bytes_moved = 2 * src.numel() * src.element_size()
    return Ceilings(bytes_moved / (t_copy.median_ms / 1e3), 2 * n**3 / (t_mm.median_ms / 1e3))


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter except the input embedding table.

    The embedding lookup reads a few rows; a tied table is read whole, as the LM head.
    """
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_token: int, batch: int, context: float) -> float:
    """Fewest bytes read by one batched decode step: the weights once plus every sequence's KV cache."""
    return weight_bytes + batch * context * kv_bytes_per_token


def decode_roofline_tokens_per_s(
    weight_bytes: int, kv_bytes_per_token: int, batch: int, context: float, bytes_per_s: float
) -> float:
    """Upper bound on decode tokens/s from memory bandwidth alone (one token per sequence per step)."""
    return batch / (decode_bytes_per_step(weight_bytes, kv_bytes_per_token, batch, context) / bytes_per_s)


def linear_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products per token: every linear (decoder layers and LM head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_flops_per_token(layers: int, q_width: int, seq_len: int) -> float:
    """Forward FLOPs per token of causal attention (QK^T and PV), averaged over a sequence of ``seq_len``.

    A query at position i attends to i + 1 keys: 2 products x 2 FLOPs x q_width per key, so the mean
    over a sequence is 4 * q_width * (seq_len + 1) / 2 per layer.
    """
    return layers * 4 * q_width * (seq_len + 1) / 2


def lora_training_flops_per_token(linear: int, lora: int, layers: int, q_width: int, seq_len: int) -> float:
    """Model FLOPs per token of one LoRA training step on a frozen base.

    Forward 2 per weight; backward 2 per frozen weight (input gradients only, no weight gradients)
    and 4 per LoRA weight (input and weight gradients); attention backward twice its forward.
    Activation recomputation would not count (MFU, not hardware FLOPs utilisation).
    """
    attn = attention_flops_per_token(layers, q_width, seq_len)
    return (2 * linear + 2 * lora + attn) + (2 * linear + 4 * lora + 2 * attn)
