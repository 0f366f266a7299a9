"""Batched text generation with a HF causal LM: left padding, stop strings, throughput.

Decoding runs :class:`selfmoe.data.decoding.StaticDecoder` (a static KV cache, each decode step replayed
from a CUDA graph on GPUs, eager on the CPU); a model it cannot run (see
:func:`~selfmoe.data.decoding.unsupported_reason`) falls back to ``model.generate``, saying why once.
Each completion comes back as its text, whether it ended on its own (EOS or a stop string) or was cut by
the token limit, and how many tokens it took. Sampling is seeded per call without touching the global RNG
state. A prompt longer than ``truncate_to`` tokens keeps its last ``truncate_to`` tokens (the end is what
the model continues).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfmoe.data.decoding import StaticDecoder, unsupported_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    complete: bool  # ended by EOS or a stop string, not by max_new_tokens
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Completion:
        text, complete, num_tokens = row["text"], row["complete"], row["num_tokens"]
        if not (isinstance(text, str) and isinstance(complete, bool) and isinstance(num_tokens, int)):
            raise ValueError(f"not a completion: {row!r}")
        return cls(text=text, complete=complete, num_tokens=num_tokens)


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class TextGenerator:
    """Generate completions for batches of prompts with one model.

    ``compile`` runs the static-cache decoder's step through ``torch.compile`` (worth it on a GPU only:
    each new shape costs a compile).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.throughput = Throughput()
        self._decoder: StaticDecoder | None = None
        self._fallback: str | None = None  # why model.generate is used instead, once decided

    def decoder(self) -> StaticDecoder | None:
        """The static-cache decoder, or None when the model needs ``model.generate`` (decided once)."""
        if self._decoder is None and self._fallback is None:
            self._fallback = unsupported_reason(self.model)
            if self._fallback is not None:
                log.warning("generating with model.generate: the static-cache decoder cannot run %s", self._fallback)
            else:
                tok = self.tokenizer
                self._decoder = StaticDecoder(
                    self.model,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    tokenizer=tok,
                    compile=self.compile,
                )
        return self._decoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """Positions the model can attend to (prompt + completion), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        truncate_to: int | None = None,
    ) -> list[Completion]:
        """One batch: every prompt is decoded together with the others, left-padded."""
        enc = self._encode(prompts, truncate_to)
        options = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}
        start = time.perf_counter()
        decoder = self.decoder()
        if decoder is not None:
            new = decoder.generate(
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                stop_strings=stop_strings,
                **options,
            )
        else:
            out = self._hf_generate(enc, max_new_tokens=max_new_tokens, stop_strings=stop_strings, **options)
            new = out[:, enc["input_ids"].shape[1] :]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        results = [self._completion(ids, max_new_tokens, stop_strings) for ids in new.tolist()]
        self.throughput.tokens += sum(c.num_tokens for c in results)
        self.throughput.seconds += elapsed
        return results

    def _hf_generate(self, enc, *, max_new_tokens, do_sample, temperature, top_p, seed, stop_strings) -> torch.Tensor:
        tok = self.tokenizer
        # top_k=0 switches off the top-50 default of many generation configs: PAPER §1.1 samples
        # with temperature and top-p only.
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if do_sample
            else {"do_sample": False}
        )
        stops = {"stop_strings": list(stop_strings), "tokenizer": tok} if stop_strings else {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **sampling,
                **stops,
            )

    def _encode(self, prompts: Sequence[str], truncate_to: int | None):
        tok = self.tokenizer
        tok.padding_side = "left"
        if truncate_to is None:
            return tok(list(prompts), return_tensors="pt", padding=True).to(self.device)
        side = tok.truncation_side
        tok.truncation_side = "left"  # keep the end: the open header or instruction the model must continue
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=truncate_to)
        finally:
            tok.truncation_side = side
        return enc.to(self.device)

    def _completion(self, ids: list[int], max_new_tokens: int, stop_strings: Sequence[str]) -> Completion:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ended = eos in ids
        body = ids[: ids.index(eos)] if ended else ids
        # A row that stopped on a stop string while others went on is padded after it.
        while body and body[-1] == pad:
            body = body[:-1]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        stopped = len(body) < max_new_tokens or any(s in text for s in stop_strings)
        return Completion(text=text, complete=ended or stopped, num_tokens=len(body) + int(ended))
