"""E2: router training step tokens/s ÷ the frozen base's forward+backward.

One step as RouterLitModule takes it under Lightning's bf16-mixed: model in eval mode, autocast
bf16, NLL over every token, backward, AdamW step on the trainable parameters. The reference is
the frozen base doing the same forward and a backward to its input embeddings (the activation
gradients a router below the last layer needs). Target ≥ 0.85.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Context, cli_main, free_memory, guarded, timing_table
from benchmarks.timing import Timing, ratio, time_fn, time_interleaved
from benchmarks.variants import MixsePath, make_loop, make_lora, make_mixse, make_xlora, mixse_paths, trainable
from selfmoe.models.mixse import RouterSettings


def train_step(model: torch.nn.Module, ids: torch.Tensor, params: list[torch.nn.Parameter]) -> Callable[[], None]:
    """One optimiser step (or, without parameters, forward+backward to the inputs)."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    device = ids.device.type

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _time(ctx: Context, model: torch.nn.Module, ids: torch.Tensor, params: list[torch.nn.Parameter]) -> Timing:
    s = ctx.settings
    return time_fn(train_step(model, ids, params), device=ctx.device, iters=s.iters, warmup=s.warmup)


def on_path(model: torch.nn.Module, step: Callable[[], None], path: MixsePath) -> Callable[[], None]:
    def run() -> None:
        with path.on(model):
            step()

    return run


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    ids = ctx.input_ids(s.train_batch, s.train_len, seed=2)
    tokens = ids.numel()
    settings = RouterSettings(top_k=s.top_k)
    trainable_counts: dict[str, int] = {}
    mixse = make_mixse(ctx.model, ctx.experts, settings)
    assert [n for n, p in mixse.named_parameters() if p.requires_grad] == ["mixse.router.weight"]
    router = trainable(mixse)
    trainable_counts["mixse"] = sum(p.numel() for p in router)
    steps = {
        "base": train_step(ctx.model, ids, []),
        **{k: on_path(mixse, train_step(mixse, ids, router), p) for k, p in mixse_paths(routing=False).items()},
    }
    if s.peers:
        lora = make_lora(ctx.model, ctx.adapter_dirs[ctx.experts[0].name])
        for name, p in lora.named_parameters():
            p.requires_grad_("lora_" in name)  # the nearest analogue: train the one adapter
        trainable_counts["lora"] = sum(p.numel() for p in trainable(lora))
        steps["lora"] = train_step(lora, ids, trainable(lora))
    ctx.model.enable_input_require_grads()  # the frozen base back-propagates to its input embeddings
    try:  # round-robin: the ratios share the machine's conditions
        timings = time_interleaved(steps, device=ctx.device, iters=s.iters, warmup=s.warmup)
    finally:
        ctx.model.disable_input_require_grads()
    del mixse, steps
    free_memory()

    def timed(name: str, model: torch.nn.Module) -> dict[str, Any]:
        params = trainable(model)
        trainable_counts[name] = sum(p.numel() for p in params)
        if not params:
            raise RuntimeError(f"{name}: nothing trainable")
        timings[name] = _time(ctx, model, ids, params)
        return {}

    if s.peers:
        guarded("loop", lambda: timed("loop", make_loop(ctx.model, ctx.experts, settings)))
        guarded("xlora", lambda: timed("xlora", make_xlora(ctx.model, ctx.adapter_dirs, top_k=s.top_k)))
    return {
        "tokens_per_step": tokens,
        "batch": s.train_batch,
        "seq_len": s.train_len,
        "timings": timings,
        "tokens_per_s": {k: t.per_second(tokens) for k, t in timings.items()},
        "ratio_vs_base": {k: ratio(t, timings["base"]) for k, t in timings.items()},
        "trainable_params": trainable_counts,
    }


def show(result: dict[str, Any]) -> None:
    if "timings" not in result:
        return
    timing_table("E2 router training step", result, "÷ frozen base fwd+bwd")


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e2_router")
