"""Typed configuration: one dataclass schema, layered YAML files and ``key=value`` overrides.

Layers, later wins::

    configs/base.yaml
    configs/trainer/<trainer>.yaml     (selected by ``trainer=<name>``, default from base.yaml)
    configs/model/<model>.yaml         (selected by ``model=<name>``)
    configs/phase/<phase>.yaml         (the CLI verb)
    key=value overrides from the command line

Every layer file is a partial *root* config, so a model preset may also adjust other sections
(the tiny model shrinks the generation volume). Domain files ``configs/domain/<name>.yaml`` each
hold one :class:`DomainConfig` and are all loaded under ``domains.<name>``: adding a domain is
adding a file. Unknown keys and values of the wrong type fail at load time with the key named;
cross-field checks live in :func:`validate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from selfmoe.errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PHASES = ("generate", "expert", "router", "merge", "eval", "report", "experiment")
ALL_DOMAINS = "all"  # the union of every domain: the instance-merging baseline
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = "tiny"  # slug: outputs/<name>/...
    path: str = "tiny"  # hub id, local directory, or "tiny" (built in)
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    template: str = "alpaca"  # alpaca | chat (the tokenizer's chat template)
    max_length: int = 1024
    lora_targets: list[str] = field(default_factory=lambda: list(LINEAR_TARGETS))
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: selfmoe_sdpa (sdpa without GQA K/V copies); else any HF name


@dataclass
class TinyConfig:
    """Shape and pretraining of the built-in smoke-scale model (used when model.path == 'tiny')."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position: int = 4096
    pretrain_steps: int = 250
    pretrain_batch_size: int = 4
    pretrain_seq_len: int = 1024  # long enough to see a whole brainstorming prompt
    pretrain_lr: float = 3e-3
    seed: int = 0


@dataclass
class SeedSourceConfig:
    path: str | None = None  # hub dataset id, local file/dir, or pkg://seeds/<file>
    name: str | None = None  # HF dataset config
    split: str = "train"
    format: str = "plain"  # plain | mmlu | bbh | gsm8k | mbpp
    fields: dict[str, str] = field(default_factory=dict)  # role -> source column
    subsets: list[str] = field(default_factory=list)  # e.g. BBH tasks


@dataclass
class SeedsConfig:
    hub: SeedSourceConfig = field(default_factory=SeedSourceConfig)  # the paper's source
    local: SeedSourceConfig = field(default_factory=SeedSourceConfig)  # shipped, offline
    count: int = 100


@dataclass
class BrainstormConfig:
    header: str = ""
    requirements: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)


@dataclass
class ChecksConfig:
    """Length and format checks on generated items (regexes are searched with re.S)."""

    min_instruction_words: int = 3
    max_instruction_words: int = 300
    instruction_pattern: str | None = None
    min_response_words: int = 1
    max_response_words: int = 1000
    response_pattern: str | None = None


@dataclass
class EvalTaskConfig:
    task: str = ""
    num_fewshot: int = 0
    metric: str | None = None  # lm-eval's "metric,filter" key for tables; null: the task's first metric


@dataclass
class DomainConfig:
    name: str = ""
    description: str = ""
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    brainstorm: BrainstormConfig = field(default_factory=BrainstormConfig)
    response_system: str = ""
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    num_examples: int = 5000
    eval_tasks: list[EvalTaskConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    """Self-generation (`generate` phase) settings shared by all domains."""

    seed_source: str = "local"  # local (shipped seeds) | hub (the paper's datasets)
    source: str = "generated"  # generated (self-generation) | seeds (the seed-only control, Table 8)
    num_examples: int | None = None  # overrides every domain's num_examples
    batch_size: int = 16
    brainstorm_demos: int = 3
    response_demos: int = 5
    temperature: float = 1.0
    top_p: float = 0.98
    max_new_tokens_brainstorm: int = 512
    max_new_tokens_response: int = 512
    max_prompt_tokens: int = 2048  # longer prompts get fewer demonstrations
    context_length: int | None = None  # prompt + new tokens must fit; null: the model's max_position_embeddings
    overlong: str = "skip"  # skip | truncate (keep the end): prompts that do not fit the context even so
    brainstorm_batches_per_round: int = 1  # batches per brainstorming round: >= GPUs keeps every rank busy
    max_brainstorm_batches: int | None = None  # cap on brainstorming batches (default: 20x the minimum)
    max_idle_batches: int = 5  # give up after this many batches in a row that add no instruction
    rouge_threshold: float = 0.7
    val_fraction: float = 0.05
    on_bad_line: str = "error"  # error | skip (broken lines in seed/data jsonl)
    # On a GPU, the decode step is compiled with torch.compile before its CUDA graph is captured
    # (fused norms, rotary and activations; docs/performance.md E5). It costs a compile per new
    # batch or cache shape (about a minute for an 8B model), so it pays off over long runs.
    compile: bool = True


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05


@dataclass
class OptimConfig:
    """Optimisation of a training phase; the global batch is the same at any world size."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 3
    global_batch_size: int = 32
    micro_batch_size: int = 4
    val_check_interval: float = 1.0
    checkpoint_every_n_steps: int = 0  # 0: at every epoch end only
    num_workers: int = 0


@dataclass
class TrainConfig(OptimConfig):
    """Expert (LoRA) training: PAPER.md §1.2."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    # LoRA's scale-and-add inside the expand GEMM (selfmoe/models/lora_train.py): the same
    # function as PEFT's forward with fewer passes over the output; false: PEFT's own forward.
    fused_lora: bool = True
    # On a GPU, every decoder layer is compiled with torch.compile (regional compilation: one
    # compile shared by all layers); docs/performance.md E3. Same function up to rounding.
    compile: bool = True


DEFAULT_EXPERTS = ["knowledge", "reasoning", "math", "coding"]  # the paper's order (expert-count sweep)


@dataclass
class RouterConfig(OptimConfig):
    """MiXSE and its router phase (PAPER §1.3). Only the router is trained unless train_experts."""

    name: str = "mixse"  # outputs/<model>/<name>/: give ablations their own name
    experts: list[str] = field(default_factory=lambda: list(DEFAULT_EXPERTS))
    scope: str = "shared"  # shared (paper) | per_layer
    input: str = "layer"  # layer (one pass, KV cache) | final_hidden (X-LoRA reading)
    top_k: int | None = 1  # null: every expert (dense softmax)
    renormalize: bool = False  # the paper keeps top-k probabilities as they are
    temperature: float = 1.0
    mode: str = "learned"  # learned | random | uniform | fixed:<expert>
    aux_loss_coef: float = 0.0  # load-balancing loss (padding ignored); not in the paper
    train_experts: bool = False  # true: the "joint router + experts" ablation
    balance: bool = True  # downsample the union to equal examples per domain
    lr: float = 1e-3  # unpublished
    epochs: int = 1  # unpublished


MERGE_METHODS = ("linear", "ties", "dare", "dare_ties")


@dataclass
class MergeConfig:
    """Weight merging of the experts in ΔW space (PAPER §1.4; the paper leaves settings unpublished)."""

    methods: list[str] = field(default_factory=lambda: ["ties", "dare"])  # what `make baselines` builds
    experts: list[str] | None = None  # null: router.experts
    weights: list[float] | None = None  # linear, dare: λ_i per expert; null: 1/N
    density: float = 0.2  # ties: share of each ΔW kept by magnitude (the TIES paper's k = 20 %)
    drop_rate: float = 0.9  # dare, dare_ties: drop probability p (survivors are rescaled by 1/(1-p))
    scale: float = 1.0  # ties, dare_ties: λ on the disjoint mean
    dtype: str = "float32"  # of the saved ΔW: float32 | bfloat16 | float16


@dataclass
class EvalConfig:
    """Evaluation through lm-eval (PAPER §2): which targets, which suite, how."""

    suite: str = "paper"
    scale: str = "full"  # full | smoke (every suite becomes `smoke`: the tiny model's setting)
    suites: dict[str, list[EvalTaskConfig]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    limit: float | None = None  # per task: a count, or a fraction below 1
    batch_size: int = 8
    max_length: int | None = None  # null: model.max_length
    seeds: list[int] = field(default_factory=lambda: [1234])  # few-shot draws; several give mean ± std
    confirm_run_unsafe_code: bool = False  # with HF_ALLOW_CODE_EVAL=1: allow code-executing tasks
    include_paths: list[str] = field(default_factory=list)  # extra lm-eval task dirs (local mirrors)
    routing_docs: int = 32  # docs per task in MiXSE's routing pass (0: off)
    log_samples: bool = True
    cuda_graphs: bool = False  # on a GPU: loglikelihood scoring replays CUDA graphs (selfmoe/models/graphed.py)


@dataclass
class ExperimentRow:
    """One method of a paper table (or one point of a figure): a target built under overrides."""

    label: str = ""
    target: str = "base"
    overrides: list[str] = field(default_factory=list)
    smoke_overrides: list[str] = field(default_factory=list)  # added at eval.scale=smoke
    series: str | None = None  # line plots: the curve this point belongs to
    x: float | None = None


@dataclass
class ExperimentConfig:
    """A paper table or figure (configs/experiment/<name>.yaml, selected by `experiment=<name>`)."""

    name: str = ""
    title: str = ""
    kind: str = "table"  # table | line
    suite: str | None = None  # null: eval.suite
    seeds: list[int] | None = None  # null: eval.seeds
    x_label: str = ""
    rows: list[ExperimentRow] = field(default_factory=list)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    logger: str = "csv"  # csv | tensorboard | wandb | none
    wandb_project: str = "selfmoe"
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    progress_bar: bool = True
    deterministic: bool = False


@dataclass
class Config:
    phase: str = "generate"
    domain: str = "math"
    output_dir: str = "outputs"
    seed: int = 0
    force: bool = False  # redo a phase whose artifact already exists
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    expert: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    domains: dict[str, DomainConfig] = field(default_factory=dict)

    @property
    def domain_names(self) -> list[str]:
        """The domain(s) this run works on: one, or every configured domain for ``all``."""
        return sorted(self.domains) if self.domain == ALL_DOMAINS else [self.domain]


SELECTORS = ("model", "trainer", "experiment")  # `model=gemma-7b` picks a file; `model.dtype=...` sets a field


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc}). Fix or restore the file.") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML{_yaml_problem(exc)}. Fix the file's syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """ " at line 3, column 9: expected ',' or ']' (while parsing a flow sequence)": one line, 1-based."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def config_dir() -> Path:
    """The configs/ tree: ``$SELFMOE_CONFIG_DIR`` or the one in this repository."""
    return Path(os.environ.get("SELFMOE_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def available(kind: str) -> list[str]:
    """Names of the preset files under configs/<kind>/."""
    return sorted(p.stem for p in (config_dir() / kind).glob("*.yaml"))


def _layer(kind: str, name: str) -> dict[str, Any]:
    path = config_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} {name!r}: no {path}. Available: {', '.join(available(kind))}.")
    return _read_yaml(path)


def _merge(schema: DictConfig, layer: dict[str, Any] | DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        reason = str(exc).splitlines()[0]
        unknown = isinstance(exc, ConfigKeyError)
        fix = "remove it or correct its name" if unknown else "give it a value of the type the schema expects"
        what = f"unknown key {key!r}" if unknown else (f"invalid value for {key!r}" if key else "invalid value")
        end = "" if reason.endswith((".", "?")) else "."
        raise ConfigError(
            f"{where}: {what}: {reason}{end} Fix: {fix} "
            "(`python -m selfmoe config <phase>` prints every key with its current value)."
        ) from None


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    selected: dict[str, str] = {}
    rest: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. `domain=math` or `expert.lr=1e-4`).")
        key, value = item.split("=", 1)
        if key in SELECTORS:
            selected[key] = value
        else:
            rest.append(item)
    return selected, rest


def load_config(phase: str, overrides: list[str] | None = None) -> Config:
    """Compose the config for ``phase`` from the layered YAML files and ``key=value`` overrides."""
    selected, dotted = _parse_overrides(list(overrides or []))
    base = _read_yaml(config_dir() / "base.yaml")
    defaults = base.pop("defaults", {}) or {}
    cfg = OmegaConf.structured(Config)
    cfg = _merge(cfg, base, "configs/base.yaml")
    for kind in ("trainer", "model", "experiment"):
        name = selected.get(kind, defaults.get(kind))
        if name:
            cfg = _merge(cfg, _layer(kind, name), f"configs/{kind}/{name}.yaml")
    for name in available("domain"):
        cfg = _merge(cfg, {"domains": {name: _layer("domain", name)}}, f"configs/domain/{name}.yaml")
    if (config_dir() / "phase" / f"{phase}.yaml").is_file():
        cfg = _merge(cfg, _layer("phase", phase), f"configs/phase/{phase}.yaml")
    cfg.phase = phase
    return _finish(cfg, dotted, "command line")


def _finish(cfg: DictConfig, dotted: list[str], where: str) -> Config:
    """``cfg`` with dotted ``key=value`` overrides merged in, as a validated :class:`Config`."""
    try:
        cli = OmegaConf.from_dotlist(dotted)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {dotted}: {exc}") from None
    cfg = _merge(cfg, cli, where)
    try:
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {str(exc).splitlines()[0]}") from None
    validate(obj)
    return obj


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure names the key and the fix."""
    known = sorted(cfg.domains)
    _check(
        cfg.domain == ALL_DOMAINS or cfg.domain in cfg.domains,
        f"unknown domain {cfg.domain!r}: choose one of {known} or {ALL_DOMAINS!r}, "
        "or add configs/domain/<name>.yaml (see README, 'Adding a domain').",
    )
    for name, dom in cfg.domains.items():
        _check(dom.name == name, f"configs/domain/{name}.yaml: name {dom.name!r} must equal the file name {name!r}.")
        _check(dom.num_examples > 0, f"domains.{name}.num_examples must be > 0.")
        _check(dom.seeds.count > 0, f"domains.{name}.seeds.count must be > 0.")
    _check(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype!r}: use float32, bfloat16 or float16.",
    )
    _check(cfg.model.template in ("alpaca", "chat"), f"model.template={cfg.model.template!r}: use alpaca or chat.")
    _check(bool(cfg.model.lora_targets), "model.lora_targets is empty: name the linear modules to adapt.")
    d = cfg.data
    _check(d.seed_source in ("local", "hub"), f"data.seed_source={d.seed_source!r}: use local or hub.")
    _check(d.on_bad_line in ("error", "skip"), f"data.on_bad_line={d.on_bad_line!r}: use error or skip.")
    _check(0.0 < d.rouge_threshold <= 1.0, f"data.rouge_threshold={d.rouge_threshold}: must be in (0, 1].")
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in [0, 1).")
    _check(d.batch_size > 0, "data.batch_size must be > 0.")
    _check(d.source in ("generated", "seeds"), f"data.source={d.source!r}: use generated or seeds.")
    _check(d.overlong in ("skip", "truncate"), f"data.overlong={d.overlong!r}: use skip or truncate.")
    _check(d.brainstorm_batches_per_round > 0, "data.brainstorm_batches_per_round must be > 0.")
    _check(d.context_length is None or d.context_length > 0, "data.context_length must be > 0 (or null).")
    _check(d.temperature > 0 and 0 < d.top_p <= 1, "data.temperature must be > 0 and data.top_p in (0, 1].")
    _check(d.num_examples is None or d.num_examples > 0, "data.num_examples must be > 0 (or null).")
    _check(
        min(d.max_new_tokens_brainstorm, d.max_new_tokens_response, d.max_prompt_tokens) > 0,
        "data.max_new_tokens_brainstorm, data.max_new_tokens_response and data.max_prompt_tokens must be > 0.",
    )
    _check(min(d.brainstorm_demos, d.response_demos) > 0, "data.brainstorm_demos and data.response_demos must be > 0.")
    _check(
        d.max_brainstorm_batches is None or d.max_brainstorm_batches > 0, "data.max_brainstorm_batches: > 0 or null."
    )
    t = cfg.trainer
    _check(
        t.logger in ("csv", "tensorboard", "wandb", "none"),
        f"trainer.logger={t.logger!r}: use csv, tensorboard, wandb or none.",
    )
    _check(t.devices > 0 and t.num_nodes > 0, "trainer.devices and trainer.num_nodes must be > 0.")
    e = cfg.expert
    _check(e.lora.r > 0 and e.lora.alpha > 0, "expert.lora.r and expert.lora.alpha must be > 0.")
    _check(0.0 <= e.lora.dropout < 1.0, "expert.lora.dropout must be in [0, 1).")
    for section in ("expert", "router"):
        _validate_optim(getattr(cfg, section), section, world_size(t))
    _validate_router(cfg)
    _validate_merge(cfg)
    _validate_eval(cfg)


def _validate_optim(o: OptimConfig, section: str, world: int) -> None:
    _check(o.lr > 0 and o.epochs > 0, f"{section}.lr and {section}.epochs must be > 0.")
    _check(0.0 <= o.warmup_ratio < 1.0, f"{section}.warmup_ratio must be in [0, 1).")
    _check(
        o.global_batch_size > 0 and o.micro_batch_size > 0,
        f"{section}.global_batch_size and {section}.micro_batch_size must be > 0.",
    )
    _check(
        o.global_batch_size % (o.micro_batch_size * world) == 0,
        f"{section}.global_batch_size={o.global_batch_size} must be a multiple of micro_batch_size x world size "
        f"= {o.micro_batch_size} x {world}; change {section}.micro_batch_size or the device count.",
    )


def _validate_router(cfg: Config) -> None:
    r = cfg.router
    _check(bool(r.experts), "router.experts is empty: name the domains whose experts MiXSE composes (N >= 1).")
    unknown = [d for d in r.experts if d not in cfg.domains]
    _check(not unknown, f"router.experts: unknown domain(s) {unknown}; known: {sorted(cfg.domains)}.")
    _check(len(set(r.experts)) == len(r.experts), f"router.experts lists a domain twice: {r.experts}.")
    n = len(r.experts)
    _check(
        r.top_k is None or 1 <= r.top_k <= n,
        f"router.top_k={r.top_k} must be between 1 and the number of experts ({n}), or null for all of them.",
    )
    _check(r.scope in ("shared", "per_layer"), f"router.scope={r.scope!r}: use shared or per_layer.")
    _check(r.input in ("layer", "final_hidden"), f"router.input={r.input!r}: use layer or final_hidden.")
    fixed = r.mode.split(":", 1)[1] if r.mode.startswith("fixed:") else None
    _check(
        r.mode in ("learned", "random", "uniform") or fixed in r.experts,
        f"router.mode={r.mode!r}: use learned, random, uniform or fixed:<expert> with one of {r.experts}.",
    )
    _check(r.temperature > 0, "router.temperature must be > 0.")
    _check(r.aux_loss_coef >= 0, "router.aux_loss_coef must be >= 0.")
    _check(r.name.strip() and "/" not in r.name, f"router.name={r.name!r}: a plain directory name, e.g. mixse-top2.")


def world_size(trainer: TrainerConfig) -> int:
    return trainer.devices * trainer.num_nodes


def optim_section(cfg: Config) -> OptimConfig:
    """The optimisation settings of the phase being run (the router's, or the experts')."""
    return cfg.router if cfg.phase == "router" else cfg.expert


def grad_accumulation(cfg: Config) -> int:
    """Micro-batches per optimizer step, so the global batch is the same at any world size."""
    o = optim_section(cfg)
    return o.global_batch_size // (o.micro_batch_size * world_size(cfg.trainer))


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied and validated (no file selectors)."""
    selected, dotted = _parse_overrides(list(overrides))
    if selected:
        raise ConfigError(f"{sorted(selected)} pick config files; they cannot change inside a run: {overrides}.")
    return _finish(OmegaConf.structured(cfg), dotted, f"overrides {dotted}")


def to_yaml(cfg: Config) -> str:
    """The resolved config, as written next to every artifact: secrets redacted (see artifacts.redact)."""
    from selfmoe.artifacts import redact

    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))


def fingerprint(cfg: Config, *sections: str) -> dict[str, Any]:
    """The plain-dict content of the named config sections (what an artifact depends on).

    Reading policies that do not shape an artifact read as their defaults, so that switching one
    (``data.on_bad_line=skip`` to get past a broken line) keeps the artifacts it did not change.
    """
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    container["data"]["on_bad_line"] = DataConfig.on_bad_line  # the seeds actually used are hashed on their own
    out: dict[str, Any] = {}
    for dotted in sections:
        node: Any = container
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def _validate_merge(cfg: Config) -> None:
    m = cfg.merge
    experts = m.experts if m.experts is not None else cfg.router.experts
    unknown = [d for d in experts if d not in cfg.domains]
    _check(bool(experts) and not unknown, f"merge.experts={experts}: name known domains ({sorted(cfg.domains)}).")
    _check(
        m.weights is None or len(m.weights) == len(experts),
        f"merge.weights has {len(m.weights or [])} values for {len(experts)} experts: give one per expert or null.",
    )
    bad = [x for x in m.methods if x not in MERGE_METHODS]
    _check(not bad, f"merge.methods: unknown {bad}; use {list(MERGE_METHODS)}.")
    _check(0.0 < m.density <= 1.0, f"merge.density={m.density}: must be in (0, 1].")
    _check(0.0 <= m.drop_rate < 1.0, f"merge.drop_rate={m.drop_rate}: must be in [0, 1).")
    _check(m.dtype in ("float32", "bfloat16", "float16"), f"merge.dtype={m.dtype!r}: use float32, bfloat16 or float16.")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _check(e.scale in ("full", "smoke"), f"eval.scale={e.scale!r}: use full or smoke.")
    suite = suite_name(cfg)
    _check(suite in e.suites, f"eval.suite={suite!r} is not defined; suites: {sorted(e.suites)} (see eval.suites).")
    for name, tasks in e.suites.items():
        for t in tasks:
            _check(bool(t.task) and t.num_fewshot >= 0, f"eval.suites.{name}: every entry needs a task and shots >= 0.")
    _check(e.batch_size > 0, "eval.batch_size must be > 0.")
    _check(e.limit is None or e.limit > 0, "eval.limit must be > 0 (a count, or a fraction below 1) or null.")
    _check(bool(e.seeds), "eval.seeds is empty: give at least one few-shot seed.")
    _check(e.routing_docs >= 0, "eval.routing_docs must be >= 0.")
    _check(isinstance(e.cuda_graphs, bool), f"eval.cuda_graphs={e.cuda_graphs!r}: use true or false.")
    x = cfg.experiment
    _check(x.kind in ("table", "line"), f"experiment.kind={x.kind!r}: use table or line.")
    _check(x.suite is None or x.suite in e.suites, f"experiment.suite={x.suite!r} is not one of {sorted(e.suites)}.")


def suite_name(cfg: Config) -> str:
    """The suite to run: the experiment's or eval.suite, and always `smoke` at smoke scale."""
    if cfg.eval.scale == "smoke":
        return "smoke"
    return cfg.experiment.suite or cfg.eval.suite
