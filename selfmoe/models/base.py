"""Load the frozen base model and its tokenizer: a hub id, a local directory, or the built-in tiny.

The tiny model is built once from the shipped seeds (see :mod:`selfmoe.models.tiny`) and cached
as a plain HF model directory under ``outputs/tiny/base/``; a cache made from a different
corpus or tiny config is rebuilt, never silently reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selfmoe.artifacts import Layout, atomic_dir, atomic_write_json, read_manifest, sha256_text, versions
from selfmoe.config import Config, ModelConfig, fingerprint
from selfmoe.errors import OfflineError, SelfMoEError
from selfmoe.models.attention import NAME as SELFMOE_SDPA

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"


def hub_offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_model_path(cfg: Config) -> str:
    """The directory or hub id to load; builds (or reuses) the tiny model's cache."""
    if cfg.model.path == TINY:
        return str(ensure_tiny(cfg))
    path = cfg.model.path
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise SelfMoEError(
                f"model.path={path!r} is a directory without config.json; point it at a HF model directory."
            )
        return str(local)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise SelfMoEError(f"model.path={path!r} does not exist. Fix the path, or use a hub id like 'google/gemma-7b'.")
    return path


def _from_pretrained(loader, path: str, model_cfg: ModelConfig, **kwargs):
    try:
        return loader.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except OSError as exc:
        if not Path(path).exists() and (
            hub_offline() or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        ):
            raise OfflineError(
                f"cannot load {path!r} from the Hugging Face hub: it is unreachable or offline mode is on "
                "(HF_HUB_OFFLINE). Download it where the hub is reachable and set model.path=/local/dir, "
                "or use the built-in model (model=tiny)."
            ) from None
        if kwargs.get("use_safetensors") and ".safetensors" in str(exc):
            raise SelfMoEError(
                f"model {path!r} has no safetensors weights: selfmoe loads weights from safetensors only, because "
                ".bin/.pt/.ckpt files are pickles that can run code when loaded. Convert the model once where you "
                "trust it (`AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)` writes safetensors) and "
                "set model.path=dst, or pick a hub revision that has safetensors (model.revision)."
            ) from None
        raise SelfMoEError(f"cannot load model {path!r}: {exc}") from None
    except SafetensorError as exc:  # a truncated or corrupt weights file
        raise SelfMoEError(
            f"cannot load model {path!r}: a weights file is truncated or corrupt ({exc}); download or save "
            "the model again (for the built-in tiny model: delete its directory, it is rebuilt)."
        ) from None


def load_tokenizer(cfg: Config, path: str | None = None) -> PreTrainedTokenizerBase:
    path = path or resolve_model_path(cfg)
    tok = _from_pretrained(AutoTokenizer, path, cfg.model)
    if tok.pad_token is None:
        # Base Llama/Mistral tokenizers have no pad token; EOS is safe because padding is masked.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_base(cfg: Config, *, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model (eval mode, no grads) and its tokenizer."""
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    # Never unpickle weights (a pickle can run code): hub models and local dirs alike must have safetensors.
    # selfmoe_sdpa is transformers' sdpa without repeat_kv's copy of the KV cache (GQA decode reads it
    # 4x otherwise); a configured implementation still wins.
    attn = cfg.model.attn_implementation or SELFMOE_SDPA
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "use_safetensors": True, "attn_implementation": attn}
    model = _from_pretrained(AutoModelForCausalLM, path, cfg.model, **kwargs)
    model.requires_grad_(False)
    model.eval()
    return model.to(device), tokenizer


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.get_decoder().layers``), also when PEFT wraps it."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SelfMoEError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers).")
    return layers


def model_id(cfg: Config) -> str:
    """What the manifests record as the base model: the hub id/dir, or the tiny model's hash."""
    if cfg.model.path == TINY:
        return f"tiny@{tiny_key(cfg)[:12]}"
    return cfg.model.path + (f"@{cfg.model.revision}" if cfg.model.revision else "")


def tiny_key(cfg: Config, corpus: list[str] | None = None) -> str:
    """What the tiny model is made from: its config and its pretraining corpus."""
    from selfmoe.data.prompts import pretraining_corpus

    return sha256_text(repr((fingerprint(cfg, "tiny"), corpus if corpus is not None else pretraining_corpus(cfg))))


def ensure_tiny(cfg: Config) -> Path:
    """Build the tiny model into ``outputs/tiny/base`` unless a matching cache is there."""
    from selfmoe.data.prompts import pretraining_corpus
    from selfmoe.models.tiny import make_tiny

    target = Layout.for_model(cfg.output_dir, cfg.model.name).base
    corpus = pretraining_corpus(cfg)
    key = tiny_key(cfg, corpus)
    manifest = read_manifest(target)
    if manifest and manifest.get("key") == key and (target / "config.json").is_file():
        return target
    log.info("building the tiny base model (%d documents) into %s", len(corpus), target)
    model, tokenizer, losses = make_tiny(corpus, cfg.tiny)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "manifest.json",
            {
                "kind": "tiny-base",
                "key": key,
                "documents": len(corpus),
                "parameters": sum(p.numel() for p in model.parameters()),
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "versions": versions(),
            },
        )
    return target
