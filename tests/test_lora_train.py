"""The lean LoRA training forward (selfmoe/models/lora_train.py) against PEFT itself.

Reference: PEFT 0.21's own ``lora.Linear.forward`` on the same weights. Float32 on CPU unless a
test says otherwise; the tiny Llama of conftest (2 layers, every linear adapted).
"""

from __future__ import annotations

import filecmp

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from selfmoe.config import LINEAR_TARGETS, load_config
from selfmoe.models.lora_train import (
    LeanLoraLinear,
    _PlainLinear,
    autocast_precision,
    lean_layers,
    lora_training_model,
    set_input_cast,
)
from selfmoe.phases import expert

ADAPTED = 2 * len(LINEAR_TARGETS)  # tiny_llama: 2 layers x 7 linears


def lora(dropout: float = 0.0, **extra) -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters change the logits from the start.
    return LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LINEAR_TARGETS, init_lora_weights=False, **extra
    )


def pair(config: LoraConfig, dtype: torch.dtype = torch.float32, *, autocast: bool = False):
    """PEFT stock and the lean model, with identical weights (same seed for base and adapters)."""
    models = []
    for fused in (False, True):
        torch.manual_seed(1)
        models.append(lora_training_model(tiny_llama().to(dtype), config, fused=fused, autocast=autocast).train())
    return models


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def step(model, ids, *, seed: int = 5, autocast: bool = False):
    """Logits and every LoRA gradient of one forward/backward (float32 copies)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * ADAPTED and all("lora_" in n for n in grads)
    return logits.float().detach(), grads


def assert_same(a, b, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=atol, msg=name)


def errors(got, ref) -> tuple[float, float]:
    """Relative L2 errors of a step's logits and of all its gradients together."""
    flat = [torch.cat([g.flatten() for g in r[1].values()]) for r in (got, ref)]
    return tuple(((a - b).norm() / b.norm()).item() for a, b in ((got[0], ref[0]), flat))


# --- installation ------------------------------------------------------------------


def test_every_plain_linear_target_gets_the_lean_layer_and_the_config_stays_plain():
    config = lora()
    stock, lean = pair(config)
    assert len(lean_layers(lean)) == ADAPTED and not lean_layers(stock)
    assert config._custom_modules is None  # the caller's config is not changed
    assert lean.peft_config["default"].to_dict() == stock.peft_config["default"].to_dict()


def test_subclasses_of_linear_keep_peft_dispatch():
    class Quantized(nn.Linear):  # as bitsandbytes' Linear8bitLt subclasses nn.Linear
        pass

    assert isinstance(nn.Linear(2, 2), _PlainLinear)
    assert not isinstance(Quantized(2, 2), _PlainLinear) and not isinstance(nn.Conv1d(2, 2, 1), _PlainLinear)


def test_autocast_precisions():
    assert all(autocast_precision(p) for p in ("bf16-mixed", "16-mixed"))
    assert not any(autocast_precision(p) for p in ("32-true", "bf16-true", "16-true", "64-true"))


# --- float32: equal to PEFT --------------------------------------------------------


def test_no_dropout_logits_and_gradients_equal_peft(ids, monkeypatch):
    stock, lean = pair(lora(0.0))
    reference = step(stock, ids)
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    got = step(lean, ids)
    assert len(calls) == ADAPTED  # the fused epilogue ran in every adapted linear
    assert_same(got, reference, atol=1e-6)
    with torch.no_grad(), stock.disable_adapter():
        assert not torch.allclose(stock(input_ids=ids).logits, reference[0], atol=1e-2)  # the adapters act


def test_dropout_draws_the_same_masks_as_peft(ids):
    """Same order of random draws as PEFT's forward: the same seed gives the same masks."""
    stock, lean = pair(lora(0.05))
    reference = step(stock, ids, seed=5)
    assert_same(step(lean, ids, seed=5), reference, atol=1e-6)
    other = step(stock, ids, seed=6)
    assert not torch.allclose(other[0], reference[0], atol=1e-4)  # dropout acts: another seed, other masks
    # Eval mode switches the adapters' dropout off, as in PEFT.
    stock.eval(), lean.eval()
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["dora", "two_active", "merged", "disabled", "adapter_names", "lora_bias"])
def test_what_the_fast_path_does_not_cover_falls_back_to_peft(case, ids, monkeypatch):
    extra = {"dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}.get(case, {})
    stock, lean = pair(lora(0.0, **extra))
    calls = []
    addmm = torch.addmm
    for model in (stock, lean):
        if case == "two_active":
            torch.manual_seed(2)
            model.add_adapter("other", lora(0.0))
            model.base_model.set_adapter(["default", "other"])
        if case == "merged":
            model.merge_adapter()
        model.eval()

    def logits(model):
        kwargs = {"adapter_names": ["default", "__base__"]} if case == "adapter_names" else {}
        with torch.no_grad():
            if case == "disabled":
                with model.disable_adapter():
                    return model(input_ids=ids).logits
            return model(input_ids=ids, **kwargs).logits

    reference = logits(stock)
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    torch.testing.assert_close(logits(lean), reference, rtol=0, atol=1e-6)
    assert not calls  # PEFT's forward ran, not the fused epilogue


# --- bf16 autocast: PEFT's input cast off ------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_input_cast_off_under_autocast_changes_nothing_without_dropout(fused, ids):
    """bf16 base, float32 adapters (as PEFT makes them), CPU bf16 autocast: the cast is a round trip.

    With it on, PEFT turns the bf16 input into float32 and the autocast GEMM rounds it back to
    the same bf16 values; with it off the GEMM gets them directly. Bitwise the same step.
    """
    torch.manual_seed(1)
    model = lora_training_model(tiny_llama().to(torch.bfloat16), lora(0.0), fused=fused, autocast=False).train()
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    cast_on = step(model, ids, autocast=True)
    set_input_cast(model, False)
    assert all(not m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert_same(step(model, ids, autocast=True), cast_on, atol=0)


def test_bf16_autocast_steps_are_as_accurate_as_peft_stock(ids):
    """The configured training step (lean, cast off) against PEFT stock, both in bf16 autocast.

    Different rounding, not different math: the lean epilogue rounds scale-and-add once where PEFT
    rounds three times, and on CPU, dropout on a bf16 input scales in bf16 where PEFT's float32
    copy scales in float32 (CUDA's fused dropout scales in float32 either way). The masks are the
    same (same draws). So each is held to the float32 step's result with the same bf16 budget:
    the lean step's error is at most 1.5 x PEFT stock's own plus 1e-3.
    """
    for dropout in (0.0, 0.05):
        torch.manual_seed(1)
        fp32 = lora_training_model(tiny_llama(), lora(dropout), fused=False, autocast=False).train()
        reference = step(fp32, ids)
        torch.manual_seed(1)
        stock = get_peft_model(tiny_llama().to(torch.bfloat16), lora(dropout)).train()
        torch.manual_seed(1)
        lean = lora_training_model(tiny_llama().to(torch.bfloat16), lora(dropout), fused=True, autocast=True).train()
        base_err = errors(step(stock, ids, autocast=True), reference)
        lean_err = errors(step(lean, ids, autocast=True), reference)
        assert lean_err[0] <= 1.5 * base_err[0] + 1e-3, (dropout, "logits", lean_err, base_err)
        assert lean_err[1] <= 1.5 * base_err[1] + 1e-3, (dropout, "gradients", lean_err, base_err)
        assert base_err[0] < 0.1 and base_err[1] < 0.2  # bf16 error, not a wrong function


# --- saved adapters ----------------------------------------------------------------


def test_lean_trained_adapter_is_a_plain_peft_adapter(ids, tmp_path):
    """Train a few steps with the lean forward; the saved files equal PEFT stock's for those weights."""
    plain = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=LINEAR_TARGETS)  # PEFT's own init
    torch.manual_seed(1)
    lean = lora_training_model(tiny_llama(), plain, fused=True, autocast=False).train()
    params = [p for p in lean.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        lean(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lean.save_pretrained(tmp_path / "lean")

    # PEFT stock with the same weights writes the same files, byte for byte.
    torch.manual_seed(1)
    stock = get_peft_model(tiny_llama(), plain)
    stock.load_state_dict(lean.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert filecmp.cmp(tmp_path / "lean" / name, tmp_path / "stock" / name, shallow=False), name
    saved = load_file(tmp_path / "lean" / "adapter_model.safetensors")
    assert len(saved) == 2 * ADAPTED and all(".lora_A." in k or ".lora_B." in k for k in saved)

    # Plain PEFT loads it (as lora.Linear) and reproduces the lean model's logits.
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lean"))
    layers = [m for m in reloaded.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == ADAPTED and not lean_layers(reloaded)
    lean.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lean(input_ids=ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(reloaded(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, atol=1e-4)


# --- the expert phase --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "lean", "cast"),
    [
        ([], True, True),  # CPU, 32-true: no autocast, PEFT's cast stays
        (["expert.fused_lora=false"], False, True),
        (["trainer=gpu"], True, False),  # bf16-mixed
        (["trainer=gpu", "expert.fused_lora=false"], False, False),
        (["trainer=gpu", "trainer.precision=bf16-true"], True, True),
    ],
)
def test_expert_phase_model(overrides, lean, cast):
    cfg = load_config("expert", overrides)
    model = expert.expert_model(cfg, tiny_llama())
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == ADAPTED
    assert all(isinstance(m, LeanLoraLinear) == lean for m in layers)
    assert all(m.cast_input_dtype_enabled == cast for m in layers)
    assert model.peft_config["default"].to_dict() == expert.lora_config(cfg).to_dict()


def test_fused_lora_keeps_finished_experts_and_checkpoints_valid():
    """Same function, same masks: switching it neither rebuilds an expert nor discards a run."""
    from selfmoe.phases.common import artifact_key

    def key(*overrides):
        return artifact_key(load_config("expert", list(overrides)), ("model", "expert", "seed"), data="d")

    assert key() == key("expert.fused_lora=false")
    assert key() != key("expert.lora.r=4")
