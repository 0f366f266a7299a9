"""Layered config: every shipped preset loads, typos and bad values fail naming the key, validate() rules."""

from __future__ import annotations

import copy
import functools
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from selfmoe.config import (
    ALL_DOMAINS,
    DEFAULT_CONFIG_DIR,
    LINEAR_TARGETS,
    PHASES,
    Config,
    TrainerConfig,
    available,
    grad_accumulation,
    load_config,
    validate,
    world_size,
)
from selfmoe.data.schema import read_jsonl
from selfmoe.data.seeds import PKG_PREFIX, SEEDS_DIR, load_seeds
from selfmoe.errors import ConfigError

MODELS = available("model")
REAL_MODELS = [m for m in MODELS if m != "tiny"]
DOMAINS = available("domain")
HUB_IDS = {
    "gemma-7b": "google/gemma-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
}


@pytest.fixture(autouse=True)
def _repo_configs(monkeypatch):
    """Every test reads the repository's configs/ unless it points SELFMOE_CONFIG_DIR elsewhere."""
    monkeypatch.delenv("SELFMOE_CONFIG_DIR", raising=False)


@functools.cache
def _load(phase: str, *overrides: str) -> Config:
    """load_config, memoised: it takes ~0.1 s and these tests only read the result."""
    return load_config(phase, list(overrides))


@pytest.fixture(scope="module")
def default_cfg() -> Config:
    return _load("generate")


@pytest.fixture
def config_copy(tmp_path, monkeypatch) -> Path:
    """A writable copy of configs/ that load_config reads."""
    root = tmp_path / "configs"
    shutil.copytree(DEFAULT_CONFIG_DIR, root)
    monkeypatch.setenv("SELFMOE_CONFIG_DIR", str(root))
    return root


def _raises(overrides: list[str], *needles: str, phase: str = "generate") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(phase, overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- every shipped preset loads --------------------------------------------------------------


def test_presets_are_the_expected_set():
    assert set(MODELS) == {"tiny", *HUB_IDS}
    assert set(available("trainer")) == {"cpu", "gpu", "ddp"}
    assert set(DOMAINS) == {"coding", "knowledge", "math", "reasoning"}
    assert set(available("phase")) == set(PHASES)


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_loads_with_single_device_trainers(model, trainer):
    cfg = _load("generate", f"model={model}", f"trainer={trainer}")
    assert cfg.model.name == model
    assert cfg.trainer.accelerator == trainer
    assert cfg.trainer.devices == 1
    assert cfg.trainer.precision == ("32-true" if trainer == "cpu" else "bf16-mixed")
    # 32 / (4 x 1) for the real models, 8 / (4 x 1) for tiny.
    assert grad_accumulation(cfg) == (2 if model == "tiny" else 8)


@pytest.mark.parametrize("model", REAL_MODELS)
def test_ddp_with_every_real_model(model):
    cfg = _load("expert", f"model={model}", "trainer=ddp")
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 8, 1)
    assert world_size(cfg.trainer) == 8
    assert grad_accumulation(cfg) == 1  # 32 = 4 x 8 x 1


def test_ddp_with_tiny_cannot_split_its_global_batch():
    # tiny: global batch 8, micro batch 4, 8 devices -> 8 % 32 != 0.
    _raises(["model=tiny", "trainer=ddp"], "expert.global_batch_size=8", "4 x 8")


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_loads(phase):
    cfg = load_config(phase)
    assert cfg.phase == phase
    assert cfg.model.name == "tiny" and cfg.trainer.accelerator == "cpu"  # base.yaml's defaults


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_files(name, default_cfg):
    raw = yaml.safe_load((DEFAULT_CONFIG_DIR / "domain" / f"{name}.yaml").read_text())
    assert raw["name"] == name
    dom = default_cfg.domains[name]
    assert dom.name == name
    assert dom.eval_tasks and all(t.task for t in dom.eval_tasks)
    assert dom.brainstorm.header.strip() and dom.brainstorm.requirements and dom.response_system.strip()
    for pattern in (dom.checks.instruction_pattern, dom.checks.response_pattern):
        if pattern is not None:
            re.compile(pattern, re.S)
    local = dom.seeds.local.path
    assert local is not None and local.startswith(PKG_PREFIX + "seeds/")
    seed_file = SEEDS_DIR / local[len(PKG_PREFIX + "seeds/") :]
    assert seed_file == DEFAULT_CONFIG_DIR.parent / "selfmoe" / "data" / "seeds" / f"{name}.jsonl"
    assert seed_file.is_file() and seed_file.read_text().strip()
    # The library resolves pkg:// to that same file.
    loaded = load_seeds(name, dom.seeds.local, count=10_000, seed=0)
    assert sorted(e.id for e in loaded) == sorted(e.id for e in read_jsonl(seed_file))
    assert dom.seeds.hub.path  # the paper's source is named too


def test_domain_patterns_match_their_own_seeds(default_cfg):
    """A shipped seed passes its domain's format checks (otherwise every generated item would fail them)."""
    for name, dom in default_cfg.domains.items():
        for ex in read_jsonl(SEEDS_DIR / f"{name}.jsonl"):
            if dom.checks.instruction_pattern:
                assert re.search(dom.checks.instruction_pattern, ex.instruction, re.S), (name, ex.id)
            if dom.checks.response_pattern:
                assert re.search(dom.checks.response_pattern, ex.output, re.S), (name, ex.id)


# --- real model presets -------------------------------------------------------------------


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_model_presets(model):
    cfg = _load("generate", f"model={model}", "trainer=cpu")
    m = cfg.model
    assert m.path == HUB_IDS[model]
    assert m.dtype == "bfloat16"
    assert m.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert m.lora_targets == LINEAR_TARGETS
    assert m.max_length == 1024
    assert m.template == ("chat" if model.endswith("instruct") else "alpaca")
    # The real models keep base.yaml's generation volume (only tiny shrinks it).
    assert cfg.data.num_examples is None
    assert cfg.data.max_new_tokens_brainstorm == 512


# --- typos and bad types -------------------------------------------------------------------


def test_typo_in_override_names_the_key():
    message = _raises(["data.batchsize=3"], "data.batchsize")
    assert "batch_size" in message  # the suggestion


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("expert.lora.r=x", "expert.lora.r"),
        ("expert.lr=fast", "expert.lr"),
        ("expert.fused_lora=maybe", "expert.fused_lora"),
        ("force=maybe", "force"),
        ("eval.cuda_graphs=maybe", "eval.cuda_graphs"),
    ],
)
def test_bad_type_names_the_key(override, key):
    _raises([override], repr(key))


def test_unknown_top_level_key():
    _raises(["bogus=1"], "'bogus'")


def test_override_without_equals():
    _raises(["domain"], "'domain'", "key=value")


def test_unknown_domain_lists_the_available_ones():
    message = _raises(["domain=physics"], "'physics'")
    for name in DOMAINS:
        assert name in message
    assert ALL_DOMAINS in message


@pytest.mark.parametrize("kind", ["model", "trainer"])
def test_unknown_preset_lists_the_available_ones(kind):
    message = _raises([f"{kind}=nope"], f"unknown {kind} 'nope'")
    for name in available(kind):
        assert name in message


# --- broken files ------------------------------------------------------------------------


def test_malformed_yaml_names_the_file(config_copy):
    path = config_copy / "model" / "tiny.yaml"
    path.write_text("model:\n  name: [tiny\n")
    message = _raises([], "malformed YAML")
    assert str(path) in message


def test_non_mapping_layer_names_the_file(config_copy):
    path = config_copy / "phase" / "expert.yaml"
    path.write_text("- a\n- b\n")
    _raises([], str(path), "mapping", phase="expert")


def test_unknown_key_in_layer_file_names_file_and_key(config_copy):
    path = config_copy / "trainer" / "cpu.yaml"
    path.write_text(path.read_text().replace("accelerator:", "acelerator:"))
    _raises([], "configs/trainer/cpu.yaml", "trainer.acelerator")


def test_unknown_key_in_domain_file_names_file_and_key(config_copy):
    path = config_copy / "domain" / "math.yaml"
    path.write_text(path.read_text() + "num_exemples: 3\n")
    _raises([], "configs/domain/math.yaml", "domains.math.num_exemples")


def test_domain_name_must_match_file(config_copy):
    path = config_copy / "domain" / "math.yaml"
    path.write_text(path.read_text().replace("name: math", "name: maths"))
    _raises([], "configs/domain/math.yaml", "'maths'")


# --- validate(): one failing case per cross-field rule ---------------------------------------


def _with(cfg: Config, dotted: str, value) -> Config:
    """A deep copy of ``cfg`` with one field set (``domains.math.seeds.count`` style path)."""
    out = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    setattr(node, last, value)
    return out


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("data.rouge_threshold", 0.0, "data.rouge_threshold"),
        ("data.rouge_threshold", 1.5, "data.rouge_threshold"),
        ("data.val_fraction", 1.0, "data.val_fraction"),
        ("data.val_fraction", -0.1, "data.val_fraction"),
        ("data.seed_source", "bogus", "data.seed_source='bogus'"),
        ("data.on_bad_line", "ignore", "data.on_bad_line='ignore'"),
        ("data.batch_size", 0, "data.batch_size"),
        ("data.temperature", 0.0, "data.temperature"),
        ("data.top_p", 0.0, "data.top_p"),
        ("data.top_p", 1.5, "data.top_p"),
        ("data.num_examples", 0, "data.num_examples"),
        ("data.max_new_tokens_brainstorm", 0, "data.max_new_tokens_brainstorm"),
        ("data.max_new_tokens_response", 0, "data.max_new_tokens_response"),
        ("data.max_prompt_tokens", 0, "data.max_prompt_tokens"),
        ("trainer.logger", "bogus", "trainer.logger='bogus'"),
        ("model.dtype", "int8", "model.dtype='int8'"),
        ("model.template", "vicuna", "model.template='vicuna'"),
        ("model.lora_targets", [], "model.lora_targets"),
        ("expert.lora.r", 0, "expert.lora.r"),
        ("expert.lora.alpha", 0, "expert.lora.alpha"),
        ("expert.lora.dropout", 1.0, "expert.lora.dropout"),
        ("expert.lr", 0.0, "expert.lr"),
        ("expert.epochs", 0, "expert.epochs"),
        ("expert.warmup_ratio", 1.0, "expert.warmup_ratio"),
        ("expert.global_batch_size", 10, "expert.global_batch_size=10"),  # tiny: micro 4 x world 1
        ("domain", "physics", "'physics'"),
        ("domains.math.num_examples", 0, "domains.math.num_examples"),
        ("domains.math.seeds.count", 0, "domains.math.seeds.count"),
        ("domains.math.name", "algebra", "'algebra'"),
        ("eval.cuda_graphs", "yes", "eval.cuda_graphs='yes'"),
    ],
)
def test_validate_rules(default_cfg, key, value, needle):
    validate(default_cfg)  # the loaded default is valid
    with pytest.raises(ConfigError) as info:
        validate(_with(default_cfg, key, value))
    assert needle in str(info.value)


def test_validate_rules_through_the_command_line():
    _raises(["data.rouge_threshold=0"], "data.rouge_threshold=0.0")
    _raises(["data.val_fraction=1"], "data.val_fraction=1.0")


def test_validate_accepts_the_boundaries():
    cfg = load_config("generate", ["data.rouge_threshold=1", "data.val_fraction=0", "data.top_p=1"])
    assert (cfg.data.rouge_threshold, cfg.data.val_fraction, cfg.data.top_p) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize("key", ["trainer.devices", "trainer.num_nodes", "expert.micro_batch_size"])
def test_zero_devices_or_micro_batch_is_a_config_error(default_cfg, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(_with(default_cfg, key, 0))


@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_global_batch_is_a_config_error(default_cfg, value):
    with pytest.raises(ConfigError, match=r"expert\.global_batch_size"):
        validate(_with(default_cfg, "expert.global_batch_size", value))


# --- world size and accumulation ------------------------------------------------------------


def test_grad_accumulation_from_world_size(default_cfg):
    two = replace(
        default_cfg,
        expert=replace(default_cfg.expert, global_batch_size=32, micro_batch_size=4),
        trainer=TrainerConfig(devices=2),
    )
    assert world_size(two.trainer) == 2
    assert grad_accumulation(two) == 4  # 32 / (4 x 2)
    four = replace(two, trainer=TrainerConfig(devices=2, num_nodes=2))
    assert world_size(four.trainer) == 4
    assert grad_accumulation(four) == 2  # 32 / (4 x 2 x 2)


def test_grad_accumulation_through_overrides():
    cfg = load_config(
        "expert",
        ["model=gemma-7b", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2", "expert.micro_batch_size=2"],
    )
    assert grad_accumulation(cfg) == 4  # 32 / (2 x 2 x 2)
    assert cfg.expert.micro_batch_size * world_size(cfg.trainer) * grad_accumulation(cfg) == 32


# --- layering order ------------------------------------------------------------------------


def test_layering_order():
    base = yaml.safe_load((DEFAULT_CONFIG_DIR / "base.yaml").read_text())
    assert "num_examples" not in base["data"]
    assert base["expert"]["global_batch_size"] == 32 and base["data"]["val_fraction"] == 0.05
    tiny = _load("generate", "model=tiny", "trainer=cpu")
    assert tiny.data.num_examples == 48  # the model preset wins over base (null)
    assert tiny.expert.global_batch_size == 8 and tiny.data.val_fraction == 0.15
    assert tiny.data.batch_size == 16 and tiny.expert.lr == 3.0e-4  # base keys the preset leaves alone
    real = _load("generate", "model=gemma-7b", "trainer=cpu")
    assert real.data.num_examples is None and real.expert.global_batch_size == 32
    cli = load_config("generate", ["data.num_examples=7", "model=tiny", "expert.global_batch_size=16"])
    assert cli.data.num_examples == 7 and cli.expert.global_batch_size == 16  # CLI wins, whatever the order
    trainer_over = load_config("generate", ["trainer=gpu", "trainer.precision=32-true"])
    assert trainer_over.trainer.accelerator == "gpu" and trainer_over.trainer.precision == "32-true"


def test_domain_all(default_cfg):
    cfg = _load("expert", "domain=all")
    assert cfg.domain_names == sorted(DOMAINS)
    assert default_cfg.domain_names == ["math"]


# --- adding a domain -----------------------------------------------------------------------


def test_adding_a_domain_is_adding_a_file(config_copy):
    with pytest.raises(ConfigError, match="physics"):
        load_config("generate", ["domain=physics"])
    (config_copy / "domain" / "physics.yaml").write_text(
        "name: physics\n"
        "description: mechanics problems\n"
        "seeds:\n"
        "  local: {path: /data/physics.jsonl}\n"
        "brainstorm:\n"
        "  header: Write physics problems.\n"
        "eval_tasks:\n"
        "  - {task: mmlu_college_physics}\n"
    )
    cfg = load_config("generate", ["domain=physics"])
    assert cfg.domain_names == ["physics"]
    dom = cfg.domains["physics"]
    assert dom.seeds.local.path == "/data/physics.jsonl"
    assert dom.brainstorm.header == "Write physics problems."
    assert dom.eval_tasks[0].task == "mmlu_college_physics" and dom.eval_tasks[0].num_fewshot == 0
    assert dom.num_examples == 5000 and dom.checks.min_instruction_words == 3  # schema defaults
    assert set(cfg.domains) == {*DOMAINS, "physics"}
    assert load_config("generate", ["domain=all"]).domain_names == sorted([*DOMAINS, "physics"])


def test_cuda_graphs_is_off_by_default_and_can_be_switched_on():
    assert load_config("eval", []).eval.cuda_graphs is False
    assert load_config("eval", ["eval.cuda_graphs=true"]).eval.cuda_graphs is True
