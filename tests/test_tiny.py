"""The built-in tiny model (determinism, pretraining, tokenizer, cache) and base-model loading errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TINY

from selfmoe.config import Config, load_config
from selfmoe.errors import OfflineError, SelfMoEError
from selfmoe.models.base import ensure_tiny, load_base, model_id, resolve_model_path
from selfmoe.models.tiny import SPECIAL, make_tiny

SMALL = SMALL_TINY
CORPUS = [
    "Task 1:\nAdd two and three.\n\nTask 2:\nAdd four and five.\n\n" * 3,
    "### Instruction:\nWhat is 2 + 2?\n\n### Response:\nThe answer is 4.\n\n" * 3,
    "the cat sat on the mat. the dog sat on the log. " * 4,
]
TINY_OVERRIDES = [
    "model=tiny",
    "tiny.hidden_size=32",
    "tiny.intermediate_size=64",
    "tiny.num_layers=1",
    "tiny.num_heads=2",
    "tiny.num_kv_heads=1",
    "tiny.vocab_size=300",
    "tiny.pretrain_steps=3",
    "tiny.pretrain_batch_size=2",
    "tiny.pretrain_seq_len=32",
]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(CORPUS, SMALL)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- make_tiny ----------------------------------------------------------------------------


def test_make_tiny_is_deterministic(tiny):
    model, tok, losses = tiny
    model2, tok2, losses2 = make_tiny(CORPUS, SMALL)
    a, b = _state(model), _state(model2)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert tok.get_vocab() == tok2.get_vocab()
    assert losses == losses2


def test_make_tiny_other_seed_gives_other_weights(tiny):
    model, _, _ = tiny
    other, _, _ = make_tiny(CORPUS, dataclasses.replace(SMALL, seed=1))
    a, b = _state(model), _state(other)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k].shape == b[k].shape and not torch.equal(a[k], b[k])]
    # Every weight matrix differs (norm weights start at 1 and move a little too, but need not).
    assert all(k in differing for k in a if k.endswith("proj.weight") or "embed_tokens" in k)


def test_make_tiny_shape_from_config(tiny):
    model, tok, _ = tiny
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32, 64, 1)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert c.vocab_size == len(tok) <= SMALL.vocab_size
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert not model.training  # pretrain() leaves it in eval mode


def test_pretraining_lowers_the_loss(tiny):
    _, tok, losses = tiny
    assert len(losses) == SMALL.pretrain_steps
    # A random model starts near ln(vocab); the repetitive corpus is learned quickly.
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(len(tok)))).item(), abs=0.6)
    assert losses[-1] < losses[0] - 1.5, losses


def test_pretraining_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    make_tiny(CORPUS[:1], dataclasses.replace(SMALL, pretrain_steps=2))
    assert torch.equal(state, torch.random.get_rng_state())


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_special_tokens(tiny):
    _, tok, _ = tiny
    assert tok.bos_token == SPECIAL["bos_token"] and tok.eos_token == SPECIAL["eos_token"]
    assert tok.pad_token == SPECIAL["pad_token"]
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tok.padding_side == "left"


@pytest.mark.parametrize("text", ["Add two and three.", "héllo\nwörld ✓ 数学\n\n  tabs\tand π ≈ 3.14 🙂", ""])
def test_tokenizer_round_trip_with_bos(tiny, text):
    _, tok, _ = tiny
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.bos_token_id not in ids[1:]
    assert ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text


def test_tokenizer_pads_left(tiny):
    _, tok, _ = tiny
    enc = tok(["Add two", "Add two and three and four"], padding=True, return_tensors="pt")
    short = tok("Add two")["input_ids"]
    width = enc["input_ids"].shape[1]
    pad = width - len(short)
    assert pad > 0
    assert enc["input_ids"][0].tolist() == [tok.pad_token_id] * pad + short
    assert enc["attention_mask"][0].tolist() == [0] * pad + [1] * len(short)


# --- ensure_tiny / load_base ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Config:
    out = tmp_path_factory.mktemp("outputs")
    return load_config("generate", [*TINY_OVERRIDES, f"output_dir={out}"])


def test_ensure_tiny_builds_once_and_reuses(tiny_cfg, monkeypatch):
    target = ensure_tiny(tiny_cfg)
    assert target == Path(tiny_cfg.output_dir) / "tiny" / "base"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["kind"] == "tiny-base"
    assert (target / "config.json").is_file()
    mtime = (target / "manifest.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr("selfmoe.models.tiny.make_tiny", no_rebuild)
    assert ensure_tiny(tiny_cfg) == target
    assert resolve_model_path(tiny_cfg) == str(target)
    assert (target / "manifest.json").stat().st_mtime_ns == mtime

    model, tok = load_base(tiny_cfg)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert tok.padding_side == "left" and tok.pad_token == SPECIAL["pad_token"]
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # BOS survives save/load
    assert model_id(tiny_cfg).startswith("tiny@") and len(model_id(tiny_cfg)) == len("tiny@") + 12
    assert manifest["key"].startswith(model_id(tiny_cfg)[len("tiny@") :])


def test_ensure_tiny_rebuilds_when_tiny_config_changes(tiny_cfg):
    target = ensure_tiny(tiny_cfg)
    key = json.loads((target / "manifest.json").read_text())["key"]
    reseeded = dataclasses.replace(tiny_cfg, tiny=dataclasses.replace(tiny_cfg.tiny, seed=7))
    assert model_id(reseeded) != model_id(tiny_cfg)
    assert ensure_tiny(reseeded) == target
    new_key = json.loads((target / "manifest.json").read_text())["key"]
    assert new_key != key and new_key.startswith(model_id(reseeded)[len("tiny@") :])


def test_model_id_of_real_models():
    cfg = load_config("generate", ["model=gemma-7b"])
    assert model_id(cfg) == "google/gemma-7b"
    pinned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, revision="abc123"))
    assert model_id(pinned) == "google/gemma-7b@abc123"


# --- base loading errors -------------------------------------------------------------------


def _with_path(path: str) -> Config:
    cfg = load_config("generate", ["model=gemma-7b"])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def test_missing_local_dir():
    with pytest.raises(SelfMoEError, match="does not exist") as info:
        load_base(_with_path("/nonexistent/dir"))
    assert "/nonexistent/dir" in str(info.value)


def test_dir_without_config_json(tmp_path):
    with pytest.raises(SelfMoEError, match=r"without config\.json") as info:
        load_base(_with_path(str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a relative "org/name" must not resolve to a local dir
    with pytest.raises(OfflineError) as info:
        load_base(_with_path("selfmoe-tests/no-such-model"))
    message = str(info.value)
    assert "selfmoe-tests/no-such-model" in message and "model.path" in message
