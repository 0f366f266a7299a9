"""A static-cache decode loop for a HF causal LM, replayed from a CUDA graph on GPUs.

``model.generate`` spends most of a decode step in Python (about 1,760 kernel launches for an 8B
model) and syncs with the host every step, so a GPU idles most of the time. Here a batch of
left-padded prompts is prefilled once, eagerly, into a :class:`transformers.StaticCache`; then every
decode step is the same model forward on static (B, 1) buffers, which on CUDA is captured once into a
``torch.cuda.CUDAGraph`` and replayed. The loop builds its own 4D additive masks (transformers passes a
4D mask through untouched), so none of transformers' mask logic, with its host syncs, runs per step.
Sampling runs eagerly after each forward, from a per-call ``torch.Generator``, and the host looks at the
tokens only every ``check_every`` steps: for "every row has ended" and for stop strings. With ``compile``
the decode step goes through ``torch.compile`` first (inductor fuses the norm, rotary, activation and
residual chains: 1.3-1.4x per step for an 8B model on an H200), and that compiled step is what the CUDA
graph records.

The tokens are those ``generate`` gives for the same options (greedy; temperature and top-p with
``top_k=0``; EOS; ``stop_strings``), except the random stream when sampling: the Gumbel-max draw here
is a different, equally exact, sampler of the same distribution than ``torch.multinomial``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from selfmoe.models.attention import NAME as SELFMOE_SDPA
from selfmoe.models.graphed import capture_graph

log = logging.getLogger(__name__)

# Implementations that take a 4D additive float mask as it is.
MASKABLE = ("sdpa", "eager", SELFMOE_SDPA)


def unsupported_reason(model: PreTrainedModel, bucket: int = 64) -> str | None:
    """Why :class:`StaticDecoder` cannot run ``model`` (one line), or None when it can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKABLE:
        return f"attn_implementation={impl!r} takes no 4D additive mask"
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or "attention_mask" not in params:
        return "its forward takes no position_ids/attention_mask"
    try:
        cache = StaticCache(config=config, max_cache_len=bucket)
    except Exception as exc:  # any config StaticCache rejects
        return f"StaticCache rejects its config ({type(exc).__name__}: {exc})"
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        # Sliding-window or chunked layers need transformers' own masks and cache indexing.
        return "it has attention layers other than full attention (sliding window, chunked, ...)"
    return None


class _CompileUnsupported(RuntimeError):
    """``torch.compile`` itself refused (an unsupported Python or platform)."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch raises when compiling fails: dynamo's errors, which wrap inductor's (no C++ compiler,
    a lowering or Triton failure: ``BackendCompilerFailed``), graph breaks under ``fullgraph``
    (``Unsupported``), and the recompile limit under ``fullgraph`` (``FailOnRecompileLimitHit``)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException  # imported on use (0.7 s)

    return (TorchDynamoException, FailOnRecompileLimitHit, _CompileUnsupported)


def _why(exc: BaseException) -> str:
    """One line naming a compile failure and its cause (inductor's errors arrive wrapped by dynamo's)."""
    inner = getattr(exc, "inner_exception", None) or exc
    line = next(iter(str(inner).strip().splitlines()), "")
    return f"{type(inner).__name__}: {line}" + (f", raised as {type(exc).__name__}" if inner is not exc else "")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with transformers' semantics: drop the least likely tokens whose total probability
    is at most 1 - top_p (summed from the least likely up), always keeping the most likely token."""
    ascending, order = torch.sort(logits, dim=-1)
    dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    dropped[..., -1] = False
    return logits.masked_fill(dropped.scatter(-1, order, dropped), -math.inf)


@dataclass
class _Slot:
    """What a (batch, cache length) decode reuses across calls: the cache, static inputs, maybe a graph."""

    cache: StaticCache
    ids: torch.Tensor  # (B, 1) the token fed to the next step
    pos: torch.Tensor  # (B, 1) its position
    mask: torch.Tensor  # (B, 1, 1, L) additive: 0 where a cache slot may be attended
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output buffer


class StaticDecoder:
    """Decode batches of left-padded prompts with one model (see the module docstring).

    ``use_graphs`` captures the decode step into a CUDA graph on CUDA devices (it is ignored elsewhere);
    ``bucket`` rounds the cache length up so that calls of similar lengths share a cache and a graph;
    ``max_cached`` bounds how many (batch, cache length) caches and graphs are kept;
    ``compile`` runs the decode step (not the prefill, whose shape follows the prompt) through
    ``torch.compile``, falling back to the plain step, with a warning, if compiling fails.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        tokenizer=None,
        use_graphs: bool = True,
        bucket: int = 64,
        check_every: int = 16,
        max_cached: int = 2,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # needed for stop strings only
        self.pad = int(pad_token_id)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = [int(e) for e in eos]
        self.use_graphs = use_graphs
        self.bucket = bucket
        self.check_every = max(1, check_every)
        self.max_cached = max(1, max_cached)
        self.compile = compile
        self._compiled = None  # the compiled step forward, made on first use
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache (the old name warns on every call there).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def graphs(self) -> bool:
        return self.use_graphs and self.device.type == "cuda"

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
    ) -> torch.Tensor:
        """The new tokens (B, n) on the CPU, as ``generate(...)[:, prompt_len:]``: pad after a row's end,
        n the step at which the last row ended (or ``max_new_tokens``)."""
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: pass tokenizer= to StaticDecoder")
        device = self.device
        input_ids, valid = input_ids.to(device), attention_mask.to(device).bool()
        batch, prompt_len = input_ids.shape
        if max_new_tokens <= 0 or batch == 0:
            return torch.empty(batch, 0, dtype=torch.long)
        length = -(-(prompt_len + max_new_tokens) // self.bucket) * self.bucket
        slot = self._slot(batch, length)
        slot.cache.reset()  # zero the slots and the write position the last call (or a capture) left

        dtype = self.model.dtype
        blocked = torch.finfo(dtype).min
        seen = torch.zeros(batch, length, dtype=torch.bool, device=device)
        seen[:, :prompt_len] = valid
        # Prefill: causal over the real prompt tokens; a pad query sees only its own slot, so that no
        # row is wholly masked (which softmax would turn into NaN keys for the rows that matter).
        q = torch.arange(prompt_len, device=device)[:, None]
        k = torch.arange(length, device=device)[None, :]
        allowed = ((k <= q) & seen[:, None, :]) | (k == q)
        prefill_mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)
        positions = (valid.long().cumsum(-1) - 1).masked_fill_(~valid, 0)
        logits = self._forward(input_ids, positions, prefill_mask[:, None], slot.cache, **self._keep_last)[:, -1]

        slot.mask.copy_(torch.zeros_like(seen, dtype=dtype).masked_fill_(~seen, blocked)[:, None, None, :])
        slot.pos.copy_(valid.sum(-1, keepdim=True) - 1)
        rng = torch.Generator(device=device).manual_seed(seed) if do_sample else None
        eos = torch.tensor(self.eos, dtype=torch.long, device=device)
        out = torch.full((batch, max_new_tokens), self.pad, dtype=torch.long, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        watch = _Watch(self, input_ids.cpu(), valid.cpu(), stop_strings)

        steps = 0
        while True:
            token = self._pick(logits, do_sample, temperature, top_p, rng)
            token = token.masked_fill(ended, self.pad)
            out[:, steps] = token
            ended |= torch.isin(token, eos)
            steps += 1
            if steps == max_new_tokens:
                break
            if steps % self.check_every == 0 and watch.all_ended(out, ended, steps):
                break
            slot.ids.copy_(token[:, None])
            slot.pos.add_(1)
            slot.mask[:, :, :, prompt_len + steps - 1] = 0  # the slot this step writes its token to
            logits = self._step(slot)
        return watch.finish(out, steps)

    # --- the model ----------------------------------------------------------------------------

    def _forward(self, ids, positions, mask, cache, **extra) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_kw: cache},
            **extra,
        )
        return out.logits

    def _step(self, slot: _Slot) -> torch.Tensor:
        if slot.graph is None:
            return self._step_forward(slot)[:, -1]
        slot.graph.replay()
        return slot.logits[:, -1]

    def _step_forward(self, slot: _Slot) -> torch.Tensor:
        """One decode step's logits (B, 1, V): compiled while ``compile`` holds, else the plain forward."""
        args = (slot.ids, slot.pos, slot.mask, slot.cache)
        if self.compile:
            try:
                return self._compiled_forward()(*args)
            except _compile_errors() as exc:
                # Whatever went wrong, the plain forward runs next: an error that is not the compiler's
                # (a bad input, say) raises again there rather than being swallowed here.
                log.warning("decoding without torch.compile: compiling the decode step failed (%s)", _why(exc))
                self.compile = False
                self._compiled = None
        return self._forward(*args)

    def _compiled_forward(self):
        """The step forward through ``torch.compile``, made once per decoder; dynamo compiles on a call.

        ``dynamic=None`` (automatic dynamic): the first (batch, cache length) is compiled for its exact
        shapes, and the first call with another recompiles with the dimensions that changed made symbolic,
        so the many 64-slot cache lengths cost one more compile, not one each (about a minute apiece for an
        8B model). A decoder of one model makes at most about four entries (static, dynamic length,
        dynamic batch, batch 1, which dynamo always specialises). Dynamo keeps them on the code of
        ``_forward``, shared by every decoder in the process; the weights are graph inputs, not constants,
        so a later decoder of a model of the same config and dtype reuses them without compiling.
        ``fullgraph=True``: the step is one graph (for Llama and MiXSE models); a graph break, or going
        past dynamo's ``recompile_limit`` (8 by default) on that code, which would take several model
        configs decoding in one process, then raises instead of silently running the step eagerly, and
        the decoder falls back to the plain step with a warning. Inductor's default mode, without its own
        CUDA graphs: the decoder captures the compiled step itself.
        """
        if self._compiled is None:
            try:
                self._compiled = torch.compile(self._forward, dynamic=None, fullgraph=True)
            except RuntimeError as exc:  # torch.compile unsupported here (it runs nothing of the model yet)
                raise _CompileUnsupported(str(exc)) from exc
        return self._compiled

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        while len(self._slots) >= self.max_cached:
            self._slots.popitem(last=False)  # free the old cache (and graph pool) before allocating
        device = self.device
        slot = _Slot(
            cache=StaticCache(config=self.model.config, max_cache_len=length),
            ids=torch.full((batch, 1), self.pad, dtype=torch.long, device=device),
            pos=torch.zeros(batch, 1, dtype=torch.long, device=device),
            mask=torch.zeros(batch, 1, 1, length, dtype=self.model.dtype, device=device),
        )
        if self.graphs:
            try:
                self._capture(slot)
            except RuntimeError as exc:  # e.g. a model whose forward syncs with the host (dynamic RoPE)
                log.warning("decoding without CUDA graphs: capturing a decode step failed (%s)", exc)
                self.use_graphs = False
                slot.graph = slot.logits = None
        self._slots[key] = slot
        return slot

    def _capture(self, slot: _Slot) -> None:
        """Record one decode step; the warm-up runs also allocate the cache (which the call then resets)."""
        if self.compile:
            # Allocate the cache with a plain step first: traced into the compiled step, StaticCache's lazy
            # allocation would be compiled too, and then compiled again for the allocated cache.
            self._forward(slot.ids, slot.pos, slot.mask, slot.cache)
        # The first warm-up run of a new shape is where dynamo compiles (on the side stream, outside capture).
        slot.graph, slot.logits = capture_graph(lambda: self._step_forward(slot), device=self.device, warmup=3)

    # --- sampling -----------------------------------------------------------------------------

    @staticmethod
    def _pick(logits, do_sample: bool, temperature: float, top_p: float, rng) -> torch.Tensor:
        scores = logits.float()
        if not do_sample:
            return scores.argmax(-1)
        if temperature != 1.0:
            scores = scores / temperature
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        probs = scores.softmax(-1)
        # Gumbel-max in its exponential form: argmax p_i / E_i with E_i ~ Exp(1) is token i with
        # probability p_i, with no host sync (multinomial may check its input on the host).
        noise = torch.empty_like(probs).exponential_(generator=rng)
        return (probs / noise).argmax(-1)


class _Watch:
    """The host's view of a call's tokens: where each row ends (EOS or a stop string), looked at in
    chunks so that the device runs ahead between looks."""

    def __init__(self, decoder: StaticDecoder, prompt: torch.Tensor, valid: torch.Tensor, stops: Sequence[str]):
        self.decoder = decoder
        self.stops = [s for s in stops if s]
        self.rows: list[list[int]] = [[] for _ in range(prompt.shape[0])]
        self.end: list[int | None] = [None] * prompt.shape[0]  # index of a row's last token
        self.scanned = [0] * prompt.shape[0]  # tokens known to hold no stop string
        # transformers matches a stop string that starts in the prompt and ends in the completion: keep
        # enough of each prompt's end to see one (each token decodes to at least one character or none).
        longest = max((len(s) for s in self.stops), default=0)
        self.context = [p[v].tolist()[-longest:] if longest else [] for p, v in zip(prompt, valid, strict=True)]

    def all_ended(self, out: torch.Tensor, ended: torch.Tensor, steps: int) -> bool:
        self._read(out, steps)
        stopped = [r for r in range(len(self.rows)) if self.end[r] is not None]
        if stopped:
            ended[stopped] = True  # rows ended by a stop string emit pad from now on
        return all(e is not None for e in self.end)

    def finish(self, out: torch.Tensor, steps: int) -> torch.Tensor:
        self._read(out, steps)
        pad = self.decoder.pad
        rows = [
            row[: e + 1] + [pad] * (steps - e - 1) if e is not None else row
            for row, e in zip(self.rows, self.end, strict=True)
        ]
        # generate stops at the step where the last row ended; columns after it would be all pad.
        width = max(e + 1 for e in self.end) if all(e is not None for e in self.end) else steps
        return torch.tensor([row[:width] for row in rows], dtype=torch.long).reshape(len(rows), width)

    def _read(self, out: torch.Tensor, steps: int) -> None:
        have = len(self.rows[0])
        if steps > have:
            for row, new in zip(self.rows, out[:, have:steps].tolist(), strict=True):
                row.extend(new)
        eos = set(self.decoder.eos)
        for r, row in enumerate(self.rows):
            if self.end[r] is not None:
                continue
            first_eos = next((i for i, t in enumerate(row) if t in eos), None)
            limit = first_eos if first_eos is not None else len(row)
            stop = self._first_stop(r, limit)
            self.end[r] = stop if stop is not None else first_eos

    def _first_stop(self, r: int, limit: int) -> int | None:
        """The first token index < limit after which the text holds a stop string ending past the prompt."""
        if not self.stops or self.scanned[r] >= limit:
            return None
        decode = self.decoder.tokenizer.decode
        context, row = self.context[r], self.rows[r]
        prompt_chars = len(decode(context, skip_special_tokens=True))

        def hit(n: int) -> bool:
            text = decode(context + row[:n], skip_special_tokens=True)
            return any(text.find(s, max(0, prompt_chars - len(s) + 1)) >= 0 for s in self.stops)

        if not hit(limit):
            self.scanned[r] = limit
            return None
        for n in range(self.scanned[r] + 1, limit + 1):
            if hit(n):
                return n - 1
        return limit - 1  # unreachable while decoding is prefix-monotone
