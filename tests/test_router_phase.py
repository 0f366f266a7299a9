"""The router phase end to end on the tiny model: the MiXSE artifact, reloading it, what trained,
skip/ablation/joint runs, and the fail-fast contract of `python -m selfmoe router`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TEST_OVERRIDES, make_config
from safetensors.torch import load_file

from selfmoe.__main__ import main
from selfmoe.artifacts import Layout
from selfmoe.errors import SelfMoEError
from selfmoe.models.base import load_base, model_id
from selfmoe.models.mixse import GatedLoraLinear, adapter_hash, load_mixse
from selfmoe.phases import expert, generate, router

EXPERTS = ["math", "reasoning"]
ARTIFACT_FILES = {"router.safetensors", "mixse.json", "config.yaml", "manifest.json", "routing"}
PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "If all cats are animals, is a cat an animal?",
]


def router_cfg(outputs, *overrides):
    return make_config("router", outputs, "router.experts=[math,reasoning]", *overrides)


class Capture(L.Callback):
    """Keeps the trained in-memory model, to compare with what was saved."""

    def on_fit_end(self, trainer, pl_module):
        self.model = pl_module.model


@pytest.fixture(scope="module")
def experts_outputs(tiny_outputs, tmp_path_factory) -> Path:
    """The tiny base, math + reasoning data and their two experts (tests must not modify it)."""
    out = tmp_path_factory.mktemp("router-phase") / "outputs"
    shutil.copytree(tiny_outputs, out)
    generate.run(make_config("generate", out, "domain=reasoning"))
    layout = Layout.for_model(out, "tiny")
    for domain in EXPERTS:
        expert.train_expert(make_config("expert", out, f"domain={domain}"), domain, {domain: layout.data(domain)})
    return out


def train_router(outputs, *overrides):
    cfg = router_cfg(outputs, *overrides)
    capture = Capture()
    target = router.run(cfg, callbacks=[capture])
    return SimpleNamespace(cfg=cfg, target=target, model=getattr(capture, "model", None))


@pytest.fixture(scope="module")
def trained(experts_outputs):
    """The default MiXSE (learned top-1 router over math + reasoning) and its in-memory model."""
    return train_router(experts_outputs)


def read_json(path: Path):
    return json.loads(path.read_text())


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


def disk_adapters(outputs) -> dict[str, dict[str, torch.Tensor]]:
    layout = Layout.for_model(outputs, "tiny")
    return {d: load_file(layout.expert(d) / "adapter_model.safetensors") for d in EXPERTS}


def stacked_from_disk(adapters, module: str, part: str) -> torch.Tensor:
    """The experts' ``part`` (lora_A / lora_B) of ``module`` concatenated in router.experts order."""
    key = f"base_model.model.{module}.{part}.weight"
    return torch.cat([adapters[d][key] for d in EXPERTS], dim=0 if part == "lora_A" else 1)


def gated_modules(model) -> dict[str, GatedLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoraLinear)}


def assert_base_untouched(model, cfg) -> None:
    """Every non-expert, non-router weight equals a freshly loaded base model's."""
    fresh = load_base(cfg)[0].state_dict()
    mapped = {
        k.replace(".base.", "."): v
        for k, v in model.state_dict().items()
        if not k.startswith("mixse.") and ".lora_" not in k
    }
    assert mapped.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(mapped[key], value), key


def test_artifact_layout_and_metadata(trained, experts_outputs):
    cfg, target = trained.cfg, trained.target
    layout = Layout.for_model(experts_outputs, "tiny")
    assert target == layout.root / "mixse"
    assert {p.name for p in target.iterdir()} == ARTIFACT_FILES
    routing = target / "routing"
    token_views = {f"tokens_{i}.{ext}" for i in range(len(EXPERTS)) for ext in ("html", "png")}
    assert {p.name for p in routing.iterdir()} == {
        "routing.json",
        "routing_domain_matrix.png",
        "routing_layer_load.png",
        *token_views,
    }
    for png in routing.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    meta = read_json(target / "mixse.json")
    manifest = read_json(target / "manifest.json")
    base_id = model_id(cfg)
    assert meta["base_model"] == manifest["base_model"] == base_id
    assert [e["name"] for e in meta["experts"]] == EXPERTS
    for entry in meta["experts"]:
        # Stored relative to the artifact, so a moved outputs/ tree still loads.
        assert (target / entry["path"]).resolve() == layout.expert(entry["name"]).resolve()
        assert entry["sha256"] == adapter_hash(layout.expert(entry["name"]))
    assert meta["router"] == {
        "scope": "shared",
        "input": "layer",
        "top_k": 1,
        "renormalize": False,
        "temperature": 1.0,
        "mode": "learned",
    }
    assert meta["experts_trained"] is False

    # scope=shared: one (N x hidden) router whatever the number of layers.
    weights = load_file(target / "router.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"weight": (1, 2, cfg.tiny.hidden_size)}
    assert manifest["trainable_params"] == cfg.tiny.hidden_size * 2 == 256
    assert manifest["kind"] == "mixse" and manifest["steps"] > 0
    assert manifest["experts"] == {d: str(layout.expert(d)) for d in EXPERTS}

    stats = read_json(routing / "routing.json")
    assert stats, "routing.json holds no stage"
    for stage in stats.values():
        assert stage["experts"] == stage["domains"] == EXPERTS
        assert stage["num_layers"] == cfg.tiny.num_layers
        for row in stage["domain_matrix"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-6)
        for row in stage["layer_load"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-6)


def test_reloaded_artifact_gives_identical_logits(trained):
    cfg = trained.cfg
    base, tokenizer = load_base(cfg)
    reloaded = load_mixse(base, trained.target, base_model=model_id(cfg))
    expected = logits(trained.model, tokenizer)
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, rtol=0, atol=0)
    # The experts do something: the plain base model disagrees.
    assert not torch.allclose(logits(load_base(cfg)[0], tokenizer), expected)


def test_only_the_router_trained(trained, experts_outputs):
    model, cfg = trained.model, trained.cfg
    adapters = disk_adapters(experts_outputs)
    gated = gated_modules(model)
    assert len(gated) == cfg.tiny.num_layers * len(cfg.model.lora_targets)
    scale = cfg.expert.lora.alpha / cfg.expert.lora.r
    for name, module in gated.items():
        assert torch.equal(module.lora_A, stacked_from_disk(adapters, name, "lora_A")), name
        assert torch.equal(module.lora_B, stacked_from_disk(adapters, name, "lora_B")), name
        assert module.column_expert.tolist() == [i for i in range(len(EXPERTS)) for _ in range(cfg.expert.lora.r)]
        assert torch.equal(module.column_scale, torch.full((len(EXPERTS) * cfg.expert.lora.r,), scale))
    assert_base_untouched(model, cfg)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["mixse.router.weight"]

    last = Layout.for_model(experts_outputs, "tiny").run("mixse") / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state and all(k.startswith("model.mixse.router.") for k in state)
    torch.testing.assert_close(
        state["model.mixse.router.weight"], load_file(trained.target / "router.safetensors")["weight"], rtol=0, atol=0
    )


def test_rerun_is_skipped(trained):
    manifest = trained.target / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert router.run(router_cfg(trained.cfg.output_dir)) == trained.target
    assert manifest.stat().st_mtime_ns == stamp


def test_top2_ablation_is_a_separate_artifact(trained, experts_outputs):
    stamp = (trained.target / "manifest.json").stat().st_mtime_ns
    top2 = train_router(experts_outputs, "router.top_k=2", "router.name=mixse-top2")
    assert top2.target == Layout.for_model(experts_outputs, "tiny").root / "mixse-top2"
    assert {p.name for p in top2.target.iterdir()} == ARTIFACT_FILES
    assert read_json(top2.target / "mixse.json")["router"]["top_k"] == 2
    assert read_json(trained.target / "mixse.json")["router"]["top_k"] == 1
    assert (trained.target / "manifest.json").stat().st_mtime_ns == stamp


def test_uniform_mode_writes_an_artifact_without_training(experts_outputs):
    uniform = train_router(experts_outputs, "router.mode=uniform", "router.name=uniform")
    assert uniform.model is None  # fit never ran
    assert {p.name for p in uniform.target.iterdir()} == ARTIFACT_FILES
    manifest = read_json(uniform.target / "manifest.json")
    assert manifest["steps"] == 0 and manifest["trainable_params"] == 0
    assert read_json(uniform.target / "mixse.json")["router"]["mode"] == "uniform"
    stats = read_json(uniform.target / "routing" / "routing.json")
    for row in stats["val"]["domain_matrix"]:
        assert row == pytest.approx([0.5, 0.5])
    run_dir = Layout.for_model(experts_outputs, "tiny").run("uniform")
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_joint_training_changes_and_saves_the_experts(experts_outputs):
    hashes = {d: adapter_hash(Layout.for_model(experts_outputs, "tiny").expert(d)) for d in EXPERTS}
    joint = train_router(experts_outputs, "router.train_experts=true", "router.name=joint")
    cfg, model = joint.cfg, joint.model
    assert {p.name for p in joint.target.iterdir()} == ARTIFACT_FILES | {"experts.safetensors"}
    meta = read_json(joint.target / "mixse.json")
    assert meta["experts_trained"] is True
    # The experts on disk are untouched; their trained copies live in experts.safetensors.
    assert {e["name"]: e["sha256"] for e in meta["experts"]} == hashes
    assert {d: adapter_hash(Layout.for_model(experts_outputs, "tiny").expert(d)) for d in EXPERTS} == hashes

    adapters = disk_adapters(experts_outputs)
    gated = gated_modules(model)
    changed = [
        name for name, m in gated.items() if not torch.equal(m.lora_B, stacked_from_disk(adapters, name, "lora_B"))
    ]
    assert changed, "joint training left every expert weight as it was"
    saved = load_file(joint.target / "experts.safetensors")
    assert saved.keys() == {f"{n}.{p}" for n in gated for p in ("lora_A", "lora_B")}
    for name, module in gated.items():
        assert torch.equal(saved[f"{name}.lora_A"], module.lora_A)
        assert torch.equal(saved[f"{name}.lora_B"], module.lora_B)
    assert_base_untouched(model, cfg)
    lora_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in gated.values())
    assert read_json(joint.target / "manifest.json")["trainable_params"] == 256 + lora_params

    base, tokenizer = load_base(cfg)
    reloaded = load_mixse(base, joint.target, base_model=model_id(cfg))
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, tokenizer), rtol=0, atol=0)


def test_fresh_run_leaves_no_stale_routing_views(experts_outputs):
    before = train_router(experts_outputs, "router.mode=uniform", "router.name=stale")
    assert (before.target / "routing" / "tokens_1.html").is_file()  # one token view per expert's domain
    after = train_router(experts_outputs, "router.mode=uniform", "router.name=stale", "router.experts=[math]")
    assert [e["name"] for e in read_json(after.target / "mixse.json")["experts"]] == ["math"]
    assert {p.name for p in (after.target / "routing").iterdir()} == {
        "routing.json",
        "routing_domain_matrix.png",
        "routing_layer_load.png",
        "tokens_0.html",
        "tokens_0.png",
    }


# ---------------------------------------------------------------------------------------------
# fail fast: one message, exit 2, no MiXSE directory
# ---------------------------------------------------------------------------------------------


def run_main(capsys, outputs, *args: str) -> tuple[int, str]:
    code = main(["router", f"output_dir={outputs}", *TEST_OVERRIDES, *args])
    err = capsys.readouterr().err
    return code, " ".join(err.split())  # rich wraps long lines


def assert_nothing_written(outputs, name: str) -> None:
    layout = Layout.for_model(outputs, "tiny")
    assert not (layout.root / name).exists()
    assert not layout.run(name).exists()
    assert [p for p in outputs.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name] == []


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        (["router.experts=[math,coding]"], ["'coding'", "make expert DOMAIN=coding"]),
        (["router.experts=[]"], ["router.experts is empty"]),
        (["router.experts=[math,reasoning]", "router.top_k=3"], ["router.top_k=3", "(2)"]),
        (["router.experts=[math,reasoning]", "router.mode=fixed:physics"], ["router.mode='fixed:physics'"]),
    ],
    ids=["missing-expert", "no-experts", "top_k-above-N", "unknown-mode"],
)
def test_bad_router_inputs_fail_fast(experts_outputs, capsys, args, messages):
    code, err = run_main(capsys, experts_outputs, *args, "router.name=bad")
    assert code == 2
    for message in messages:
        assert message in err
    assert "Traceback" not in err
    assert_nothing_written(experts_outputs, "bad")
    assert not Layout.for_model(experts_outputs, "tiny").data("coding").exists()  # no data made for nothing


def test_expert_from_another_base_model(experts_outputs, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    shutil.copytree(experts_outputs, outputs, ignore=shutil.ignore_patterns("runs"))
    manifest_path = Layout.for_model(outputs, "tiny").expert("reasoning") / "manifest.json"
    manifest = read_json(manifest_path)
    manifest["base_model"] = "some-org/other-model"
    manifest_path.write_text(json.dumps(manifest))
    code, err = run_main(capsys, outputs, "router.experts=[math,reasoning]", "router.name=bad")
    assert code == 2
    assert "'reasoning'" in err and "'some-org/other-model'" in err
    assert repr(model_id(make_config("router", outputs))) in err
    assert_nothing_written(outputs, "bad")


# ---------------------------------------------------------------------------------------------
# load_mixse refuses what no longer matches
# ---------------------------------------------------------------------------------------------


def test_load_refuses_a_changed_expert(trained, experts_outputs):
    config_path = Layout.for_model(experts_outputs, "tiny").expert("reasoning") / "adapter_config.json"
    original = config_path.read_bytes()
    try:
        config_path.write_text(json.dumps({**json.loads(original), "note": "edited after training"}))
        with pytest.raises(SelfMoEError, match="hash mismatch") as info:
            load_mixse(load_base(trained.cfg)[0], trained.target, base_model=model_id(trained.cfg))
        assert "'reasoning'" in str(info.value)
    finally:
        config_path.write_bytes(original)


def test_load_refuses_another_base_model(trained):
    with pytest.raises(SelfMoEError, match="built on base model") as info:
        load_mixse(load_base(trained.cfg)[0], trained.target, base_model="some-org/other-model")
    assert model_id(trained.cfg) in str(info.value) and "some-org/other-model" in str(info.value)
