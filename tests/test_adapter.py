"""The adapter reader MiXSE and merging share: what PEFT would compute otherwise is refused by name,
what it supports (rank/alpha patterns, rsLoRA) matches PEFT, and damaged files are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from selfmoe.errors import DataError, SelfMoEError
from selfmoe.models.adapter import check_adapter, read_lora
from selfmoe.models.merging import lora_deltas
from selfmoe.models.mixse import (
    GatedLoraLinear,
    RouterSettings,
    build_mixse,
    load_mixse,
    read_expert,
    read_mixse_json,
    save_mixse,
)
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed, hidden)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()


def save(model, config: LoraConfig, path: Path) -> Path:
    torch.manual_seed(1)
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture
def plain(tmp_path) -> Path:
    return save(llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), tmp_path / "plain")


# --- what MiXSE must refuse (it would compute something other than PEFT) ---------------------------


@pytest.mark.parametrize(
    ("factory", "config", "message"),
    [
        (llama, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), "embedding layer"),
        (gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), "fan_in_fan_out"),
        (llama, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (llama, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
        (llama, LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (llama, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "use_dora"),
    ],
    ids=["embedding", "fan_in_fan_out", "modules_to_save", "bias", "lora_bias", "dora"],
)
def test_read_expert_refuses_what_it_cannot_compute_like_peft(tmp_path, factory, config, message):
    path = save(factory(), config, tmp_path / "x")
    with pytest.raises(DataError, match=message) as info:
        read_expert("odd", path)
    assert "expert 'odd'" in str(info.value)


def test_merging_still_reads_embedding_and_conv1d_adapters(tmp_path):
    """Merging transposes these correctly (tested against PEFT in test_merging); only MiXSE refuses them."""
    assert len(lora_deltas(save(llama(), LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path / "e"))) == 1
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    assert len(lora_deltas(save(gpt2(), config, tmp_path / "c"))) == 1


def test_stray_tensors_are_refused(plain):
    weights = plain / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(300, 32)}, weights)
    with pytest.raises(DataError, match=r"unexpected tensor 'base_model\.model\.lm_head\.weight'"):
        read_expert("x", plain)


def test_config_rank_must_match_the_factors(plain):
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(DataError, match="rank 4 but its config says otherwise"):
        read_expert("x", plain)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "unreadable"),
        (lambda p: (p / "adapter_config.json").write_text("{oops"), r"adapter_config\.json is unreadable"),
        (lambda p: (p / "adapter_config.json").write_text("[1]"), "not a JSON object"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), r"is missing adapter_model\.safetensors"),
    ],
    ids=["truncated", "bad-json", "json-list", "missing"],
)
def test_damaged_adapters_name_the_file_and_the_fix(plain, damage, message):
    damage(plain)
    with pytest.raises(DataError, match=message) as info:
        read_expert("math", plain)
    assert "make expert DOMAIN=math force=true" in str(info.value)


def test_non_finite_factors_are_corrupt(plain):
    weights = plain / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(DataError, match="NaN or inf values: the file is corrupt"):
        read_expert("x", plain)
    with pytest.raises(DataError, match="NaN or inf"):
        lora_deltas(plain)


# --- what it supports matches PEFT ------------------------------------------------------------------


def test_rank_and_alpha_patterns_and_rslora_match_peft(tmp_path):
    """Per-module ranks and alphas (PEFT's first-match rule) and rsLoRA scaling, forced through one expert."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj|o_proj": 3, "down_proj": 20},
        use_rslora=True,
        init_lora_weights=False,
    )
    path = save(llama(), config, tmp_path / "patterned")
    expert = read_expert("p", path)
    assert expert.deltas["model.layers.0.self_attn.q_proj"][0].shape[0] == 2
    assert expert.deltas["model.layers.1.mlp.down_proj"][0].shape[0] == 6
    assert expert.deltas["model.layers.0.self_attn.o_proj"][2] == pytest.approx(3 / 4**0.5)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    mixse = build_mixse(llama(), [expert], RouterSettings(mode="fixed:p", top_k=None))
    peft = PeftModel.from_pretrained(llama(), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(mixse(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- fit against the base model, before anything is built -------------------------------------------


def test_check_adapter_names_the_modules_that_do_not_fit(plain):
    check_adapter(llama(), plain)  # fits its own base
    needle = r"does not fit this base model: .*down_proj.*shape \(32, 48\), this model.s is \(64, 48\).*and 11 more"
    with pytest.raises(DataError, match=needle):
        check_adapter(llama(hidden=64), plain)


def test_load_mixse_refuses_before_changing_the_model(tmp_path, plain):
    save_mixse(build_mixse(llama(), [read_expert("a", plain)], RouterSettings()), tmp_path / "m", base_model="t",
               expert_dirs={"a": plain})  # fmt: skip
    other = llama(hidden=64)
    with pytest.raises(SelfMoEError, match=r"expert 'a' .* does not fit this base model"):
        load_mixse(other, tmp_path / "m")
    assert not hasattr(other, "mixse")
    assert not any(isinstance(m, GatedLoraLinear) for m in other.modules())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: (m / "router.safetensors").write_bytes(b"junk"), r"router\.safetensors is missing or unreadable"),
        (lambda m: (m / "mixse.json").write_text('{"experts": []}'), "not a valid MiXSE description"),
        (lambda m: (m / "mixse.json").write_text("{"), "missing or unreadable"),
        (
            lambda m: (m / "mixse.json").write_text(
                json.dumps({**json.loads((m / "mixse.json").read_text()), "router": {"mode": "bogus"}})
            ),
            "invalid router settings",
        ),
        (lambda m: shutil.rmtree(m / ".." / "a"), "expert 'a' not found"),
    ],
    ids=["router-file", "no-experts", "bad-json", "bad-settings", "expert-gone"],
)
def test_damaged_mixse_dirs_are_clear_errors(tmp_path, plain, damage, message):
    shutil.copytree(plain, tmp_path / "a")
    model = build_mixse(llama(), [read_expert("a", tmp_path / "a")], RouterSettings())
    save_mixse(model, tmp_path / "m", base_model="t", expert_dirs={"a": tmp_path / "a"})
    read_mixse_json(tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(SelfMoEError, match=message):
        load_mixse(llama(), tmp_path / "m")


def test_read_lora_reports_factors_by_module(plain):
    adapter = read_lora(plain)
    assert set(adapter.factors) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert {f.rank for f in adapter.factors.values()} == {4}
