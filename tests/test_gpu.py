"""GPU paths (skipped without CUDA): generation on the device, bf16-mixed expert training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config

from selfmoe.artifacts import Layout
from selfmoe.data.generation import TextGenerator
from selfmoe.models.base import load_base
from selfmoe.phases import expert

pytestmark = pytest.mark.gpu


def test_greedy_generation_on_gpu_matches_cpu(tiny_outputs):
    cfg = make_config("generate", tiny_outputs)
    prompts = ["Task 1:\nWhat is 2 + 3?\n\nTask 2:\n", "### Instruction:\nAdd 4 and 5.\n\n### Response:\n"]
    outs = {}
    for device in ("cpu", "cuda"):
        model, tok = load_base(cfg, device=device)
        outs[device] = TextGenerator(model, tok).generate(prompts, max_new_tokens=24, do_sample=False)
    assert [c.text for c in outs["cuda"]] == [c.text for c in outs["cpu"]]


def test_bf16_mixed_expert_training_on_gpu(outputs):
    cfg = make_config("expert", outputs, "domain=math", "trainer=gpu")
    assert cfg.trainer.precision == "bf16-mixed"
    target = expert.train_expert(cfg, "math", {"math": Layout.for_model(outputs, "tiny").data("math")})
    metrics = json.loads((target / "manifest.json").read_text())["metrics"]
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert torch.cuda.is_available()


def test_mixse_forward_on_gpu_makes_no_host_sync(tiny_outputs):
    """The gated linears and the router run without a device-to-host sync (DESIGN §4)."""
    from selfmoe.models.mixse import RouterSettings, build_mixse, read_expert

    cfg = make_config("expert", tiny_outputs, "domain=math", "trainer=gpu")
    target = expert.train_expert(cfg, "math", {"math": Layout.for_model(tiny_outputs, "tiny").data("math")})
    base, tok = load_base(cfg, device="cuda")
    model = build_mixse(base, [read_expert("a", target), read_expert("b", target)], RouterSettings(top_k=1))
    ids = tok(["What is 2 + 3?", "Name a prime."], return_tensors="pt", padding=True).to("cuda")
    model(**ids)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(**ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
