"""E1: scoring/prefill tokens/s, MiXSE ÷ base, with peers, numerics and the (N, r, k) sweep.

A forward over ``prefill_batch x prefill_len`` tokens with full logits (what lm-eval's scoring
does). Target: MiXSE (N=4, r=8, top-1, layer router) ≥ 0.90 of the base.

On a GPU, the base, MiXSE and the single LoRA are also timed as CUDA-graph replays
(``<name>/graph``, through :class:`selfmoe.models.graphed.GraphedLM`, as ``make eval`` scores
with ``eval.cuda_graphs=true``), round-robin with the eager variants. ``e1_ratio`` gives MiXSE
÷ base for both modes; the eager one is the headline, since evaluation scores eagerly by default
(replay measured slower on the H200 hosts, docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Context, cli_main, console, free_memory, guarded, table, timing_table
from benchmarks.shapes import random_experts, slice_experts
from benchmarks.timing import Timing, ratio, time_fn, time_interleaved
from benchmarks.variants import (
    MixsePath,
    compare_logits,
    copy_router_into_xlora,
    make_loop,
    make_lora,
    make_mixse,
    make_xlora,
    mixse_paths,
)
from selfmoe.models.graphed import GraphedLM
from selfmoe.models.mixse import RouterSettings

SWEEP_N, SWEEP_R, SWEEP_K = (4, 8, 16), (8, 16, 64), (1, 2)
NO_GRAPHS = "CUDA graphs need a GPU: the graphed variants were skipped on this device"


def forward_fn(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    @torch.inference_mode()
    def fwd() -> None:
        model(input_ids=ids)

    return fwd


def forward_timing(ctx: Context, model: torch.nn.Module, ids: torch.Tensor) -> Timing:
    s = ctx.settings
    return time_fn(forward_fn(model, ids), device=ctx.device, iters=s.iters, warmup=s.warmup)


@torch.inference_mode()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def replay_fn(graphed: GraphedLM, ids: torch.Tensor) -> Callable[[], None]:
    def fwd() -> None:
        graphed(ids, copy=False)  # as lm-eval scores through evaluation/lm.py: no copy of the logits

    return fwd


def path_fn(model: torch.nn.Module, ids: torch.Tensor, path: MixsePath) -> Callable[[], None]:
    """A forward of MiXSE ``model`` on ``path``."""
    fwd = forward_fn(model, ids)

    def run() -> None:
        with path.on(model):
            fwd()

    return run


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    ids = ctx.input_ids(s.prefill_batch, s.prefill_len)
    check = ids[:1, : s.numerics_len]
    tokens = ids.numel()
    settings = RouterSettings(top_k=s.top_k)
    out: dict[str, Any] = {"tokens_per_forward": tokens, "batch": s.prefill_batch, "seq_len": s.prefill_len}
    numerics: dict[str, Any] = {}
    mixse = make_mixse(ctx.model, ctx.experts, settings)
    paths = mixse_paths()
    variants = {"base": forward_fn(ctx.model, ids), **{k: path_fn(mixse, ids, p) for k, p in paths.items()}}
    lora = make_lora(ctx.model, ctx.adapter_dirs[ctx.experts[0].name]) if s.peers else None
    if lora is not None:
        variants["lora"] = forward_fn(lora, ids)
    graphed: dict[str, GraphedLM] = {}
    if ctx.device.type == "cuda":
        # The default path only: the graph captures MiXSE's switches as they are at capture time.
        graphed = {"base": GraphedLM(ctx.model), "mixse": GraphedLM(mixse)}
        if lora is not None:
            graphed["lora"] = GraphedLM(lora)
        graphed = _captured(graphed, ids, out)
        variants |= {f"{name}/graph": replay_fn(g, ids) for name, g in graphed.items()}
    else:
        out["graphs"] = NO_GRAPHS
    # Eager and graphed variants round-robin: their ratios share the conditions.
    timings = time_interleaved(variants, device=ctx.device, iters=s.iters, warmup=s.warmup)
    if graphed:
        for name, g in graphed.items():
            # Replay vs eager on the numerics slice: a graph of its own bucket, the same tokens.
            numerics[f"{name}_graph_vs_eager"] = compare_logits(g(check).float(), logits(g.model, check))
            g.reset()
        del graphed

    on_path = {}
    for name, path in paths.items():
        with path.on(mixse):
            on_path[name] = logits(mixse, check)
    fast, reference = on_path["mixse"], on_path.pop("mixse-ref")
    for name, out_logits in on_path.items():
        numerics[f"{name.replace('-', '_')}_vs_reference_path"] = compare_logits(out_logits, reference)
    numerics["mixse_vs_base"] = compare_logits(fast, logits(ctx.model, check))  # the experts do change the output
    # The bf16 noise floor: the same base model and tokens, computed alone vs inside a batch of two
    # (other GEMM tilings and summation orders). Differences of this size are rounding, not bugs.
    numerics["noise_floor_base_alone_vs_in_batch"] = compare_logits(
        logits(ctx.model, check), logits(ctx.model, ids[:2, : s.numerics_len])[:1]
    )

    if s.peers:
        loop = make_loop(ctx.model, ctx.experts, settings)
        timings["loop"] = forward_timing(ctx, loop, ids)
        numerics["loop_vs_mixse"] = compare_logits(logits(loop, check), fast)
        del loop
        fixed = make_mixse(ctx.model, ctx.experts, RouterSettings(mode=f"fixed:{ctx.experts[0].name}"))
        numerics["mixse_fixed_e0_vs_peft_lora_e0"] = compare_logits(logits(fixed, check), logits(lora, check))
        del lora, fixed
        free_memory()
        out["xlora"] = guarded("xlora", lambda: _xlora(ctx, ids, check, timings, numerics))
    del mixse
    free_memory()

    out["timings"] = timings
    out["tokens_per_s"] = {k: t.per_second(tokens) for k, t in timings.items()}
    out["ratio_vs_base"] = {k: ratio(t, timings["base"]) for k, t in timings.items()}
    out["e1_ratio"] = {"eager": out["ratio_vs_base"]["mixse"]}
    if "base/graph" in timings:
        out["ratio_vs_base_graph"] = {k: ratio(t, timings["base/graph"]) for k, t in timings.items()}
        out["e1_ratio"]["graph"] = out["ratio_vs_base_graph"]["mixse/graph"]
    out["numerics"] = numerics
    if s.sweep:
        out["sweep"] = guarded("sweep", lambda: sweep(ctx, ids))
    return out


def _captured(graphed: dict[str, GraphedLM], ids: torch.Tensor, out: dict[str, Any]) -> dict[str, GraphedLM]:
    """The runners whose graph for ``ids`` captured. A failure is recorded, and the eager variants still run."""
    kept = {}
    for name, g in graphed.items():
        try:
            g(ids, copy=False)
            kept[name] = g
        except Exception as exc:
            out.setdefault("graph_errors", {})[name] = repr(exc)
            g.reset()
    return kept


def _xlora(ctx: Context, ids, check, timings: dict[str, Timing], numerics: dict[str, Any]) -> dict[str, Any]:
    xlora = make_xlora(ctx.model, ctx.adapter_dirs, top_k=ctx.settings.top_k)
    timings["xlora"] = forward_timing(ctx, xlora, ids)
    # Same routing function on both sides: X-LoRA's classifier reads the final hidden state of an
    # adapter-free pass, so compare with MiXSE's final_hidden input and the same router weights.
    reading = make_mixse(ctx.model, ctx.experts, RouterSettings(top_k=ctx.settings.top_k, input="final_hidden"))
    copy_router_into_xlora(reading, xlora)
    numerics["xlora_vs_mixse_final_hidden"] = compare_logits(logits(xlora, check), logits(reading, check))
    return {"top_k_lora": ctx.settings.top_k}


def sweep(ctx: Context, ids: torch.Tensor) -> list[dict[str, Any]]:
    """MiXSE ÷ base over N x r x k (each timed round-robin with the base), experts sliced from one set."""
    s = ctx.settings
    largest = random_experts(ctx.model, max(SWEEP_N), max(SWEEP_R), seed=s.seed + 7)
    base = forward_fn(ctx.model, ids)
    rows = []
    for n in SWEEP_N:
        for r in SWEEP_R:
            experts = slice_experts(largest, n, r)
            for k in SWEEP_K:
                model = make_mixse(ctx.model, experts, RouterSettings(top_k=k))
                t = time_interleaved(
                    {"base": base, "mixse": forward_fn(model, ids)}, device=ctx.device, iters=s.iters, warmup=s.warmup
                )
                rows.append(
                    {
                        "N": n,
                        "r": r,
                        "k": k,
                        "median_ms": t["mixse"].median_ms,
                        "base_median_ms": t["base"].median_ms,
                        "ratio_vs_base": ratio(t["mixse"], t["base"]),
                    }
                )
                del model
                free_memory()
    return rows


def show(result: dict[str, Any]) -> None:
    if "timings" not in result:
        return
    timing_table("E1 prefill (scoring)", result, "÷ eager base")
    headline = result.get("e1_ratio", {})
    graph = headline.get("graph")
    console.print(
        f"E1 MiXSE ÷ base: eager {headline.get('eager', float('nan')):.3f} (the headline),"
        f" graphed {'—' if graph is None else f'{graph:.3f}'}"
    )
    if "graphs" in result:
        console.print(f"note: {result['graphs']}")
    if isinstance(result.get("sweep"), list):
        table(
            "E1 sweep",
            ["N", "r", "k", "÷ base"],
            [[r["N"], r["r"], r["k"], r["ratio_vs_base"]] for r in result["sweep"]],
        )


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e1_prefill")
