"""``"selfmoe_sdpa"``: transformers' SDPA attention without copying the KV cache for grouped-query attention.

transformers' ``sdpa`` attention repeats K and V to one copy per query head (``repeat_kv``) whenever a mask
is given, which for a Llama-3-8B-shaped model quadruples the KV cache read in every decode step and
dominated its device time. Here the G query heads that share a KV head are instead folded into the query
length: a query of shape (B, Hq, T, D) becomes (B, Hkv, G*T, D) and the mask (B, 1, T, L) becomes
(B, 1, G*T, L) (a view when T = 1), so one SDPA call reads each K/V head once. Everything else
(``is_causal``, ``scaling``, ``dropout``, the empty-StaticCache prefill crop, the softcap refusal) follows
transformers' ``sdpa_attention_forward``; the mask is built by transformers' own ``sdpa`` mask function.

Importing this module registers the implementation (idempotent); select it with
``attn_implementation="selfmoe_sdpa"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "selfmoe_sdpa"


def _fold_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv*G, T, X) -> (B, Hkv, G*T, X): query head h uses KV head h // G, as in ``repeat_kv``."""
    b, h, t, d = x.shape
    return x.reshape(b, h // groups, groups * t, d)


def _fold_mask(mask: torch.Tensor, groups: int, kv_heads: int) -> torch.Tensor:
    b, h, t, length = mask.shape
    if h == 1:
        # Every group row of a KV head sees the same mask row of its query position.
        return mask.unsqueeze(2).expand(b, 1, groups, t, length).reshape(b, 1, groups * t, length)
    # A per-head mask (one row set per query head) folds like the query itself.
    return mask.expand(b, kv_heads * groups, t, length).reshape(b, kv_heads, groups * t, length)


def selfmoe_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or kwargs.get("position_bias") is not None:
        # Nothing to save for MHA; a position bias (T5-style models, none with GQA) keeps transformers' path.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("`selfmoe_sdpa` attention does not support `softcap`; use `eager` or `flex_attention`.")

    q_length = query.shape[2]
    kv_length = key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = bool(is_causal.item())

    if attention_mask is None:
        # SDPA's own GQA needs no mask folding, and `is_causal` keeps its meaning on the unfolded query.
        if is_causal and kv_length > q_length:
            # An empty StaticCache at prefill: the slots past the prompt are unwritten (as transformers does).
            key, value = key[:, :, :q_length], value[:, :, :q_length]
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    mask = _fold_mask(attention_mask, groups, key.shape[1])
    out = F.scaled_dot_product_attention(
        _fold_groups(query, groups), key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    # SDPA may broadcast the batch (a batch-1 query against a batched cache), so take it from the output.
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="selfmoe_sdpa"`` known to transformers (safe to call again)."""
    AttentionInterface.register(NAME, selfmoe_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
