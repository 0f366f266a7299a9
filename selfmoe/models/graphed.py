"""Scoring forwards (``logits = model(input_ids)``, no grad, no attention mask) replayed from CUDA graphs.

Why: a MiXSE prefill launches about 1.7x the base model's kernels, and on a slow host the CPU
cannot issue them ahead of the GPU (docs/performance.md, E1). Replaying a captured graph issues
the whole forward with one launch.

This is how lm-eval's HFLM scores a causal LM: right-padded batches, no mask. A graph has fixed
shapes, so each batch is padded up to a shape *bucket* (:class:`Buckets`) and the logits are
sliced back. For a causal LM that changes nothing: a position's logits depend only on the
tokens at or before it in its own row, so extra columns to the right and extra rows below do
not reach the real ones. MiXSE routes per token, which keeps it causal. The equality holds
mathematically; a kernel may still pick another tiling for the padded shape, so in low precision
the logits can move by rounding. The padded length never exceeds the model's
``max_position_embeddings``, because learned positions and dynamic RoPE scaling change past it.

A captured graph replays the kernels Python issued during capture, with the same pointers.
Python-level state read during the forward is therefore frozen at capture:

- switches such as ``model.mixse.fast`` or ``GatedLoraLinear.add_into``: call :meth:`GraphedLM.reset`
  after changing them;
- parameters replaced rather than updated in place (``.data =``, ``.to()``). Moving the model is
  detected, other replacements are not. In-place updates, such as ``load_state_dict`` or an
  optimiser step, are picked up by the next replay;
- MiXSE's routing records (``mixse.record``, ``mixse.collect_aux``): their tensors would point into
  graph memory that the next replay overwrites, so those forwards run eagerly.

MiXSE's per-layer caches are rebuilt inside each forward, which makes them safe to capture. The
layer pre-hook sets new ``slot.gates``, and the column-gate cache belongs to the gates it was
computed from (by identity; the routing kernel fills it with them), and ``LinearGroup`` matches
inputs by identity within one forward. Neither carries tensors from one call to the next, so the
captured kernels recompute them on every replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Buckets:
    """The padded shape ``(batch, length)`` that a scoring batch is replayed at.

    The length is rounded up to a multiple of ``length_multiple``, but never past ``max_length``
    (a longer input keeps its own length). The batch is rounded up to a power of two, but never
    past ``batch_size``, so full batches of an odd size are not padded. A batch larger than
    ``batch_size`` is rounded up to a power of two.
    """

    length_multiple: int = 128
    batch_size: int | None = None  # the evaluation's batch size: full batches stay as they are
    max_length: int | None = None  # the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {self.length_multiple}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")

    def __call__(self, batch: int, length: int) -> tuple[int, int]:
        if batch < 1 or length < 1:
            raise ValueError(f"cannot bucket an empty batch ({batch} x {length})")
        padded_length = round_up(length, self.length_multiple)
        if self.max_length is not None:
            padded_length = max(length, min(padded_length, self.max_length))
        padded_batch = next_power_of_two(batch)
        if self.batch_size is not None and batch <= self.batch_size:
            padded_batch = min(padded_batch, self.batch_size)
        return padded_batch, padded_length


def pad_into(out: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Write ``ids`` (b, l) into the top-left corner of ``out`` (B, L) and ``pad_id`` everywhere else."""
    b, length = ids.shape
    out[:b, :length].copy_(ids)
    # The pad region would not change the real logits whatever it held. Refilling it keeps
    # replays reproducible, since stale ids from an earlier batch would otherwise stay there.
    out[:b, length:].fill_(pad_id)
    out[b:].fill_(pad_id)
    return out


def capture_graph(fn: Callable[[], Any], *, device: torch.device, warmup: int, pool: Any = None) -> tuple[Any, Any]:
    """``(graph, output)``: ``fn`` run ``warmup`` times on a side stream, then one call captured.

    The warm-up makes lazily created kernels, cuBLAS handles and workspaces outside the capture.
    ``output`` is what the captured call returned: its tensors are the graph's static outputs,
    overwritten by every replay.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@dataclass
class CapturedForward:
    """One bucket's graph: write ``ids``, ``replay()``, then read ``logits``."""

    ids: torch.Tensor  # (B, L) static input
    logits: torch.Tensor  # (B, L, V) static output, overwritten by every replay
    graph: Any = None  # torch.cuda.CUDAGraph

    def replay(self) -> None:
        self.graph.replay()


class GraphedLM:
    """``logits = wrapper(input_ids)`` for a causal LM (base, PEFT or MiXSE): the model's no-grad
    forward without an attention mask, replayed from one CUDA graph per shape bucket.

    The graphs share one memory pool. At most ``max_graphs`` are kept, and the least recently
    used one is dropped first. Each graph keeps its own logits buffer (B x L x vocab), which
    dominates the memory the graphs hold. On a CPU, with ``graphs=False``, or when a forward
    cannot be replayed (autocast, MiXSE recording routing), the model runs eagerly. With
    ``pad_when_eager`` that eager forward is padded to the same buckets, which lets tests check
    the bucketing without a GPU.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        buckets: Buckets | None = None,
        max_graphs: int = 8,
        graphs: bool = True,
        pad_when_eager: bool = False,
        pad_id: int = 0,
        warmup: int = 2,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.buckets = buckets if buckets is not None else Buckets(max_length=max_positions(model))
        self.max_graphs, self.graphs, self.pad_when_eager = max_graphs, graphs, pad_when_eager
        self.pad_id, self.warmup = pad_id, warmup
        self.captures = 0  # graphs captured so far, evicted ones included
        self._entries: OrderedDict[tuple[int, int], CapturedForward] = OrderedDict()
        self._pool: Any = None
        self._weights: tuple[torch.device, int] | None = None  # where the first parameter was at capture

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The eager forward that a graph captures."""
        # use_cache=False: a KV cache would be returned with the logits, so every graph would keep
        # a whole prefill's keys and values alive in its pool.
        return self.model(input_ids=input_ids, use_cache=False).logits

    def replayable(self, input_ids: torch.Tensor) -> bool:
        """Whether this call can go through a graph."""
        if not (self.graphs and input_ids.is_cuda) or torch.cuda.is_current_stream_capturing():
            return False
        return self.graph_safe()

    def graph_safe(self) -> bool:
        """Whether the model's current state can be captured and replayed."""
        # Under autocast, the cast weights are cached outside the graph.
        if torch.is_autocast_enabled("cuda"):
            return False
        mixse = getattr(self.model, "mixse", None)
        return not (mixse is not None and (getattr(mixse, "record", False) or getattr(mixse, "collect_aux", False)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
        """Logits (b, l, vocab) for ``input_ids`` (b, l).

        With ``copy=False`` a replayed call returns a view into the graph's output buffer. That
        view is valid only until the next call: use it when the caller consumes the logits
        first, as lm-eval does with ``log_softmax``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        if not self.replayable(input_ids):
            if not self.pad_when_eager:
                return self.forward(input_ids)
            shape = self.buckets(b, length)
            padded = pad_into(input_ids.new_empty(shape), input_ids, self.pad_id)
            return self.forward(padded)[:b, :length]
        entry = self._entry(self.buckets(b, length))
        pad_into(entry.ids, input_ids, self.pad_id)
        entry.replay()
        logits = entry.logits[:b, :length]
        return logits.clone() if copy else logits

    def _entry(self, shape: tuple[int, int]) -> CapturedForward:
        weights = self._first_parameter()
        if weights != self._weights:  # moved (or first use): every graph reads the old storage
            self.reset()
            self._weights = weights
        entry = self._entries.get(shape)
        if entry is not None:
            self._entries.move_to_end(shape)
            return entry
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
        entry = self._capture(*shape)
        self.captures += 1
        self._entries[shape] = entry
        return entry

    def _first_parameter(self) -> tuple[torch.device, int] | None:
        p = next(self.model.parameters(), None)
        return None if p is None else (p.device, p.data_ptr())

    def _capture(self, batch: int, length: int) -> CapturedForward:
        device = next(self.model.parameters()).device
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long, device=device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(lambda: self.forward(ids), device=device, warmup=self.warmup, pool=self._pool)
        return CapturedForward(ids=ids, logits=logits, graph=graph)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The buckets that have a graph now, least recently used first."""
        return list(self._entries)

    def reset(self) -> None:
        """Drop every graph. The next call captures again (after switches changed, say)."""
        self._entries.clear()
        self._weights = None


__all__ = [
    "Buckets",
    "CapturedForward",
    "GraphedLM",
    "capture_graph",
    "max_positions",
    "next_power_of_two",
    "pad_into",
    "round_up",
]
