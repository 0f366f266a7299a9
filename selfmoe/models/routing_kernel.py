"""One fused kernel per layer for MiXSE's inference routing (Triton, GPUs only).

Routing a layer in torch takes ten small kernels (the router GEMV and its weight cast, softmax,
top-k, zeros, scatter, then the gather and scale of the column gates); while decoding from a CUDA
graph they cost about 0.5 ms per step on Llama-3-8B (docs/performance.md, E4). This kernel does
the whole chain for a block of tokens in one launch::

    logits = hidden W_r^T (float32 accumulate)   probs = softmax(logits / T)
    gates  = top-k of probs (ties: lowest index), optionally renormalised
    columns[c] = gates[column_expert[c]] * column_scale[c], rounded once into the compute dtype

which is :func:`selfmoe.models.router.gates_from_logits` on float32 logits followed by
:meth:`selfmoe.models.mixse.RoutingSlot.column_gates` (tested against both). The weights are
rounded to the hidden states' dtype, as :class:`selfmoe.models.router.Router` does on a GPU
(half-precision operands, float32 accumulation), so the logits are torch's up to summation
order and the two paths pick the same experts.

Used only for inference (no autograd, no autocast) on CUDA where Triton imports; everything else
takes the torch path. ``TRITON_INTERPRET=1`` runs it on CPU tensors (the tests do, in a subprocess).
"""

from __future__ import annotations

import os

import torch

from selfmoe.models.router import tracks_grad

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path does the routing
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it when the kernel is defined


def available(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fused_route` may route ``hidden``: Triton present, a GPU (or the interpreter),
    no autograd, no autocast."""
    if triton is None or not (hidden.is_cuda or INTERPRET):
        return False
    if torch.is_autocast_enabled(hidden.device.type):
        return False  # autocast would round the hidden states too: torch's path does what it does
    return not tracks_grad(hidden, weight)


def fused_route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    temperature: float,
    column_expert: torch.Tensor,
    column_scale: torch.Tensor,
    column_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, gates, columns)`` for ``hidden`` (..., H) and router weights ``weight`` (N, H).

    ``probs`` and ``gates`` are float32 (..., N); ``columns`` (..., R) in ``column_dtype`` holds
    each LoRA column's gate times its expert's scale. ``top_k`` >= N keeps every expert.
    """
    n, width = weight.shape
    rows = hidden.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    tokens, columns = rows.shape[0], column_expert.numel()
    probs = torch.empty(tokens, n, device=rows.device, dtype=torch.float32)
    gates = torch.empty_like(probs)
    cols = torch.empty(tokens, columns, device=rows.device, dtype=column_dtype)
    block_n = triton.next_power_of_2(n)
    block_t, block_h, accumulate, warps = _launch_config(tokens, block_n)
    _route_kernel[(triton.cdiv(tokens, block_t),)](
        rows, weight, column_expert, column_scale, probs, gates, cols,
        tokens, width, n, columns, rows.stride(0), float(temperature),
        TOP_K=min(top_k, n), DENSE=top_k >= n, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_H=block_h, ACCUMULATE=accumulate,
        BLOCK_R=triton.next_power_of_2(columns), num_warps=warps,
    )  # fmt: skip
    lead = hidden.shape[:-1]
    return probs.view(*lead, n), gates.view(*lead, n), cols.view(*lead, columns)


def _launch_config(tokens: int, block_n: int) -> tuple[int, int, bool, int]:
    """``(tokens per program, hidden block, accumulate, warps)``, measured on the H200 (Llama-3-8B's
    width, 4 experts; docs/performance.md): the fastest setting for each range of token counts.

    - decoding (up to 128 tokens): a token per program and 2K float32 accumulators per program,
      so a batch-1 step is one short program;
    - up to 4,096 tokens: 4 tokens per program and wide hidden blocks reduced as they are loaded
      (few, large loads): 14 us at 2,048 tokens, where reading the hidden states alone takes 11;
    - more: 8 tokens per program and narrow blocks accumulated per column (32 us at 8,192).
    """
    if tokens <= 128:
        return 1, max(16, 2048 // block_n), True, 4
    if tokens <= 4096:
        return 4, max(16, 16384 // (4 * block_n)), False, 2
    return 8, max(16, 4096 // (8 * block_n)), True, 2


if triton is not None:

    @triton.jit
    def _round_to_bfloat16(v):
        """float32 ``v`` rounded to the nearest bfloat16 (ties to even), as float32. By hand:
        Triton's interpreter truncates in ``.to(tl.bfloat16)``, and the tests run under it."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _route_kernel(
        hidden_ptr, weight_ptr, expert_ptr, scale_ptr, probs_ptr, gates_ptr, cols_ptr,
        tokens, width, n, columns, stride_t, temperature,
        TOP_K: tl.constexpr, DENSE: tl.constexpr, RENORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        e = tl.arange(0, BLOCK_N)
        t_ok, e_ok = t < tokens, e < n
        row = t.to(tl.int64) * stride_t  # 64-bit offsets: tokens x stride may pass 2**31

        # Logits: a (tokens x N) product reduced over the hidden width, in float32 registers.
        # ACCUMULATE: per-column partial sums, reduced once at the end (narrow blocks); otherwise
        # each block's products are reduced as soon as they are loaded (wide blocks).
        if ACCUMULATE:
            acc = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_H], dtype=tl.float32)
        else:
            logits = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for start in range(0, width, BLOCK_H):
            h = start + tl.arange(0, BLOCK_H)
            h_ok = h < width
            x = tl.load(hidden_ptr + row[:, None] + h[None, :], mask=t_ok[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + e[:, None] * width + h[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0)
            # The weights rounded to the hidden states' dtype: the operands of torch's inference path.
            if x.dtype == tl.bfloat16:
                w = _round_to_bfloat16(w.to(tl.float32))
            elif x.dtype == tl.float16:
                w = w.to(tl.float16).to(tl.float32)
            products = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            if ACCUMULATE:
                acc += products
            else:
                logits += tl.sum(products, axis=2)
        if ACCUMULATE:
            logits = tl.sum(acc, axis=2)
        logits = logits / temperature  # (BLOCK_T, BLOCK_N)
        logits = tl.where(e_ok[None, :], logits, float("-inf"))

        # Softmax over the experts, as torch computes it: exp(l - max) / sum.
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = shifted / tl.sum(shifted, axis=1)[:, None]

        if DENSE:
            gates = probs
        else:
            # Top-k by k rounds of arg-max (lowest index on ties); padding experts never win.
            left = tl.where(e_ok[None, :], probs, -1.0)
            chosen = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int1)
            for _ in tl.static_range(TOP_K):
                best = tl.max(left, axis=1)
                pick = tl.min(tl.where(left == best[:, None], e[None, :], BLOCK_N), axis=1)
                hit = e[None, :] == pick[:, None]
                chosen = chosen | hit
                left = tl.where(hit, -2.0, left)
            gates = tl.where(chosen, probs, 0.0)
        if RENORMALIZE:
            gates = gates / tl.maximum(tl.sum(gates, axis=1), 1.1754943508222875e-38)[:, None]

        out = t[:, None] * n + e[None, :]
        keep = t_ok[:, None] & e_ok[None, :]
        tl.store(probs_ptr + out, probs, mask=keep)
        tl.store(gates_ptr + out, gates, mask=keep)

        # Column gates: each LoRA column takes its expert's gate times the expert's scale.
        c = tl.arange(0, BLOCK_R)
        c_ok = c < columns
        expert = tl.load(expert_ptr + c, mask=c_ok, other=-1)
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        picked = tl.sum(tl.where(expert[None, :, None] == e[None, None, :], gates[:, None, :], 0.0), axis=2)
        col = picked * scale[None, :]
        tl.store(
            cols_ptr + t.to(tl.int64)[:, None] * columns + c[None, :],
            col.to(cols_ptr.dtype.element_ty),
            mask=t_ok[:, None] & c_ok[None, :],
        )
