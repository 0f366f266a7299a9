"""Weight merging of LoRA experts against PEFT itself and against hand computations."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from selfmoe.errors import ConfigError, DataError
from selfmoe.models.merging import (
    LoraDeltas,
    MergeSpec,
    apply_deltas,
    dare_seed,
    load_merged,
    lora_deltas,
    merge_adapters,
    merge_deltas,
    merge_module,
    merged_weights,
    save_merged,
    ties_trim,
)
from selfmoe.models.mixse import adapter_hash
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Each adapter exercises a different part of PEFT's scaling rule.
ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 12},
    "patterned": {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    "rslora": {"r": 8, "lora_alpha": 5, "use_rslora": True},
}


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, str]:
    """PEFT adapters with random (non-zero) A and B, saved by PEFT itself."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        peft = get_peft_model(tiny_base(), LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kwargs))
        peft.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def peft_merged_weights(base_factory, adapter_dir: str) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(base_factory(), adapter_dir).merge_and_unload().state_dict()


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[2, 5, 9, 13, 17, 21, 25, 29], [3, 7, 11, 19, 23, 31, 37, 41]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- lora_deltas: the delta PEFT itself applies -----------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_lora_deltas_equal_what_peft_merges(adapter_dirs, name):
    deltas = lora_deltas(adapter_dirs[name])
    assert len(deltas) == 2 * len(TARGETS)  # every target of both layers
    base, merged = tiny_base().state_dict(), peft_merged_weights(tiny_base, adapter_dirs[name])
    assert base.keys() == merged.keys()
    for key, w0 in base.items():
        module = key.removesuffix(".weight")
        expected = merged[key]
        if module in deltas:
            assert deltas[module].dtype == torch.float32 and deltas[module].abs().max() > 0
            torch.testing.assert_close(w0 + deltas[module], expected, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(w0, expected, rtol=0, atol=0)  # unadapted weights untouched


def test_lora_deltas_follow_peft_for_embeddings_and_fan_in_fan_out(tmp_path):
    """Embedding LoRA (stored transposed) and GPT-2's Conv1D (fan_in_fan_out): ΔW in the weight's layout."""

    def gpt2() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()

    cases = [
        (tiny_base, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)),
        (gpt2, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)),
    ]
    for i, (factory, config) in enumerate(cases):
        get_peft_model(factory(), config).save_pretrained(tmp_path / str(i))
        deltas = lora_deltas(tmp_path / str(i))
        base, merged = factory().state_dict(), peft_merged_weights(factory, str(tmp_path / str(i)))
        assert len(deltas) == (3 if i == 0 else 2)
        for module, delta in deltas.items():
            key = f"{module}.weight"
            torch.testing.assert_close(base[key] + delta, merged[key], rtol=0, atol=1e-6)


def test_lora_deltas_are_lazy_and_can_run_on_a_device(adapter_dirs):
    lazy = LoraDeltas(adapter_dirs["plain"], device="cpu")
    assert set(lazy) == set(lora_deltas(adapter_dirs["plain"]))
    module = next(iter(lazy))
    torch.testing.assert_close(lazy[module], lora_deltas(adapter_dirs["plain"])[module], rtol=0, atol=0)


def test_unsupported_or_broken_adapters_are_refused(tmp_path, adapter_dirs):
    get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    with pytest.raises(DataError, match="use_dora"):
        lora_deltas(tmp_path / "dora")
    with pytest.raises(DataError, match=r"adapter_model\.safetensors"):
        lora_deltas(tmp_path / "nowhere")
    bad = tmp_path / "bad-rank"
    bad.mkdir()
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False, "r": 3}))
    src = tmp_path / "plain" / "adapter_model.safetensors"
    get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(src.parent)
    (bad / "adapter_model.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(DataError, match="rank 2"):  # the config's r must match the stored factors
        lora_deltas(bad)


# --- merge methods by hand --------------------------------------------------------------------

D1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.1, -1.5]])
D2 = torch.tensor([[-4.0, 1.0, 0.2], [2.0, -0.3, 0.6]])
D3 = torch.tensor([[0.5, 2.5, -3.0], [-1.0, 0.4, 0.2]])


def test_linear_by_hand():
    out = merge_module("m", [D1, D2], MergeSpec("linear", weights=(0.5, 2.0)))
    torch.testing.assert_close(out, torch.tensor([[-7.5, 1.0, 0.65], [5.5, -0.55, 0.45]]))
    equal = merge_module("m", [D1, D2, D3], MergeSpec("linear"))  # default λ_i = 1/N
    torch.testing.assert_close(equal, (D1 + D2 + D3) / 3)


def test_ties_by_hand():
    # Trim, density 0.5: k = 3 of 6 entries by magnitude in each matrix.
    t1 = torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, -1.5]])  # keeps 3, 2, 1.5
    t2 = torch.tensor([[-4.0, 1.0, 0.0], [2.0, 0.0, 0.0]])  # keeps 4, 2, 1
    t3 = torch.tensor([[0.0, 2.5, -3.0], [-1.0, 0.0, 0.0]])  # keeps 3, 2.5, 1
    for d, t in zip([D1, D2, D3], [t1, t2, t3], strict=True):
        torch.testing.assert_close(ties_trim(d, 0.5), t, rtol=0, atol=0)
    # Elect: sum = [[-4, 1.5, -3], [4, 0, -1.5]] -> sign [[-, +, -], [+, 0, -]].
    # Disjoint mean over agreeing non-zero entries: (0,1) mean(1, 2.5); (1,0) mean(3, 2); (1,1) nobody -> 0.
    expected = torch.tensor([[-4.0, 1.75, -3.0], [2.5, 0.0, -1.5]])
    torch.testing.assert_close(merge_module("m", [D1, D2, D3], MergeSpec("ties", density=0.5)), expected)
    torch.testing.assert_close(merge_module("m", [D1, D2, D3], MergeSpec("ties", density=0.5, scale=0.5)), expected / 2)
    # No trim (density 1): sum = [[-2.5, 1.5, -2.3], [4, 0.2, -0.7]]; (1,1) now mean(0.1, 0.4).
    untrimmed = torch.tensor([[-4.0, 1.75, -3.0], [2.5, 0.25, -1.5]])
    torch.testing.assert_close(merge_module("m", [D1, D2, D3], MergeSpec("ties", density=1.0)), untrimmed)
    # dare_ties with nothing dropped is TIES without the trim.
    torch.testing.assert_close(merge_module("m", [D1, D2, D3], MergeSpec("dare_ties", drop_p=0.0, seed=0)), untrimmed)


def test_ties_trim_keeps_entries_tied_with_the_threshold_and_at_least_one():
    d = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    torch.testing.assert_close(ties_trim(d, 0.5), torch.tensor([[1.0, -1.0, 0.0, 2.0]]))  # k=2, |1| tied: 3 kept
    torch.testing.assert_close(ties_trim(d, 0.01), torch.tensor([[0.0, 0.0, 0.0, 2.0]]))


def documented_keep_mask(seed: int, module: str, index: int, shape, p: float) -> torch.Tensor:
    """The mask as merging.py documents it, re-derived here independently."""
    digest = hashlib.sha256(f"{seed}/{module}/{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return torch.rand(shape, generator=generator) >= p


def test_dare_by_hand_with_a_fixed_seed():
    p, seed, module = 0.5, 7, "model.layers.0.mlp.up_proj"
    assert dare_seed(seed, module, 1) != dare_seed(seed, module, 0) != dare_seed(seed + 1, module, 0)
    keep = [documented_keep_mask(seed, module, i, D1.shape, p) for i in range(2)]
    assert not torch.equal(keep[0], keep[1])  # each expert has its own mask
    spec = MergeSpec("dare", weights=(0.5, 2.0), drop_p=p, seed=seed)
    out = merge_module(module, [D1, D2], spec)
    expected = 0.5 * keep[0] * D1 * 2.0 + 2.0 * keep[1] * D2 * 2.0  # survivors rescaled by 1 / (1 - p) = 2
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(merge_module(module, [D1, D2], spec), out, rtol=0, atol=0)  # deterministic
    single = merge_module(module, [D1], MergeSpec("dare", weights=(1.0,), drop_p=p, seed=seed))
    assert set(torch.unique(single / D1).tolist()) <= {0.0, 2.0}  # dropped exactly, survivors exactly doubled
    # dare_ties: the same masks, then sign election and disjoint mean (checked entry by entry).
    dropped = [k * d * 2.0 for k, d in zip(keep, [D1, D2], strict=True)]
    ties = merge_module(module, [D1, D2], MergeSpec("dare_ties", drop_p=p, seed=seed, scale=3.0))
    for idx in [(r, c) for r in range(2) for c in range(3)]:
        values = [float(d[idx]) for d in dropped]
        sign = (sum(values) > 0) - (sum(values) < 0)
        agree = [v for v in values if v != 0 and (v > 0) - (v < 0) == sign]
        assert ties[idx].item() == pytest.approx(3.0 * (sum(agree) / len(agree) if agree else 0.0))


def test_dare_expectation_is_linear():
    weights = (0.5, 2.0)
    runs = torch.stack(
        [merge_module("m", [D1, D2], MergeSpec("dare", weights=weights, drop_p=0.3, seed=s)) for s in range(2000)]
    )
    linear = merge_module("m", [D1, D2], MergeSpec("linear", weights=weights))
    # Per entry the std of the mean is about |2·D2|·sqrt(p/(1-p))/sqrt(2000) <= 0.12; allow ~4 of them.
    torch.testing.assert_close(runs.mean(0), linear, rtol=0, atol=0.5)
    assert (runs.mean(0) - linear).abs().mean() < 0.1
    assert runs.std(0).min() > 0  # and it is really random


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "slerp"},
        {"method": "ties"},  # density is required
        {"method": "ties", "density": 0.0},
        {"method": "ties", "density": 1.5},
        {"method": "dare", "drop_p": 1.0, "seed": 0},
        {"method": "dare", "drop_p": -0.1, "seed": 0},
        {"method": "dare", "drop_p": 0.5},  # seed is required
        {"method": "linear", "density": 0.5},  # not a linear parameter
        {"method": "ties", "density": 0.5, "weights": (1.0, 1.0)},  # TIES has one scale λ
        {"method": "linear", "weights": (1.0, float("nan"))},
    ],
)
def test_bad_merge_specs_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MergeSpec(**kwargs)


def test_merge_deltas_validates_experts():
    a, b = {"x": D1, "y": D2}, {"x": D2, "y": D3}
    with pytest.raises(ConfigError, match="2 merge weights for 3 experts"):
        merge_deltas([a, b, a], MergeSpec("linear", weights=(1.0, 1.0)))
    with pytest.raises(DataError, match="other modules"):
        merge_deltas([a, {"x": D2}], MergeSpec("linear"), names=["math", "code"])
    with pytest.raises(DataError, match="shape"):
        merge_deltas([a, {"x": D2, "y": D3.T}], MergeSpec("linear"))
    with pytest.raises(ConfigError):
        merge_deltas([], MergeSpec("linear"))
    merged = merge_deltas([a, b], MergeSpec("linear"), dtype=torch.bfloat16)
    assert merged["x"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["y"].float(), ((D2 + D3) / 2).bfloat16().float())


# --- applying merged deltas against PEFT ------------------------------------------------------


def test_single_expert_linear_weight_one_equals_peft(adapter_dirs):
    deltas, _ = merge_adapters({"plain": adapter_dirs["plain"]}, MergeSpec("linear", weights=(1.0,)), base_model="t")
    model = tiny_base()
    apply_deltas(model, deltas)
    reference = PeftModel.from_pretrained(tiny_base(), adapter_dirs["plain"]).eval()
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_linear_on_two_experts_equals_peft_cat(adapter_dirs):
    weights = (0.7, 0.4)  # different ranks and scalings; cat is the exact weighted sum of deltas
    names = ["plain", "patterned"]
    deltas, _ = merge_adapters(
        {n: adapter_dirs[n] for n in names}, MergeSpec("linear", weights=weights), base_model="t"
    )
    peft = PeftModel.from_pretrained(tiny_base(), adapter_dirs["plain"], adapter_name="plain")
    peft.load_adapter(adapter_dirs["patterned"], adapter_name="patterned")
    peft.add_weighted_adapter(names, list(weights), "merged", combination_type="cat")
    peft.set_adapter("merged")
    model = tiny_base()
    with merged_weights(model, deltas):
        torch.testing.assert_close(logits(model), logits(peft.eval()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), tiny_base().state_dict(), rtol=0, atol=0)  # restored exactly


def test_apply_deltas_checks_everything_before_changing_anything(adapter_dirs):
    deltas = lora_deltas(adapter_dirs["plain"])
    module = "model.layers.0.self_attn.k_proj"  # 16 x 32: its transpose is a shape mismatch
    for broken in ({**deltas, "model.layers.9.mlp.up_proj": deltas[module]}, {**deltas, module: deltas[module].T}):
        model = tiny_base()
        with pytest.raises(ConfigError, match="do not fit this model"):
            apply_deltas(model, broken)
        torch.testing.assert_close(model.state_dict(), tiny_base().state_dict(), rtol=0, atol=0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="shared"):
        apply_deltas(tied, {"lm_head": torch.zeros(300, 32)})


def test_apply_deltas_keeps_the_models_dtype():
    model = tiny_base().to(torch.bfloat16)
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    delta = torch.full(w0.shape, 0.25)
    apply_deltas(model, {"model.layers.0.mlp.up_proj": delta})
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, (w0.float() + delta).bfloat16(), rtol=0, atol=0)


# --- artifacts --------------------------------------------------------------------------------


def test_save_load_roundtrip_is_exact_and_records_provenance(tmp_path, adapter_dirs):
    experts = {n: adapter_dirs[n] for n in ADAPTERS}
    spec = MergeSpec("ties", density=0.3, scale=0.8)
    deltas, meta = merge_adapters(experts, spec, base_model="tiny@abc")
    save_merged(tmp_path / "ties", deltas, meta)
    loaded, info = load_merged(tmp_path / "ties")
    assert loaded.keys() == deltas.keys()
    for k, v in deltas.items():
        assert torch.equal(loaded[k], v)
    assert info["method"] == "ties" and info["params"] == {"density": 0.3, "scale": 0.8}
    assert info["base_model"] == "tiny@abc" and info["dtype"] == "float32"
    assert info["experts"] == [{"name": n, "sha256": adapter_hash(p)} for n, p in experts.items()]
    # bfloat16 storage halves the file; the values are the rounded float32 ones.
    save_merged(tmp_path / "bf16", deltas, meta, dtype="bfloat16")
    half, info = load_merged(tmp_path / "bf16")
    assert info["dtype"] == "bfloat16" and all(v.dtype == torch.bfloat16 for v in half.values())
    assert all(torch.equal(half[k], v.bfloat16()) for k, v in deltas.items())
    dare = MergeSpec("dare", drop_p=0.2, seed=3)
    assert merge_adapters(experts, dare, base_model="t")[1]["params"] == {
        "weights": [1 / 3] * 3,
        "drop_p": 0.2,
        "seed": 3,
    }


def test_bad_artifacts_are_data_errors(tmp_path):
    deltas, meta = {"m": D1}, {"method": "linear", "params": {}, "experts": [], "base_model": "t"}
    with pytest.raises(ConfigError, match="base_model"):
        save_merged(tmp_path / "x", deltas, {"method": "linear"})
    with pytest.raises(DataError, match="re-run the merge"):
        load_merged(tmp_path / "missing")
    save_merged(tmp_path / "m", deltas, meta)
    blob = bytearray((tmp_path / "m" / "merged.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "m" / "merged.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="does not match"):
        load_merged(tmp_path / "m")


def test_module_never_imports_lightning():
    code = "import sys, selfmoe.models.merging; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
