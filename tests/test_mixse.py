"""MiXSE against its references: PEFT itself, hand-computed weight deltas, the base model."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from selfmoe.data.schema import Example, write_jsonl
from selfmoe.errors import SelfMoEError
from selfmoe.models.mixse import (
    GatedLoraLinear,
    RouterSettings,
    build_mixse,
    load_mixse,
    read_expert,
    save_mixse,
)
from selfmoe.models.router import GateSpec, gates_from_logits, load_balancing_loss, low_precision_logits, topk_mask
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["alpha", "beta", "gamma"]
RANKS = {"alpha": 4, "beta": 8, "gamma": 2}  # different ranks stack


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, str]:
    """Three PEFT adapters with random (non-zero) A and B, saved by PEFT itself."""
    root = tmp_path_factory.mktemp("experts")
    dirs = {}
    for i, name in enumerate(EXPERTS):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=RANKS[name], lora_alpha=2 * RANKS[name] + i, target_modules=TARGETS, init_lora_weights=False)
        peft = get_peft_model(tiny_base(), cfg)
        peft.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 13, 17, 21, 25, 29], [2, 7, 11, 0, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def mixse(expert_dirs, **settings):
    experts = [read_expert(n, expert_dirs[n]) for n in EXPERTS]
    return build_mixse(tiny_base(), experts, RouterSettings(**settings))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- gate math -------------------------------------------------------------------------------


def test_topk_mask_by_hand():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    torch.testing.assert_close(topk_mask(probs, 1), torch.tensor([[0.0, 0.6, 0.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(topk_mask(probs, 2), torch.tensor([[0.0, 0.6, 0.3], [0.5, 0.0, 0.3]]))
    torch.testing.assert_close(topk_mask(probs, 1, renormalize=True), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        topk_mask(probs, 2, renormalize=True), torch.tensor([[0.0, 2 / 3, 1 / 3], [0.625, 0.0, 0.375]])
    )
    torch.testing.assert_close(topk_mask(probs, 3), probs)
    tied = torch.tensor([[0.4, 0.4, 0.2]])
    assert [int((topk_mask(tied, k) > 0).sum()) for k in (1, 2)] == [1, 2]  # exactly k experts, ties or not


def test_gates_from_logits_softmax_first_then_mask_in_float32():
    logits = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.bfloat16)
    probs, gates = gates_from_logits(logits, GateSpec(3, top_k=1))
    e = [math.exp(1.0), math.exp(2.0), 1.0]
    expected = torch.tensor([[x / sum(e) for x in e]])
    assert probs.dtype == gates.dtype == torch.float32
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(gates, torch.tensor([[0.0, expected[0, 1].item(), 0.0]]))  # not renormalised: < 1
    hot, _ = gates_from_logits(torch.tensor([[1.0, 2.0, 0.0]]), GateSpec(3, top_k=None, temperature=0.5))
    e2 = [math.exp(2.0), math.exp(4.0), 1.0]
    torch.testing.assert_close(hot, torch.tensor([[x / sum(e2) for x in e2]]))


def test_low_precision_router_logits_only_for_inference_outside_autocast(monkeypatch):
    """The bf16 router GEMM (CUDA only, tested in test_gpu.py) is chosen exactly when no
    gradient, no autocast and half-precision hidden states make it equal to the float32 path's
    operands; a CPU tensor never takes it (``mm`` with ``out_dtype`` has no CPU kernel)."""
    w = torch.zeros(4, 8, requires_grad=True)
    h = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert not low_precision_logits(h, w)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert low_precision_logits(h, w)
        assert not low_precision_logits(h.float(), w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not low_precision_logits(h, w)
    assert not low_precision_logits(h, w)  # the router weight needs its gradient
    assert low_precision_logits(h, w.detach())


@pytest.mark.parametrize(("n", "k"), [(0, 1), (2, 3), (2, 0)])
def test_gate_spec_rejects_bad_shapes(n, k):
    with pytest.raises(ValueError):
        GateSpec(n, top_k=k)


def test_load_balancing_loss_by_hand_ignores_padding():
    probs = torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]])
    gates = topk_mask(probs, 1)  # tokens go to expert 0, 1, 0 (tie -> first)
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    # f = (1/2, 1/2), P = ((0.7 + 0.2)/2, (0.3 + 0.8)/2) = (0.45, 0.55): 2 * (0.225 + 0.275) = 1.0
    torch.testing.assert_close(load_balancing_loss(probs, gates, mask), torch.tensor(1.0))
    # Without the mask the padding token counts: f = (2/3, 1/3), P = (1.4/3, 1.6/3).
    expected = 2 * (2 / 3 * 1.4 / 3 + 1 / 3 * 1.6 / 3)
    torch.testing.assert_close(load_balancing_loss(probs, gates), torch.tensor(expected))


# --- correctness anchors ---------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERTS)
def test_forced_single_expert_equals_peft_with_that_adapter(expert_dirs, inputs, name):
    peft = PeftModel.from_pretrained(tiny_base(), expert_dirs[name]).eval()
    model = mixse(expert_dirs, mode=f"fixed:{name}")
    torch.testing.assert_close(logits(model, inputs), logits(peft, inputs), rtol=1e-5, atol=1e-5)


def merged_model(expert_dirs, weights: dict[str, float]) -> LlamaForCausalLM:
    """A plain model with W0 + sum_i w_i * s_i * B_i A_i written into its weights, by hand."""
    model = tiny_base()
    import json
    from pathlib import Path

    for name, w in weights.items():
        config = json.loads((Path(expert_dirs[name]) / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(Path(expert_dirs[name]) / "adapter_model.safetensors")
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                with torch.no_grad():
                    model.get_submodule(module).weight += w * scale * (b @ a)
    return model


def test_uniform_equals_base_plus_the_sum_of_scaled_deltas(expert_dirs, inputs):
    model = mixse(expert_dirs, mode="uniform")
    reference = merged_model(expert_dirs, {n: 1 / len(EXPERTS) for n in EXPERTS})
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=1e-4, atol=1e-4)


def test_dense_softmax_gates_match_per_token_merged_weights(expert_dirs, inputs):
    """top_k=None with a constant router: every token mixes all experts by the same softmax weights."""
    model = mixse(expert_dirs, top_k=None)
    with torch.no_grad():
        model.mixse.router.weight.zero_()  # logits 0 -> probabilities 1/3 each, whatever the input
    reference = merged_model(expert_dirs, {n: 1 / 3 for n in EXPERTS})
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=1e-4, atol=1e-4)


def test_zeroed_experts_give_the_base_output(expert_dirs, inputs):
    model = mixse(expert_dirs, top_k=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLoraLinear):
                m.lora_B.zero_()
    torch.testing.assert_close(logits(model, inputs), logits(tiny_base(), inputs), rtol=0, atol=1e-6)


def test_layer_routing_reads_the_hidden_state_entering_each_layer(expert_dirs, inputs):
    model = mixse(expert_dirs, top_k=2)
    model.mixse.record = True
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for layer, record in enumerate(model.mixse.records):
        expected_probs, expected_gates = gates_from_logits(
            out.hidden_states[layer] @ model.mixse.router.weight[0].T, model.mixse.spec
        )
        torch.testing.assert_close(record.probs, expected_probs)
        torch.testing.assert_close(record.gates, expected_gates)
        assert ((record.gates > 0).sum(-1) == 2).all()


def test_per_layer_scope_has_one_router_per_layer(expert_dirs, inputs):
    model = mixse(expert_dirs, scope="per_layer")
    assert model.mixse.router.weight.shape == (2, 3, 32)
    model.mixse.record = True
    logits(model, inputs)
    # Different routers per layer: the layers' gates are not one shared function of the input.
    shared = mixse(expert_dirs)
    shared.mixse.router.weight.data.copy_(model.mixse.router.weight.data[:1])
    shared.mixse.record = True
    logits(shared, inputs)
    torch.testing.assert_close(shared.mixse.records[0].gates, model.mixse.records[0].gates)
    assert not torch.allclose(shared.mixse.records[1].probs, model.mixse.records[1].probs)


def test_final_hidden_mode_runs_and_routes_differently(expert_dirs, inputs):
    layer = mixse(expert_dirs)
    final = mixse(expert_dirs, input="final_hidden")
    final.mixse.router.load_state_dict(layer.mixse.router.state_dict())
    for m in (layer, final):
        m.mixse.record = True
    out_layer, out_final = logits(layer, inputs), logits(final, inputs)
    assert not torch.allclose(out_layer, out_final)
    # Every layer reads the same gates: those of the final hidden state of an adapter-free pass.
    with torch.no_grad():
        hidden = tiny_base().model(**inputs).last_hidden_state
    expected = gates_from_logits(hidden @ final.mixse.router.weight[0].T, final.mixse.spec)[1]
    for record in final.mixse.records:
        torch.testing.assert_close(record.gates, expected)
    assert not torch.allclose(layer.mixse.records[0].gates, final.mixse.records[0].gates)
    with pytest.raises(SelfMoEError, match="use_cache=False"):
        final.generate(inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    final.generate(inputs["input_ids"][:1], max_new_tokens=3, do_sample=False, use_cache=False)


def test_generate_with_kv_cache_equals_without(expert_dirs, inputs):
    model = mixse(expert_dirs, top_k=2)
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_only_router_parameters_get_gradients_and_change(expert_dirs, inputs):
    model = mixse(expert_dirs)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["mixse.router.weight"]
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all((p.grad is None) == (not p.requires_grad) for p in model.parameters())
    opt.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["mixse.router.weight"]


@pytest.mark.parametrize("settings", [{}, {"scope": "per_layer", "top_k": 2}])
def test_save_load_round_trip_gives_identical_logits(expert_dirs, inputs, tmp_path, settings):
    model = mixse(expert_dirs, **settings)
    with torch.no_grad():
        model.mixse.router.weight.normal_()
    save_mixse(model, tmp_path, base_model="toy", expert_dirs=expert_dirs)
    loaded = load_mixse(tiny_base(), tmp_path, base_model="toy")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    assert loaded.mixse.settings == model.mixse.settings
    ablation = load_mixse(tiny_base(), tmp_path, top_k=None)  # the "all experts" ablation, same router
    assert ablation.mixse.spec.k == 3


def test_load_refuses_changed_experts_and_other_bases(expert_dirs, tmp_path):
    import shutil

    local = {n: str(tmp_path / n) for n in EXPERTS}
    for n in EXPERTS:
        shutil.copytree(expert_dirs[n], local[n])
    save_mixse(mixse(local), tmp_path / "mixse", base_model="toy", expert_dirs=local)
    with pytest.raises(SelfMoEError, match="not 'other'"):
        load_mixse(tiny_base(), tmp_path / "mixse", base_model="other")
    tensors = load_file(f"{local['beta']}/adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v * 2 for k, v in tensors.items()}, f"{local['beta']}/adapter_model.safetensors")
    with pytest.raises(SelfMoEError, match=r"'beta'.*hash mismatch"):
        load_mixse(tiny_base(), tmp_path / "mixse")


def test_bad_expert_sets(expert_dirs, tmp_path):
    with pytest.raises(SelfMoEError, match="at least one expert"):
        build_mixse(tiny_base(), [], RouterSettings())
    with pytest.raises(ValueError, match="top_k=4"):
        mixse(expert_dirs, top_k=4)
    with pytest.raises(SelfMoEError, match=r"missing adapter_config\.json"):
        read_expert("delta", tmp_path)
    # An adapter made for another base model (other widths) is refused, naming expert and module.
    torch.manual_seed(0)
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    get_peft_model(wide, LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(tmp_path / "wide")
    with pytest.raises(SelfMoEError, match=r"expert 'wide' does not fit this base model"):
        build_mixse(tiny_base(), [read_expert("wide", tmp_path / "wide")], RouterSettings())


# --- learning to route -------------------------------------------------------------------------


def _domain_examples(domain: str, n: int) -> list[Example]:
    """Two clearly different toy domains: repeated letters vs. counting digits."""
    rows = []
    for i in range(n):
        if domain == "letters":
            text = " ".join(chr(97 + (i + j) % 5) * 6 for j in range(3))
        else:
            text = " ".join(str((i + j) % 10) for j in range(12))
        rows.append(Example(id=f"{domain}/{i}", domain=domain, instruction="Continue.", output=text))
    return rows


def test_router_learns_to_route_each_domain_to_its_expert(tmp_path):
    """Experts trained on two different toy domains; the router learns who is who."""
    from selfmoe.config import OptimConfig, RouterConfig
    from selfmoe.data.datamodule import SFTDataModule
    from selfmoe.data.prompts import sft_prompt
    from selfmoe.models.tiny import build_tokenizer
    from selfmoe.training.expert import ExpertLitModule
    from selfmoe.training.router import RouterLitModule

    domains = ["letters", "digits"]
    data = {}
    for d in domains:
        write_jsonl(tmp_path / d / "train.jsonl", _domain_examples(d, 24))
        write_jsonl(tmp_path / d / "val.jsonl", _domain_examples(d, 8))
        data[d] = tmp_path / d
    corpus = [sft_prompt(e, "alpaca") + e.output for d in domains for e in _domain_examples(d, 24)]
    tok = build_tokenizer(corpus, 300)
    base_cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )

    def fresh_base():
        torch.manual_seed(0)
        return LlamaForCausalLM(base_cfg).eval()

    def trainer(epochs):
        return L.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            inference_mode=False,
        )

    optim = OptimConfig(lr=1e-2, epochs=6, global_batch_size=8, micro_batch_size=8, warmup_ratio=0.0)
    experts = []
    for d in domains:
        L.seed_everything(0)
        peft = get_peft_model(fresh_base(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        dm = SFTDataModule({d: data[d]}, tok, template="alpaca", max_length=256, micro_batch_size=8)
        trainer(6).fit(ExpertLitModule(peft, optim), datamodule=dm)
        peft.save_pretrained(tmp_path / "experts" / d)
        experts.append(read_expert(d, tmp_path / "experts" / d))

    L.seed_everything(0)
    model = build_mixse(fresh_base(), experts, RouterSettings())
    dm = SFTDataModule(data, tok, template="alpaca", max_length=256, micro_batch_size=8)
    module = RouterLitModule(
        model,
        RouterConfig(experts=domains, lr=5e-2, epochs=8, global_batch_size=8, micro_batch_size=8, warmup_ratio=0.0),
    )
    t = trainer(8)
    before = t.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    t.fit(module, datamodule=dm)
    after = t.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < before

    # Share of each domain's response-token gate mass sent to each expert, by hand.
    model.mixse.record = True
    share = torch.zeros(2, 2)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = (batch["labels"] != -100).float()
            for record in model.mixse.records:
                for row, d in enumerate(batch["domain"].tolist()):
                    share[d] += (record.gates[row] * mask[row, :, None]).sum(0)
    share = share / share.sum(1, keepdim=True)
    assert share[0, 0] > 0.5 and share[1, 1] > 0.5, share  # chance is 0.5 for two experts


def test_lm_eval_hflm_scores_mixse_like_a_transformers_model(expert_dirs):
    """lm-eval's HFLM takes the MiXSE model object as is; its log-likelihoods match ours."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from selfmoe.models.tiny import build_tokenizer

    tok = build_tokenizer(["the cat sat on the mat", "two plus two is four"] * 4, 300)
    model = mixse(expert_dirs, top_k=2)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    requests = [("the cat sat", " on the mat"), ("two plus", " two is four")]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i) for i, req in enumerate(requests)]
    scores = [ll for ll, _ in lm.loglikelihood(instances)]
    for (context, continuation), score in zip(requests, scores, strict=True):
        ctx = tok(context)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)


def test_a_moved_outputs_tree_still_loads(expert_dirs, inputs, tmp_path):
    import shutil

    tree = tmp_path / "a"
    local = {n: str(tree / "experts" / n) for n in EXPERTS}
    for n in EXPERTS:
        shutil.copytree(expert_dirs[n], local[n])
    model = mixse(local, top_k=2)
    save_mixse(model, tree / "mixse", base_model="toy", expert_dirs=local)
    shutil.move(tree, tmp_path / "b")
    loaded = load_mixse(tiny_base(), tmp_path / "b" / "mixse")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_router_training_loss_adds_the_load_balancing_term(expert_dirs, inputs):
    """RouterLitModule: loss = NLL + coef * mean over layers of the padding-aware balance loss."""
    from selfmoe.config import RouterConfig
    from selfmoe.training.router import RouterLitModule

    model = mixse(expert_dirs, top_k=2)
    batch = {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}
    module = RouterLitModule(model, RouterConfig(experts=EXPERTS, aux_loss_coef=0.5))
    module.log = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_loss(batch)
    model.mixse.record = True
    nll = model(**inputs, labels=batch["labels"]).loss
    aux = torch.stack(
        [load_balancing_loss(r.probs, r.gates, inputs["attention_mask"]) for r in model.mixse.records]
    ).mean()
    torch.testing.assert_close(loss, nll + 0.5 * aux)
    loss.backward()
    assert model.mixse.router.weight.grad is not None and not model.mixse.collect_aux
    plain = RouterLitModule(mixse(expert_dirs, top_k=2), RouterConfig(experts=EXPERTS))
    torch.testing.assert_close(plain.training_loss(batch), nll)
