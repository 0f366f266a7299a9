"""``selfmoe_sdpa`` computes what transformers' ``sdpa`` computes, without ``repeat_kv`` for GQA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

import selfmoe.models.attention as attention


def _pair(num_kv_heads: int = 2):
    """The conftest model (4 query heads, 2 KV heads unless told) under both implementations."""
    ref = tiny_llama(seed=1)
    if num_kv_heads != ref.config.num_key_value_heads:
        cfg = copy.deepcopy(ref.config)
        cfg.num_key_value_heads = num_kv_heads
        torch.manual_seed(1)
        ref = type(ref)(cfg).eval()
    ref.set_attn_implementation("sdpa")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(attention.NAME)
    assert ours.config._attn_implementation == attention.NAME
    return ref, ours


def _batch(left: bool):
    torch.manual_seed(5)
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        if pad:
            if left:
                mask[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_padded_batch_logits_match_sdpa(left):
    ref, ours = _pair()
    ids, mask = _batch(left)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # a fully padded query row is undefined in both; compare the real positions
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_no_mask_logits_match_sdpa():
    ref, ours = _pair()
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_decode_step_with_a_dynamic_cache_matches_sdpa():
    ref, ours = _pair()
    ids, mask = _batch(left=True)
    outs = []
    for model in (ref, ours):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = mask.sum(1, keepdim=True)  # the next position of each row, as generate computes it
            step = model(input_ids=nxt, attention_mask=step_mask, position_ids=pos, past_key_values=cache)
        outs.append((first.logits[:, -1], step.logits))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=0)


def test_training_gradients_with_padding_match_sdpa():
    ref, ours = _pair()
    ids, mask = _batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ref, ours):
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("k_proj" in n for n in grads[0])
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=0, msg=name)


def test_mha_model_matches_sdpa():
    ref, ours = _pair(num_kv_heads=4)
    ids, mask = _batch(left=True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


def test_gqa_with_a_mask_never_repeats_kv(monkeypatch):
    import transformers.integrations.sdpa_attention as hf_sdpa
    from transformers.models.llama import modeling_llama

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_kv called")

    _, ours = _pair()
    ids, mask = _batch(left=True)
    monkeypatch.setattr(hf_sdpa, "repeat_kv", refuse)
    monkeypatch.setattr(modeling_llama, "repeat_kv", refuse)
    with torch.no_grad():
        cache = DynamicCache(config=ours.config)
        ours(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)  # prefill (T > 1)
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        ours(
            input_ids=ids[:, -1:],
            attention_mask=step_mask,
            position_ids=mask.sum(1, keepdim=True),
            past_key_values=cache,
        )
    # The monkeypatch does bite: transformers' own sdpa with a mask does call it for a prefill.
    ref, _ = _pair()
    with pytest.raises(AssertionError, match="repeat_kv called"), torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)


def test_registration_is_idempotent_and_uses_the_sdpa_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    attention.register()
    attention.register()
    assert AttentionInterface()[attention.NAME] is attention.selfmoe_sdpa_attention_forward
    assert AttentionMaskInterface()[attention.NAME] is sdpa_mask


@pytest.mark.parametrize("configured", [None, "sdpa"])
def test_load_base_defaults_to_selfmoe_sdpa(tmp_path, configured):
    from conftest import make_config

    from selfmoe.models.base import load_base
    from selfmoe.models.tiny import build_tokenizer

    src = tmp_path / "model"
    tiny_llama().save_pretrained(src)
    build_tokenizer(["the cat sat on the mat"] * 4, 300).save_pretrained(src)
    overrides = [f"model.path={src}"] + ([f"model.attn_implementation={configured}"] if configured else [])
    model, _ = load_base(make_config("generate", tmp_path / "out", *overrides))
    assert model.config._attn_implementation == (configured or attention.NAME)
