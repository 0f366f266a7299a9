"""CPU regression benchmark: MiXSE ÷ base forward on a mid-size Llama (hidden 1024, 8 layers).

Runs anywhere in under a minute, so a slowdown of the gated linears shows without a GPU:
float32, one sequence of ``--tokens`` tokens, ``--threads`` threads, the median of 20 forwards
of the base, MiXSE's fast path and its reference path (N=4, r=8, top-1, layer router).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import Settings, environment, make_context, parser, table, write_json
from benchmarks.timing import ratio, time_interleaved
from benchmarks.variants import MixsePath, compare_logits, make_mixse
from selfmoe.models.mixse import RouterSettings


def run(settings: Settings, tokens: int = 128) -> dict[str, Any]:
    ctx = make_context(settings)
    ids = ctx.input_ids(1, tokens)
    mixse = make_mixse(ctx.model, ctx.experts, RouterSettings(top_k=settings.top_k))

    @torch.inference_mode()
    def forward(model: torch.nn.Module) -> torch.Tensor:
        return model(input_ids=ids).logits

    def reference() -> torch.Tensor:
        with MixsePath(fast=False).on(mixse):
            return forward(mixse)

    # Round-robin: on a shared machine, load from other processes hits every variant alike.
    variants = {"base": lambda: forward(ctx.model), "mixse": lambda: forward(mixse), "mixse-ref": reference}
    timings = time_interleaved(variants, device="cpu", iters=settings.iters, warmup=settings.warmup)
    numerics = compare_logits(forward(mixse), reference())
    return {
        "shape": settings.shape,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "ratio_vs_base": {k: ratio(t, timings["base"]) for k, t in timings.items()},
        "numerics_fast_vs_reference": numerics,
        "environment": environment(),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(shape=args.shape or "cpu-mid", device="cpu", dtype="float32", iters=args.iters, warmup=2)
    if args.quick:
        settings.shape, settings.iters = "tiny", 2
    result = run(settings, args.tokens)
    rows = [[k, t.median_ms, result["ratio_vs_base"][k]] for k, t in result["timings"].items()]
    table(f"CPU forward, {settings.shape}, {args.tokens} tokens", ["variant", "median ms", "÷ base"], rows)
    print(f"max abs diff fast vs reference: {result['numerics_fast_vs_reference']['max_abs_diff']:.3g}")
    if args.out:
        write_json(args.out, {"cpu": result})


if __name__ == "__main__":
    main()
