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


def test_mixse_routing_and_gated_linears_make_no_host_sync(tiny_outputs):
    """The router and the gated linears run without a device-to-host sync (DESIGN §4).

    Checked on our own modules: the base model's mask preparation in transformers syncs by itself.
    """
    from selfmoe.models.mixse import GatedLoraLinear, RouterSettings, build_mixse, read_expert

    cfg = make_config("expert", tiny_outputs, "domain=math", "trainer=gpu")
    target = expert.train_expert(cfg, "math", {"math": Layout.for_model(tiny_outputs, "tiny").data("math")})
    base, _ = load_base(cfg, device="cuda")
    model = build_mixse(base, [read_expert("a", target), read_expert("b", target)], RouterSettings(top_k=1))
    gated = [m for m in model.modules() if isinstance(m, GatedLoraLinear) and m.slot is model.mixse.slots[0]]
    hidden = torch.randn(4, 16, model.config.hidden_size, device="cuda")
    for _ in range(2):  # the first round warms up lazily initialised kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if _ else "default")
        try:
            with torch.no_grad():
                model.mixse.slots[0].gates = model.mixse.route(hidden, 0)
                outs = [m(torch.randn(4, 16, m.in_features, device="cuda")) for m in gated]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(gated) == 7 and all(o.isfinite().all() for o in outs)


def test_router_bf16_logits_match_float32_on_rounded_operands():
    """The inference router GEMM (bf16 operands, float32 accumulate and output) = float32 math
    on the same bf16-rounded operands, and the training path is untouched."""
    from selfmoe.models.router import Router

    torch.manual_seed(0)
    router = Router(4096, 4).cuda()
    hidden = torch.randn(2, 64, 4096, device="cuda").bfloat16()
    with torch.no_grad():
        fast = router(hidden)
    reference = torch.nn.functional.linear(hidden.double(), router.weight[0].bfloat16().double())
    assert fast.dtype == torch.float32 and fast.shape == (2, 64, 4)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-4)
    with torch.enable_grad():  # autograd keeps the float32 path
        exact = router(hidden)
    reference = torch.nn.functional.linear(hidden.float(), router.weight[0].float())
    assert exact.dtype == torch.float32 and torch.equal(exact, reference)
