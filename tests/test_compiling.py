"""Regional compilation (selfmoe/models/compiling.py) and where the expert phase uses it.

Float32 on CPU, the tiny Llama of conftest (2 layers, every linear adapted, no dropout). Most
tests compile with ``backend="aot_eager"`` (dynamo's tracing and AOTAutograd without inductor's
code generation: seconds); one uses the default inductor backend.
"""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from conftest import make_config, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaForCausalLM

from selfmoe.artifacts import Layout
from selfmoe.config import LINEAR_TARGETS, load_config
from selfmoe.errors import SelfMoEError
from selfmoe.models.base import decoder_layers
from selfmoe.models.compiling import compile_decoder_layers
from selfmoe.models.lora_train import lora_training_model
from selfmoe.phases import expert

CUDA = torch.device("cuda", 0)


def lora() -> LoraConfig:
    # init_lora_weights=False: B is random too, so the adapters act from the first step.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEAR_TARGETS, init_lora_weights=False)


def lora_model(fused: bool = True):
    torch.manual_seed(1)
    return lora_training_model(tiny_llama(), lora(), fused=fused, autocast=False).train()


def compiled(model) -> list[bool]:
    """Per decoder layer: whether ``nn.Module.compile`` was called on it."""
    return [layer._compiled_call_impl is not None for layer in decoder_layers(model)]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def step(model, ids):
    """The loss and every LoRA gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return loss.detach(), grads


def assert_same(got, ref, atol: float) -> None:
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=atol)
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=0, atol=atol, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and leaves no compiled code behind)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# --- compile_decoder_layers --------------------------------------------------------


def test_every_decoder_layer_is_compiled_in_place_with_or_without_peft():
    bare = tiny_llama()
    layers = list(bare.model.layers)
    assert compile_decoder_layers(bare, backend="aot_eager") == 2
    assert list(bare.model.layers) == layers and all(compiled(bare))  # the same modules, not wrappers

    model = lora_model()
    names = list(model.state_dict())
    assert not any(compiled(model))
    assert compile_decoder_layers(model, backend="aot_eager") == 2
    assert all(compiled(model))
    assert list(model.state_dict()) == names  # no ``_orig_mod.`` prefix: checkpoints and adapters unchanged


def test_a_model_without_decoder_layers_is_an_error():
    with pytest.raises(SelfMoEError, match="cannot find its decoder layers"):
        compile_decoder_layers(nn.Sequential(nn.Linear(4, 4)))
    empty = tiny_llama()
    empty.model.layers = nn.ModuleList()
    with pytest.raises(SelfMoEError, match="no decoder layers"):
        compile_decoder_layers(empty)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_layers_give_the_same_loss_and_gradients(fused, ids):
    """Same step in train mode, again at another length and batch size, and in eval mode."""
    eager, model = lora_model(fused), lora_model(fused)
    compile_decoder_layers(model, backend="aot_eager")
    for batch in (ids, ids[:, :17], ids[:1]):
        assert_same(step(model, batch), step(eager, batch), atol=1e-5)
    eager.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_inductor_compiled_layers_give_the_same_loss_and_gradients(ids):
    """The backend the phase uses on a GPU (here its CPU code generation): about 20 s."""
    eager, model = lora_model(), lora_model()
    compile_decoder_layers(model)
    reference = step(eager, ids)
    assert_same(step(model, ids), reference, atol=1e-5)
    assert_same(step(model, ids), reference, atol=1e-5)  # the compiled code, reused


def test_adapter_saved_from_a_compiled_model_is_byte_identical(ids, tmp_path):
    cfg = load_config("expert", ["expert.lora.dropout=0"])
    for name, compile in (("eager", False), ("compiled", True)):
        torch.manual_seed(1)
        model = expert.expert_model(cfg, tiny_llama(), compile=False).train()
        if compile:
            compile_decoder_layers(model, backend="aot_eager")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B trained off zero
        model.save_pretrained(tmp_path / name)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert filecmp.cmp(tmp_path / "eager" / file, tmp_path / "compiled" / file, shallow=False), file


# --- the expert phase --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "device", "expected"),
    [
        ([], "cpu", False),
        (["trainer=gpu"], None, torch.cuda.is_available()),  # the real decision: no CUDA here, no compile
        (["trainer=gpu"], "cuda", True),
        (["trainer=gpu", "expert.compile=false"], "cuda", False),
    ],
)
def test_the_phase_compiles_only_on_a_gpu_and_when_asked(overrides, device, expected, monkeypatch):
    cfg = load_config("expert", overrides)
    if device is not None:
        monkeypatch.setattr(expert, "device_for", lambda cfg: torch.device(device, 0))
    assert expert.compiles(cfg) == expected
    # Compilation is lazy: marking the layers needs no GPU.
    assert compiled(expert.expert_model(cfg, tiny_llama())) == [expected] * 2
    assert compiled(expert.expert_model(cfg, tiny_llama(), compile=True)) == [True] * 2
    assert compiled(expert.expert_model(cfg, tiny_llama(), compile=False)) == [False] * 2


def test_one_compile_serves_every_layer_of_the_phase_model(ids):
    """Four layers, three graphs: the first layer's in training (its input needs no gradient),
    every other layer's in training, and all layers' in evaluation. Without ``use_cache=False``
    each layer would specialize on its own KV-cache slot."""
    config = tiny_llama().config
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    assert base.config.use_cache  # HF's default
    model = expert.expert_model(load_config("expert"), base, compile=False).train()
    assert not base.config.use_cache
    assert compile_decoder_layers(model, backend="aot_eager") == 4
    step(model, ids)
    step(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert counters["stats"]["unique_graphs"] == 3


def test_symbolic_shapes_keep_varying_batches_to_the_same_three_graphs():
    """The phase compiles with ``dynamic=True``: padded widths and a short last batch change the
    shapes at every step, and still the three graphs above serve them all."""
    torch.manual_seed(0)
    model = expert.expert_model(load_config("expert"), tiny_llama(), compile=False).train()
    compile_decoder_layers(model, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(1)
    for batch, width in ((2, 12), (2, 9), (3, 7), (2, 16)):
        step(model, torch.randint(0, 100, (batch, width), generator=gen))
    model.eval()
    with torch.no_grad():
        for batch, width in ((2, 12), (3, 5)):
            model(input_ids=torch.randint(0, 100, (batch, width), generator=gen))
    assert counters["stats"]["unique_graphs"] == 3


def test_the_next_expert_in_the_process_reuses_the_compiled_layers(ids, monkeypatch):
    """`make experts` trains one expert after another in one process: the second model's layers
    match the first model's graphs (the weights are graph inputs), so nothing compiles again."""
    monkeypatch.setattr(
        expert, "compile_decoder_layers", lambda m, **kw: compile_decoder_layers(m, backend="aot_eager", **kw)
    )
    for seed in range(3):
        torch.manual_seed(seed)
        step(expert.expert_model(load_config("expert"), tiny_llama(), compile=True).train(), ids)
        assert counters["stats"]["unique_graphs"] == 2  # the first layer's and the others'


def test_compile_keeps_finished_experts_and_checkpoints_valid():
    from selfmoe.phases.common import artifact_key

    def key(*overrides):
        return artifact_key(load_config("expert", list(overrides)), ("model", "expert", "seed"), data="d")

    assert key() == key("expert.compile=false")


def test_the_phase_trains_and_saves_through_lightning_with_compiled_layers(tmp_path, tiny_outputs, monkeypatch):
    """The whole phase on CPU with the layers compiled (as on a GPU): the same expert as eager."""
    import shutil

    calls = []

    def compile_layers(model, **kwargs):
        assert kwargs == {"dynamic": True}  # what the phase asks for (symbolic shapes: few graphs)
        calls.append(compile_decoder_layers(model, backend="aot_eager", **kwargs))
        return calls[-1]

    adapters = {}
    for name in ("eager", "compiled"):
        out = tmp_path / name
        shutil.copytree(tiny_outputs, out)
        cfg = make_config("expert", out, "domain=math", "expert.epochs=1")
        if name == "compiled":
            monkeypatch.setattr(expert, "device_for", lambda cfg: CUDA)
            monkeypatch.setattr(expert, "compile_decoder_layers", compile_layers)
        target = expert.train_expert(cfg, "math", {"math": Layout.for_model(out, "tiny").data("math")})
        adapters[name] = load_file(target / "adapter_model.safetensors")
        metrics = json.loads((target / "manifest.json").read_text())["metrics"]
        assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert calls == [cfg.tiny.num_layers]
    # Validation's graph, training's for the first layer and for the others (more where a new
    # shape recompiles), all below dynamo's recompile limit: no layer fell back to eager.
    assert 3 <= counters["stats"]["unique_graphs"] < torch._dynamo.config.recompile_limit
    assert adapters["compiled"].keys() == adapters["eager"].keys()
    for key, value in adapters["eager"].items():
        torch.testing.assert_close(adapters["compiled"][key], value, rtol=0, atol=1e-5, msg=key)
