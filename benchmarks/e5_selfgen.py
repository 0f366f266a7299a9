"""E5: self-generation throughput of the base model through the project's TextGenerator.

The data phase's brainstorming call (selfmoe.data.selfgen): a batch of ``data.batch_size``
left-padded prompts, sampling at temperature 1.0 / top-p 0.98, up to 512 new tokens, decoded by
the project's static-cache decoder (compiled CUDA-graph steps, selfmoe/data/decoding.py) over the
project's attention (``selfmoe_sdpa``, as ``load_base`` sets it). Reported: generated tokens/s
as TextGenerator counts them, end to end (prefill, decode steps, sampling, host checks), and the
bandwidth roofline at that batch and mean context (target ≥ 40 % of it). For contrast: plain HF
``generate`` at batch 1 (the naive path, with its median decode step) and a CUDA-graph decode
step of ``benchmarks.decode.DecodeRunner`` at the same batch and context, plain and compiled.

The weights are random, so a synthetic word-level tokenizer covering the whole vocabulary stands
in for the real one (tokenisation is host work outside the timed decode steps).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from benchmarks.common import Context, cli_main, free_memory, guarded, table
from benchmarks.decode import DecodeRunner
from benchmarks.roofline import decode_roofline_tokens_per_s, weight_bytes_per_step
from benchmarks.timing import Timing
from selfmoe.data.generation import TextGenerator

# configs/base.yaml `data:` (selfmoe.config.DataConfig): the brainstorming call's settings.
# Copied here so the harness needs no omegaconf; tests/test_benchmarks.py checks they agree.
DATA = {"batch_size": 16, "temperature": 1.0, "top_p": 0.98, "max_new_tokens_brainstorm": 512, "compile": True}
PROMPT_TOKENS = (256, 512)  # a brainstorming prompt: header + 3 seed tasks (measured range, see docs)
NAIVE_NEW_TOKENS = 128


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose words ``w<i>`` are exactly the model's token ids."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="w0", eos_token="w1", pad_token="w2", unk_token="w3"
    )


def synthetic_prompts(n: int, vocab_size: int, lengths: tuple[int, int], seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(10, vocab_size, (k,), generator=gen).tolist()) for k in sizes]


class StepClock:
    """CUDA events at the start of every model forward: step times of a running ``generate``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.events: list[Any] = []
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())

    def decode_steps(self) -> Timing:
        """Times between consecutive forwards after the first (prefill): one decode step each."""
        self.handle.remove()
        if self.cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in zip(self.events[1:], self.events[2:], strict=False)]
        else:
            times = [(b - a) * 1e3 for a, b in zip(self.events[1:], self.events[2:], strict=False)]
        return Timing(times)


def _generate(gen: TextGenerator, prompts: list[str], max_new: int) -> tuple[int, float]:
    """Tokens and seconds of one sampled TextGenerator call, as the data phase makes it."""
    before_tokens, before_s = gen.throughput.tokens, gen.throughput.seconds
    gen.generate(prompts, max_new_tokens=max_new, do_sample=True, temperature=DATA["temperature"], top_p=DATA["top_p"])
    return gen.throughput.tokens - before_tokens, gen.throughput.seconds - before_s


def _naive(gen: TextGenerator, prompt: str, max_new: int) -> tuple[int, float, Timing]:
    """Plain HF ``generate`` at batch 1, greedy: tokens, seconds and its decode steps."""
    enc = gen.tokenizer([prompt], return_tensors="pt").to(gen.device)
    clock = StepClock(gen.model)
    start = time.perf_counter()
    out = gen.model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=gen.tokenizer.pad_token_id)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out.shape[1] - enc["input_ids"].shape[1], seconds, clock.decode_steps()


def run(
    ctx: Context, *, bytes_per_s: float | None = None, batch: int | None = None, max_new: int | None = None
) -> dict:
    s = ctx.settings
    batch = batch or DATA["batch_size"]
    max_new = max_new or DATA["max_new_tokens_brainstorm"]
    vocab = ctx.model.config.vocab_size
    tok = synthetic_tokenizer(vocab)
    ctx.model.generation_config.pad_token_id = tok.pad_token_id
    # As the generate phase builds it: the decode step compiled on a GPU when data.compile is set.
    gen = TextGenerator(ctx.model, tok, compile=DATA["compile"] and ctx.device.type == "cuda")
    lengths = PROMPT_TOKENS if not s.shape.startswith("tiny") else (8, 16)
    prompts = synthetic_prompts(batch, vocab, lengths, seed=s.seed)
    prompt_len = max(len(p.split()) for p in prompts)  # left padding: every row holds the longest prompt
    # Warm-up: the first call of a cache size compiles and captures its step. The second size makes
    # dynamo recompile with the cache length symbolic, which is the step a data phase runs at most
    # lengths, so that is the step timed; its compile and capture happen in the second call.
    _generate(gen, prompts, 8)
    _generate(gen, prompts, max_new)
    tokens, seconds = _generate(gen, prompts, max_new)
    out: dict[str, Any] = {
        "batch": batch,
        "max_new_tokens": max_new,
        "prompt_tokens_padded": prompt_len,
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "graphs": bool(gen.decoder() and gen.decoder().graphs),
        "compiled": bool(gen.decoder() and gen.decoder().compile),
    }
    context = prompt_len + max_new / 2
    if bytes_per_s:
        roof = decode_roofline_tokens_per_s(
            weight_bytes_per_step(ctx.model), ctx.facts["kv_bytes_per_token"], batch, context, bytes_per_s
        )
        out.update(
            roofline_tokens_per_s=roof,
            roofline_context=context,
            fraction_of_roofline=out["tokens_per_s"] / roof,
        )
    # The naive path: plain HF generate at batch 1, greedy.
    n_tokens, n_seconds, n_steps = _naive(gen, prompts[0], min(max_new, NAIVE_NEW_TOKENS))
    out["naive_batch1"] = {
        "tokens_per_s": n_tokens / n_seconds,
        "decode_step": n_steps,
        "decode_step_tokens_per_s": n_steps.per_second(1),
    }
    free_memory()
    if ctx.device.type == "cuda":
        roof = out.get("roofline_tokens_per_s")
        out["graphed_decode"] = guarded("graphed", lambda: _graphed(ctx.model, ctx, batch, int(context), roof))
        out["compiled_graphed_decode"] = guarded(
            "compiled", lambda: _graphed(torch.compile(ctx.model, dynamic=False), ctx, batch, int(context), roof)
        )
    return out


def _graphed(model: torch.nn.Module, ctx: Context, batch: int, context: int, roofline: float | None) -> dict[str, Any]:
    runner = DecodeRunner(model, batch, context, max_steps=ctx.settings.decode_iters + 8, graph=True)
    t = runner.time(iters=ctx.settings.decode_iters, warmup=ctx.settings.warmup)
    runner.close()
    out = {"context": context, "step": t, "tokens_per_s": t.per_second(batch)}
    if roofline:
        out["fraction_of_roofline"] = out["tokens_per_s"] / roofline
    return out


def show(result: dict[str, Any]) -> None:
    if "tokens_per_s" not in result:
        return
    rows = [
        ["TextGenerator (end to end)", result["batch"], result["tokens_per_s"], result.get("fraction_of_roofline")],
        ["HF generate, naive", 1, result["naive_batch1"]["tokens_per_s"], None],
    ]
    for key, label in (("graphed_decode", "graphed step"), ("compiled_graphed_decode", "compiled graphed step")):
        g = result.get(key) or {}
        if "tokens_per_s" in g:
            rows.append([label, result["batch"], g["tokens_per_s"], g.get("fraction_of_roofline")])
    if "roofline_tokens_per_s" in result:
        rows.append(["bandwidth roofline", result["batch"], result["roofline_tokens_per_s"], 1.0])
    table("E5 self-generation", ["path", "batch", "tokens/s", "of roofline"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e5_selfgen")
