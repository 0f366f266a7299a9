"""Batched greedy decode steps with a static KV cache, eager or replayed from a CUDA graph.

The cache is filled to ``context`` tokens with random keys and values (a real prefill of that
length would only cost time: a decode step reads the cache the same way whatever it holds),
then each step feeds every sequence's last argmax token and advances one position. The step
is pure device work (no host sync), so it can be captured once and replayed; the per-step
time is the median over replays.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import StaticCache

from benchmarks.timing import Timing, time_fn
from selfmoe.models.graphed import capture_graph


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class DecodeRunner:
    """One decode step of ``model`` at ``batch`` sequences of ``context`` cached tokens."""

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        context: int,
        *,
        max_steps: int = 64,
        graph: bool = False,
        cache: StaticCache | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.batch, self.context = model, batch, context
        self.device = next(model.parameters()).device
        config = text_config(model)
        self.cache = cache or StaticCache(config=config, max_cache_len=context + max_steps)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.first = torch.randint(0, config.vocab_size, (batch, 1), generator=gen, device=self.device)
        self.ids = self.first.clone()
        self.pos = torch.full((batch, 1), context, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        with torch.no_grad():
            self._fill(gen)
            if graph:
                self._capture()

    @torch.no_grad()
    def _fill(self, gen: torch.Generator) -> None:
        # One eager step at position 0 allocates every layer's buffers; then the cache gets random
        # contents up to ``context``.
        self.model(input_ids=self.ids, position_ids=torch.zeros_like(self.pos), past_key_values=self.cache)
        for layer in self.cache.layers:
            layer.keys.normal_(generator=gen)
            layer.values.normal_(generator=gen)
        self.reset()

    def reset(self) -> None:
        """Back to ``context`` cached tokens and the first input tokens (the steps after it are overwritten)."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.context)
        self.pos.fill_(self.context)
        self.ids.copy_(self.first)

    def _step(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        self.logits = out.logits  # a graph's static output buffer: valid after each replay
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def _capture(self) -> None:
        self.graph, _ = capture_graph(self._step, device=self.device, warmup=2)
        self.reset()  # the warm-up steps advanced the cache and the tokens

    @torch.no_grad()
    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def time(self, iters: int = 32, warmup: int = 3) -> Timing:
        """Median time of one step over ``iters`` consecutive steps (the context grows by one each)."""
        self.reset()
        return time_fn(self.step, device=self.device, iters=iters, warmup=warmup)

    def tokens(self, steps: int) -> torch.Tensor:
        """Greedy tokens (batch, steps) from ``context`` on: for checking two models decode alike."""
        self.reset()
        out = []
        for _ in range(steps):
            self.step()
            out.append(self.ids.clone())
        return torch.cat(out, 1)

    def close(self) -> None:
        self.graph = None


def no_cache_step_time(model: nn.Module, batch: int, context: int, *, iters: int, warmup: int = 2) -> Timing:
    """A decode step of a model that cannot cache (X-LoRA): a full forward over the context."""
    device = next(model.parameters()).device
    ids = torch.randint(0, text_config(model).vocab_size, (batch, context), device=device)

    @torch.no_grad()
    def step() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return time_fn(step, device=device, iters=iters, warmup=warmup)
