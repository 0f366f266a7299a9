"""The built-in tiny model: a smoke-scale stand-in for a real base LLM, made offline.

A byte-level BPE tokenizer is trained in-process on a text corpus, a small Llama is built from
config with seeded weights, and a short causal-LM pretraining on the same corpus teaches it
the project's prompt formats (task lists, few-shot responses). Everything is deterministic:
the same corpus and :class:`~selfmoe.config.TinyConfig` give the same tokenizer and weights.
It is cached as an ordinary HF model directory, so every later phase loads it like any other
base model. It follows formats; it does not know anything.
"""

from __future__ import annotations

import math
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from selfmoe.config import TinyConfig

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (deterministic for a given corpus order)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos_token"])
    # BOS is prepended like Llama's tokenizer does, so prompts look like a real model's.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "left"  # generation pads on the left; the SFT collator pads explicitly
    fast.model_max_length = 1 << 30
    return fast


def build_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A small Llama with seeded random weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model


def _packed_blocks(corpus: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate the documents (each ended by EOS) and cut them into ``seq_len`` blocks."""
    ids: list[int] = []
    for doc in corpus:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    if len(ids) < seq_len:  # a corpus shorter than one block is repeated to fill it
        ids = ids * math.ceil(seq_len / len(ids))
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, corpus: list[str], cfg: TinyConfig
) -> list[float]:
    """Short causal-LM pretraining on ``corpus``; returns the loss curve (deterministic)."""
    blocks = _packed_blocks(corpus, tokenizer, cfg.pretrain_seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(blocks), (cfg.pretrain_batch_size,), generator=gen)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def make_tiny(corpus: list[str], cfg: TinyConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, list[float]]:
    """Tokenizer + model + pretraining, all from ``corpus``; returns the loss curve too."""
    corpus = list(corpus)
    random.Random(cfg.seed).shuffle(corpus)
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        losses = pretrain(model, tokenizer, corpus, cfg)
    return model, tokenizer, losses
