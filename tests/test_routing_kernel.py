"""The fused routing kernel (Triton) against torch's routing.

On a GPU the kernel runs compiled; on a CPU the last test re-runs this file in a subprocess under
Triton's interpreter (``TRITON_INTERPRET=1``), which Triton reads when the kernel is defined.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from benchmarks.shapes import build_model, random_experts
from selfmoe.models import routing_kernel
from selfmoe.models.mixse import GatedLoraLinear, RouterSettings, build_mixse
from selfmoe.models.router import GateSpec, gates_from_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if routing_kernel.INTERPRET else None
needs_kernel = pytest.mark.skipif(
    routing_kernel.triton is None or DEVICE is None, reason="needs Triton and a GPU (or TRITON_INTERPRET=1)"
)
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def torch_routing(hidden, weight, spec, column_expert, column_scale, dtype):
    """The reference: float32 logits from the weights rounded to the hidden states' dtype (the
    GPU router's operands), ``gates_from_logits``, then column gates rounded once."""
    probs, gates = gates_from_logits(F.linear(hidden.float(), weight.to(hidden.dtype).float()), spec)
    return probs, gates, (gates.index_select(-1, column_expert) * column_scale).to(dtype)


def columns_for(n: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Column experts and scales of ``n`` experts of the given ranks (expert i: rank ranks[i], scale 2/(i+1))."""
    expert = torch.cat([torch.full((r,), i) for i, r in enumerate(ranks[:n])])
    scale = torch.cat([torch.full((r,), 2.0 / (i + 1)) for i, r in enumerate(ranks[:n])])
    return expert.to(DEVICE), scale.to(DEVICE)


CASES = {
    # name: (tokens, experts, hidden width, top_k, renormalize, temperature, dtype)
    "decode-b1": (1, 4, 4096, 1, False, 1.0, torch.bfloat16),
    "decode-b8-top2-renorm-temp": (8, 4, 256, 2, True, 0.7, torch.bfloat16),
    "dense-fp16": (5, 3, 100, None, False, 1.0, torch.float16),
    # Each launch configuration of routing_kernel._launch_config, with a ragged last block.
    "scoring-wide-blocks-fp32": (301, 4, 192, 1, False, 1.0, torch.float32),  # 4 tokens a program
    "long-prefill-narrow-blocks": (4099, 4, 40, 2, True, 1.0, torch.bfloat16),  # 8 tokens a program
    "sixteen-experts": (9, 16, 72, 2, False, 1.3, torch.bfloat16),
    "one-expert": (3, 1, 64, 1, False, 1.0, torch.bfloat16),
}


@needs_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_route_matches_torch_routing(case):
    tokens, n, width, top_k, renormalize, temperature, dtype = CASES[case]
    gen = torch.Generator().manual_seed(0)
    # A strided view (every other row of a wider buffer): the kernel reads rows by their stride.
    hidden = torch.randn(2 * tokens, width + 8, generator=gen)[::2, :width].to(DEVICE, dtype)
    weight = (torch.randn(n, width, generator=gen) * 3 * width**-0.5).to(DEVICE)
    column_expert, column_scale = columns_for(n, [8, 4, 16, 8] * 4)
    spec = GateSpec(n, top_k, renormalize, temperature)

    probs, gates, columns = routing_kernel.fused_route(
        hidden, weight, spec.k, renormalize, temperature, column_expert, column_scale, dtype
    )
    ref_probs, ref_gates, ref_columns = torch_routing(hidden, weight, spec, column_expert, column_scale, dtype)
    assert (probs.dtype, gates.dtype, columns.dtype) == (torch.float32, torch.float32, dtype)
    assert columns.shape == (tokens, column_expert.numel())
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(gates > 0, ref_gates > 0)  # the same experts chosen for every token
    torch.testing.assert_close(gates, ref_gates, rtol=1e-5, atol=1e-6)
    # The gates' tolerance, then rounded once into the compute dtype: one unit in the last place more.
    rtol = 1e-5 + torch.finfo(dtype).eps
    torch.testing.assert_close(columns.float(), ref_columns.float(), rtol=rtol, atol=1e-6)


@needs_kernel
def test_ties_go_to_the_lowest_index_and_padding_experts_never_win():
    """Equal logits (a zero hidden state): top-2 of 3 keeps experts 0 and 1, at 1/3 each (by hand)."""
    hidden = torch.zeros(2, 64, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(3, 64, device=DEVICE)  # 3 experts: the kernel pads them to 4
    column_expert, column_scale = columns_for(3, [2, 2, 2])
    probs, gates, columns = routing_kernel.fused_route(
        hidden, weight, 2, False, 1.0, column_expert, column_scale, torch.float32
    )
    third = torch.full((2, 3), 1 / 3, device=DEVICE)
    torch.testing.assert_close(probs, third)
    torch.testing.assert_close(gates, third * torch.tensor([1.0, 1.0, 0.0], device=DEVICE))
    expected = torch.tensor([2 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0], device=DEVICE).expand(2, 6)
    torch.testing.assert_close(columns, expected)


def mixed_experts(model):
    """Three experts of ranks 4, 4, 8; the third leaves out up_proj, so layers hold two column patterns."""
    experts = random_experts(model, 2, 4, seed=1, b_std=0.2) + random_experts(model, 1, 8, seed=2, b_std=0.2)
    partial = {m: d for m, d in experts[2].deltas.items() if not m.endswith("up_proj")}
    experts[2] = type(experts[2])(name="x2", path=experts[2].path, deltas=partial)
    return [type(e)(name=f"x{i}", path=e.path, deltas=e.deltas) for i, e in enumerate(experts)]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = routing_kernel.fused_route

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(routing_kernel, "fused_route", counted)
    return calls


@needs_kernel
@pytest.mark.parametrize(
    "settings",
    [{}, {"top_k": 2, "renormalize": True, "temperature": 0.7}, {"scope": "per_layer"}, {"input": "final_hidden"}],
    ids=["top1", "top2-renorm-temp", "per-layer", "final-hidden"],
)
@pytest.mark.parametrize("add_into", ["base", "fold"])
def test_mixse_with_the_kernel_equals_torch_routing(settings, add_into, spy, monkeypatch):
    """Whole-model logits and every layer's recorded probabilities and gates, kernel against torch."""
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    monkeypatch.setattr(GatedLoraLinear, "fold_device_types", ("cuda", "cpu"))
    base = build_model("tiny", DEVICE, torch.float32, seed=0)
    model = build_mixse(base, mixed_experts(base), RouterSettings(**settings))
    with torch.no_grad():
        model.mixse.router.weight.normal_(0, 1.0)  # confident, varied routing
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model.mixse.record = True
    runs = {}
    for fused in (True, False):
        model.mixse.fused_routing = fused
        with torch.no_grad():
            runs[fused] = (model(input_ids=ids).logits, [(r.probs, r.gates) for r in model.mixse.records])
    layers = len(model.mixse.slots)
    assert len(spy) == layers  # one kernel per layer, and only with fused_routing on
    torch.testing.assert_close(runs[True][0], runs[False][0], **FP32)
    for (p, g), (rp, rg) in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(p, rp, **FP32)
        torch.testing.assert_close(g, rg, **FP32)


@needs_kernel
def test_the_kernel_is_left_out_under_autograd_and_autocast_on_the_reference_path_and_when_off(spy):
    base = build_model("tiny", DEVICE, torch.float32, seed=0)
    model = build_mixse(base, mixed_experts(base), RouterSettings())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model(input_ids=ids).logits.sum().backward()  # router training: torch's differentiable routing
    assert not spy and model.mixse.router.weight.grad.abs().sum() > 0
    model.mixse.fast = False
    with torch.no_grad():
        model(input_ids=ids)
    assert not spy
    model.mixse.fast = True
    with torch.no_grad():
        model(input_ids=ids)
    assert len(spy) == len(model.mixse.slots)
    model.mixse.fused_routing = False
    with torch.no_grad():
        model(input_ids=ids)
    assert len(spy) == len(model.mixse.slots)
    model.mixse.fused_routing = True
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(input_ids=ids)  # autocast rounds the hidden states too: torch's routing does that
    assert len(spy) == len(model.mixse.slots)
    empty = torch.zeros(2, 0, model.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        assert model.mixse.route(empty, 0).shape == (2, 0, 3)  # no tokens: no launch
    assert len(spy) == len(model.mixse.slots)


@pytest.mark.skipif(not torch.cuda.is_available() or routing_kernel.triton is None, reason="needs a GPU")
def test_compiled_mixse_with_the_kernel_is_one_graph_equal_to_eager():
    base = build_model("tiny", "cuda", torch.float32, seed=0)
    model = build_mixse(base, mixed_experts(base), RouterSettings(top_k=2))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(input_ids=ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, dynamic=False)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, **FP32)
    torch._dynamo.reset()


@pytest.mark.skipif(routing_kernel.triton is None, reason="Triton is not installed")
@pytest.mark.skipif(routing_kernel.INTERPRET, reason="already under the interpreter")
def test_the_kernel_under_the_triton_interpreter_on_cpu():
    """The tests above, on CPU tensors through Triton's interpreter (how CI without a GPU checks the kernel)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, summary
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == len(CASES) + 1 + 8 + 1, summary  # all but the GPU compile test
