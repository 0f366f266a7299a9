"""The benchmark harness's helpers and MiXSE's fast path, against references (not timings).

Fast-path tolerance: in float32 the fast path equals ``reference_forward`` within rtol = atol =
1e-5 on logits (only the GEMMs' summation order differs); in bfloat16 its error against a
float32 reference is at most 1.5x the reference path's own bfloat16 error plus 1e-3.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from benchmarks.decode import DecodeRunner
from benchmarks.roofline import (
    attention_flops_per_token,
    decode_bytes_per_step,
    decode_roofline_tokens_per_s,
    linear_params,
    lora_training_flops_per_token,
    weight_bytes_per_step,
)
from benchmarks.shapes import TARGETS, build_model, describe, random_experts, shared_copy, write_adapter
from benchmarks.timing import Timing, ratio, time_fn, time_interleaved
from benchmarks.variants import compare_logits, copy_router_into_xlora, make_loop, make_mixse, make_xlora
from selfmoe.models.mixse import GatedLoraLinear, LinearGroup, RouterSettings, build_mixse, read_expert

FP32 = {"rtol": 1e-5, "atol": 1e-5}
EPILOGUES = ["base", "expand", "fold"]


@pytest.fixture(autouse=True)
def fold_on_cpu(monkeypatch):
    """The fold applies on GPUs only (it saves launches); these tests run it on the CPU too."""
    monkeypatch.setattr(GatedLoraLinear, "fold_device_types", ("cuda", "cpu"))


@pytest.fixture(scope="module")
def base():
    return build_model("tiny", "cpu", torch.float32, seed=0)


@pytest.fixture(scope="module")
def experts(base):
    # Different ranks stack; B is large enough that the experts move the logits visibly.
    mixed = random_experts(base, 2, 4, seed=1, b_std=0.2) + random_experts(base, 1, 8, seed=2, b_std=0.2)
    return [type(e)(name=f"x{i}", path=e.path, deltas=e.deltas) for i, e in enumerate(mixed)]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def both_paths(model, ids):
    fast = logits(model, ids)
    model.mixse.fast = False
    try:
        return fast, logits(model, ids)
    finally:
        model.mixse.fast = True


# --- MiXSE fast path vs its reference path --------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"top_k": 2},
        {"top_k": None},
        {"top_k": 2, "renormalize": True, "temperature": 0.7},
        {"scope": "per_layer"},
        {"mode": "uniform"},
        {"mode": "fixed:x1"},
        {"input": "final_hidden"},
    ],
)
@pytest.mark.parametrize("add_into", EPILOGUES)
def test_fast_path_equals_reference_path_in_float32(base, experts, ids, settings, add_into, monkeypatch):
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    model = make_mixse(base, experts, RouterSettings(**settings))
    with torch.no_grad():
        model.mixse.router.weight.normal_(0, 1.0)  # confident, varied routing
    fast, reference = both_paths(model, ids)
    torch.testing.assert_close(fast, reference, **FP32)
    assert not torch.allclose(fast, logits(base, ids), atol=1e-3)  # the experts act


@pytest.mark.parametrize("add_into", EPILOGUES)
def test_fast_path_in_bfloat16_is_as_accurate_as_the_reference_path(experts, ids, add_into, monkeypatch):
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    ref32 = make_mixse(build_model("tiny", "cpu", torch.float32), experts, RouterSettings(top_k=None))
    low = make_mixse(build_model("tiny", "cpu", torch.bfloat16), experts, RouterSettings(top_k=None))
    low.mixse.router.load_state_dict(ref32.mixse.router.state_dict())
    exact = logits(ref32, ids)
    fast, reference = (t.float() for t in both_paths(low, ids))
    err_fast, err_ref = (fast - exact).abs().max().item(), (reference - exact).abs().max().item()
    assert err_fast <= 1.5 * err_ref + 1e-3, (err_fast, err_ref)


def test_linear_groups_lay_out_fused_matrices_with_the_parameters_as_views(base, experts):
    model = make_mixse(base, experts, RouterSettings())
    layer = model.model.layers[0]
    q, k, v = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
    gate, up, down, o = layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.o_proj
    assert isinstance(q.group, LinearGroup) and q.group is k.group is v.group
    assert gate.group is up.group and gate.group is not q.group
    assert down.group.members == [down] and o.group.members == [o] and down.group is not o.group
    group, r = q.group, q.lora_A.shape[0]
    assert group.members[group.leader] is k  # the fewest outputs (2 KV heads): the cheapest expand
    d_in, rows = q.in_features, k.out_features
    # The leader: [W0_k; A_q; A_k; A_v], its parameters views of it.
    assert group.lead.shape == (rows + 3 * r, d_in)
    assert k.base.weight.data_ptr() == group.lead.data_ptr()
    for i, m in enumerate((q, k, v)):
        assert m.lora_A.data_ptr() == group.lead[rows + i * r].data_ptr()
    assert group.stacked.data_ptr() == q.lora_A.data_ptr()
    # The others: [W0 | 0 .. B .. 0], B at the member's own block of shrink columns.
    for i, m in ((0, q), (2, v)):
        cat = group.cats[i]
        assert cat.shape == (m.out_features, d_in + 3 * r)
        assert m.base.weight.data_ptr() == cat.data_ptr() and m.lora_B.data_ptr() == cat[0, d_in + i * r].data_ptr()
        others = torch.cat([cat[:, d_in : d_in + i * r], cat[:, d_in + (i + 1) * r :]], 1)
        assert not others.any()  # zero padding: the other members' shrink columns do not reach this output
    # The base model that shares its tensors with MiXSE's copy is untouched.
    original = base.model.layers[0].self_attn.q_proj.weight
    assert original is not q.base.weight and original.is_contiguous()
    torch.testing.assert_close(original, q.base.weight, rtol=0, atol=0)


def test_fold_computes_through_the_fused_matrices_for_few_tokens_only(experts, ids, monkeypatch):
    """Garbage in the zero padding of q's [W0 | 0 B 0] reaches the output on the fold path only, and
    only for calls of at most ``fold_max_tokens`` tokens on a device of ``fold_device_types``
    (others take the "base" epilogue)."""
    model = build_mixse(build_model("tiny", "cpu", torch.float32), experts, RouterSettings(top_k=None))
    assert GatedLoraLinear.add_into == "fold" and ids.numel() <= GatedLoraLinear.fold_max_tokens
    folded = logits(model, ids)
    monkeypatch.setattr(GatedLoraLinear, "add_into", "base")
    clean = logits(model, ids)
    monkeypatch.setattr(GatedLoraLinear, "add_into", "fold")
    q = model.model.layers[0].self_attn.q_proj
    q.group.cats[0][:, q.in_features + q.lora_A.shape[0] :] = 1.0  # the columns of k's and v's shrinks
    assert not torch.allclose(logits(model, ids), folded, atol=1e-3)
    monkeypatch.setattr(GatedLoraLinear, "fold_max_tokens", ids.numel() - 1)
    torch.testing.assert_close(logits(model, ids), clean, rtol=0, atol=0)  # "base" reads the parameters
    monkeypatch.setattr(GatedLoraLinear, "fold_max_tokens", ids.numel())
    monkeypatch.setattr(GatedLoraLinear, "fold_device_types", ("cuda",))  # the default: no fold on a CPU
    torch.testing.assert_close(logits(model, ids), clean, rtol=0, atol=0)
    monkeypatch.setattr(GatedLoraLinear, "fold_max_tokens", ids.numel())
    monkeypatch.setattr(GatedLoraLinear, "add_into", "base")
    torch.testing.assert_close(logits(model, ids), clean, rtol=0, atol=0)


@pytest.mark.parametrize("add_into", ["base", "fold"])
def test_in_place_expert_updates_and_moves_reach_the_fast_path(experts, ids, add_into, monkeypatch):
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    # Its own base: the move below converts the (shared) parameters in place.
    model = build_mixse(build_model("tiny", "cpu", torch.float32), experts, RouterSettings(top_k=None))
    before = logits(model, ids)
    attn = model.model.layers[0].self_attn
    q, v = attn.q_proj, attn.v_proj
    with torch.no_grad():
        q.lora_A.data.mul_(3.0)  # what load_mixse's copy_ into .data does
        v.lora_B.data.mul_(2.0)  # lives in v's [W0 | B] matrix
        q.base.weight.data.add_(0.01)
    fast, reference = both_paths(model, ids)
    torch.testing.assert_close(fast, reference, **FP32)
    assert not torch.allclose(fast, before)
    model.to(torch.float64)  # a move re-allocates the parameters: the group lays them out again
    fast, reference = both_paths(model, ids)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)
    assert q.group.stacked.dtype == torch.float64 and q.base.weight.data_ptr() == q.group.cats[0].data_ptr()


@pytest.mark.parametrize("add_into", ["base", "fold"])
def test_a_layout_redone_under_inference_mode_still_trains(experts, ids, add_into, monkeypatch):
    """Lightning validates under inference mode before it trains: the first call after a move may lay
    the matrices out there, and the parameters (their views) must still be usable by autograd."""
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    model = build_mixse(build_model("tiny", "cpu", torch.float32), experts, RouterSettings(top_k=2))
    model.to(torch.float64)
    with torch.inference_mode():
        model(input_ids=ids)
    q = model.model.layers[0].self_attn.q_proj
    assert not q.group.lead.is_inference() and not q.base.weight.is_inference()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.mixse.router.weight.grad.abs().sum() > 0


def test_fold_with_biases_equals_reference(monkeypatch):
    """Qwen-style q/k/v biases and MLP biases: the leader's bias is padded with zeros for the shrink columns."""
    monkeypatch.setattr(GatedLoraLinear, "add_into", "fold")
    config = build_model("tiny", "cpu", torch.float32).config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    model = type(build_model("tiny", "cpu", torch.float32))(config).eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.5)
    mixse = build_mixse(model, random_experts(model, 2, 4, seed=3, b_std=0.2), RouterSettings(top_k=2))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    fast, reference = both_paths(mixse, ids)
    torch.testing.assert_close(fast, reference, **FP32)
    k = mixse.model.layers[0].self_attn.k_proj
    assert k.group.lead_bias is not None and k.base.bias.data_ptr() == k.group.lead_bias.data_ptr()


@pytest.mark.parametrize("add_into", ["base", "fold"])
def test_mixse_compiles_to_one_graph_that_equals_eager(experts, ids, add_into, monkeypatch):
    """torch.compile sees the whole MiXSE forward (router hooks, column gates, linear groups) as one
    graph; after a dtype move the groups' fused matrices are stale, and the traced path must not use them."""
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    model = build_mixse(build_model("tiny", "cpu", torch.float32), experts, RouterSettings(top_k=2))
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, **FP32)
        model.to(torch.float64)  # the compiled code retraces on the new dtype; the stack is still float32
        q = model.model.layers[0].self_attn.q_proj
        assert q.group.stacked.dtype == torch.float32
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager.double(), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_fast_path_gradients_equal_reference_for_router_and_joint_experts(base, experts, ids):
    grads = {}
    for fast in (True, False):
        model = make_mixse(base, experts, RouterSettings(top_k=2))
        for m in model.modules():
            if isinstance(m, GatedLoraLinear):
                m.lora_A.requires_grad_(True)  # the joint router + experts ablation
        model.mixse.fast = fast
        model(input_ids=ids, labels=ids).loss.backward()
        q = model.model.layers[1].self_attn.q_proj
        grads[fast] = (model.mixse.router.weight.grad.clone(), q.lora_A.grad.clone())
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("add_into", EPILOGUES)
def test_router_only_gradients_through_the_shared_shrink(base, experts, ids, add_into, monkeypatch):
    monkeypatch.setattr(GatedLoraLinear, "add_into", add_into)
    grads = []
    for fast in (True, False):
        model = make_mixse(base, experts, RouterSettings(top_k=2))
        model.mixse.fast = fast
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.mixse.router.weight.grad)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["mixse.router.weight"]
    torch.testing.assert_close(grads[0], grads[1], **FP32)


def test_gemma_shape_fast_path(experts, ids):
    gemma = build_model("tiny-gemma", "cpu", torch.float32)
    model = build_mixse(gemma, random_experts(gemma, 2, 4, seed=3, b_std=0.2), RouterSettings(top_k=1))
    fast, reference = both_paths(model, ids)
    torch.testing.assert_close(fast, reference, **FP32)


# --- peers: same function on the same weights ------------------------------------------------------


def test_loop_peer_equals_mixse(base, experts, ids):
    torch.testing.assert_close(
        logits(make_loop(base, experts, RouterSettings(top_k=2)), ids),
        logits(make_mixse(base, experts, RouterSettings(top_k=2)), ids),
        **FP32,
    )


def test_peft_peers_match_mixse(base, tmp_path, ids):
    experts = random_experts(base, 3, 4, seed=5, b_std=0.2)
    dirs = {e.name: write_adapter(e, tmp_path / e.name) for e in experts}
    assert read_expert("e0", dirs["e0"]).deltas.keys() == experts[0].deltas.keys()
    lora = PeftModel.from_pretrained(shared_copy(base), str(dirs["e0"])).eval()
    fixed = make_mixse(base, experts, RouterSettings(mode="fixed:e0"))
    torch.testing.assert_close(logits(fixed, ids), logits(lora, ids), **FP32)
    xlora = make_xlora(base, dirs, top_k=1)
    reading = make_mixse(base, experts, RouterSettings(input="final_hidden"))
    copy_router_into_xlora(reading, xlora)
    torch.testing.assert_close(logits(xlora, ids), logits(reading, ids), **FP32)


def test_shared_copy_shares_weights_not_modules(base):
    twin = shared_copy(base)
    assert twin is not base and twin.model.layers[0] is not base.model.layers[0]
    assert all(a is b for a, b in zip(twin.parameters(), base.parameters(), strict=True))


# --- decode runner -----------------------------------------------------------------------------------


def test_static_cache_decode_runner_matches_generate(base, experts):
    model = make_mixse(base, experts, RouterSettings(top_k=2))
    runner = DecodeRunner(model, batch=2, context=0, max_steps=12)
    tokens = runner.tokens(6)
    with torch.no_grad():
        expected = model.generate(runner.first, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(tokens, expected[:, 1:])
    assert torch.equal(runner.tokens(6), tokens)  # reset makes runs repeatable


# --- arithmetic, by hand ------------------------------------------------------------------------------


def test_roofline_arithmetic_by_hand(base):
    # tiny: vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads; untied, float32.
    attn = 64 * 64 + 2 * (64 * 32) + 64 * 64  # q, k, v, o
    mlp = 3 * 64 * 128
    per_layer = attn + mlp + 2 * 64  # two RMSNorm weights
    weights = (2 * per_layer + 64 + 512 * 64) * 4  # layers + final norm + LM head; the input table is not read
    assert weight_bytes_per_step(base) == weights
    kv = describe(base)["kv_bytes_per_token"]
    assert kv == 2 * 2 * 2 * 16 * 4  # K and V x layers x KV heads x head_dim x 4 bytes
    assert decode_bytes_per_step(weights, kv, 8, 100) == weights + 8 * 100 * kv
    assert decode_roofline_tokens_per_s(weights, kv, 8, 100, 1e9) == pytest.approx(8 / ((weights + 800 * kv) / 1e9))
    assert linear_params(base) == 2 * (attn + mlp) + 512 * 64


def test_llama3_8b_decode_roofline_matches_notes():
    # 8.03e9 params minus the 128256 x 4096 input table, bf16; 128 KiB of KV per token.
    weights = (8_030_261_248 - 128256 * 4096) * 2
    tps = decode_roofline_tokens_per_s(weights, 131072, 128, 1024, 4.3e12)
    assert 16_000 < tps < 17_500  # NOTES.md: ~16.6K tokens/s at batch 128, 1K context


def test_training_flops_by_hand():
    assert attention_flops_per_token(2, 64, 3) == 2 * 4 * 64 * 2
    flops = lora_training_flops_per_token(linear=1000, lora=10, layers=2, q_width=64, seq_len=3)
    attn = 2 * 4 * 64 * 2
    assert flops == (2000 + 20 + attn) + (2000 + 40 + 2 * attn)


def test_timing_median_and_ratio():
    t = Timing([3.0, 1.0, 2.0, 100.0, 2.5])
    assert t.median_ms == 2.5 and t.iters == 5
    assert ratio(Timing([4.0]), Timing([2.0])) == 0.5  # twice the time: half the throughput
    assert t.per_second(10) == pytest.approx(4000.0)
    calls = []
    out = time_fn(lambda: calls.append(1), device="cpu", iters=20, warmup=3)
    assert out.iters == 20 and len(calls) == 23


def test_round_robin_shuffles_so_no_variant_always_follows_the_same_one():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    timings = time_interleaved(fns, device="cpu", iters=12, warmup=1)
    assert "".join(calls[:4]) == "abcd"  # the warm-up, in order
    rounds = ["".join(calls[i : i + 4]) for i in range(4, len(calls), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)  # each variant once per round
    predecessors = {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in "abcd"}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors
    assert {n: t.iters for n, t in timings.items()} == dict.fromkeys("abcd", 12)


def test_compare_logits_by_hand():
    ref = torch.tensor([[1.0, 2.0, 3.0]])
    got = torch.tensor([[1.0, 2.5, 3.0]])
    c = compare_logits(got, ref)
    assert c["max_abs_diff"] == 0.5 and c["argmax_agree"] == 1.0 and c["ref_max_abs"] == 3.0
    assert c["rel_l2"] == pytest.approx(0.5 / math.sqrt(14))


def test_selfgen_settings_match_the_config():
    from benchmarks.e5_selfgen import DATA
    from selfmoe.config import load_config

    data = load_config("generate", ["model=llama-3-8b"]).data  # the tiny model shortens generation
    assert {k: getattr(data, k) for k in DATA} == DATA


def test_harness_targets_every_linear_the_experts_train():
    from selfmoe.config import load_config

    assert tuple(load_config("expert", ["model=llama-3-8b"]).model.lora_targets) == TARGETS


# --- E3: the expert phase's training step -------------------------------------------------------


def test_e3_times_the_expert_phase_step_beside_peft_stock(tmp_path, base):
    from benchmarks import e3_expert
    from benchmarks.common import Context, Settings, quick

    settings = quick(Settings(device="cpu"))
    result = e3_expert.run(Context(settings, base, [], {}, tmp_path, facts=describe(base)))
    e3_expert.show(result)
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert set(rows) == {"as_configured", "compile_off", "fused_lora_off", "peft_stock"}
    assert all(r["lora_params"] > 0 and r["mfu"] > 0 for r in rows.values())
    n = rows["as_configured"]["lora_layers"]
    assert n == len(TARGETS) * base.config.num_hidden_layers
    # On a CPU the phase trains in 32-true: PEFT's input cast stays on everywhere.
    assert result["precision"] == "32-true" and all(r["cast_input"] for r in rows.values())
    assert rows["as_configured"]["lean_lora_layers"] == rows["compile_off"]["lean_lora_layers"] == n
    assert rows["fused_lora_off"]["lean_lora_layers"] == rows["peft_stock"]["lean_lora_layers"] == 0


def test_e3_on_a_gpu_uses_the_phase_bf16_mixed_setup(tmp_path, base):
    """What "as configured" builds on the H200 (checked here without one): lean layers, cast off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from benchmarks import e3_expert
    from benchmarks.common import Context, Settings
    from selfmoe.models.lora_train import lean_layers
    from selfmoe.phases.expert import expert_model

    cfg = e3_expert.expert_config(Context(Settings(device="cuda"), base, [], {}, tmp_path))
    assert cfg.model.name == "llama-3-8b" and cfg.trainer.precision == "bf16-mixed"
    lora = cfg.expert.lora
    assert {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout} == e3_expert.EXPERT_LORA
    model = expert_model(cfg, shared_copy(base))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(lean_layers(model)) == len(layers) > 0 and not any(m.cast_input_dtype_enabled for m in layers)


def test_e4_compiled_rows_decode_like_eager(tmp_path, base, experts):
    """``--decode-compile``: base and MiXSE also run compiled; their ratio is compiled against compiled."""
    from dataclasses import replace

    from benchmarks import e4_decode
    from benchmarks.common import Context, Settings, quick

    settings = replace(quick(Settings(device="cpu")), peers=False, decode_batches=(2,), decode_compile=True)
    result = e4_decode.run(Context(settings, base, experts, {}, tmp_path, facts=describe(base)))
    e4_decode.show(result)
    row = result["batches"][2]
    tps = row["tokens_per_s"]
    assert set(tps) == {f"{m}/{k}" for m in ("base", "mixse") for k in ("eager", "compiled")}
    ratio = tps["mixse/compiled"] / tps["base/compiled"]
    assert row["ratio_vs_base_compiled"]["mixse/compiled"] == pytest.approx(ratio)
    # The compiled step computes what the eager step computes (float32): first-step logits, then tokens.
    mixse = make_mixse(base, experts, RouterSettings())
    for add_into in ("base", "fold"):
        GatedLoraLinear.add_into = add_into
        try:
            eager = DecodeRunner(mixse, 2, 16, max_steps=8)
            compiled = DecodeRunner(torch.compile(mixse, dynamic=False), 2, 16, max_steps=8, cache=eager.cache)
            first = []
            for runner in (eager, compiled):
                runner.reset()
                runner.step()
                first.append(runner.logits.clone())
            torch.testing.assert_close(first[1], first[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(eager.tokens(4), compiled.tokens(4))
        finally:
            GatedLoraLinear.add_into = "fold"
    torch._dynamo.reset()


# --- on a GPU: the graphed decode -------------------------------------------------


def e1_quick(device: str, tmp_path):
    from benchmarks import e1_prefill
    from benchmarks.common import Settings, make_context, quick

    settings = quick(Settings(device=device))
    settings.sweep = False
    return e1_prefill.run(make_context(settings, tmp_path))


def test_e1_quick_on_cpu_skips_the_graphs_with_a_note(tmp_path, capsys):
    from benchmarks import e1_prefill

    result = e1_quick("cpu", tmp_path)
    assert "mixse" in result["timings"] and not any(k.endswith("/graph") for k in result["timings"])
    assert result["e1_ratio"] == {"eager": result["ratio_vs_base"]["mixse"]}
    assert "need a GPU" in result["graphs"]
    e1_prefill.show(result)
    printed = capsys.readouterr().out
    assert "graphed —" in printed and "need a GPU" in printed


# --- on a GPU: the graphed decode and prefill ---------------------------------------


@pytest.mark.gpu
def test_graph_replay_decodes_like_eager_steps():
    model = build_model("tiny", "cuda", torch.bfloat16)
    mixse = build_mixse(model, random_experts(model, 3, 8, seed=1, b_std=0.2), RouterSettings())
    eager = DecodeRunner(mixse, 2, 32, max_steps=16)
    graph = DecodeRunner(mixse, 2, 32, max_steps=16, graph=True, cache=eager.cache)
    assert torch.equal(eager.tokens(8), graph.tokens(8))


@pytest.mark.gpu
def test_e1_quick_on_gpu_times_graph_replays_equal_to_eager(tmp_path):
    result = e1_quick("cuda", tmp_path)
    assert {"base/graph", "mixse/graph", "lora/graph"} <= set(result["timings"]), result.get("graph_errors")
    assert result["e1_ratio"]["graph"] == result["ratio_vs_base_graph"]["mixse/graph"]
    for name in ("base", "mixse", "lora"):
        check = result["numerics"][f"{name}_graph_vs_eager"]
        # bf16, and the replay pads 16 tokens to a bucket of 128: rounding only, far below the
        # 4 % noise floor of docs/performance.md.
        assert check["rel_l2"] < 0.02, (name, check)


def routing_quick(device: str, tmp_path):
    from benchmarks import routing
    from benchmarks.common import Settings, make_context, quick

    return routing.run(make_context(quick(Settings(device=device)), tmp_path))


def test_routing_benchmark_needs_a_gpu(tmp_path):
    assert routing_quick("cpu", tmp_path) == {"note": "GPU only: device time from CUDA graph replay"}


@pytest.mark.gpu
def test_routing_benchmark_times_kernel_and_torch_on_the_same_columns(tmp_path):
    from benchmarks import routing

    result = routing_quick("cuda", tmp_path)
    assert set(result["by_tokens"]) == set(routing.TOKENS)
    for row in result["by_tokens"].values():
        assert row["read_us"] > 0 and row["torch_us"] > 0 and row["kernel_us"] > 0
        # The same experts for every token but near-ties of the summation order (random hidden states).
        assert row["tokens_routed_apart"] < 0.01, row
