"""E4: batched decode tokens/s with the KV cache, MiXSE ÷ base at batch 1, 8, 32, 128 (target ≥ 0.85).

Every sequence holds ``decode_context`` cached tokens; a step is timed as a CUDA-graph replay
(static cache, the way a serving loop runs it) and eagerly. The per-expert loop cannot be
captured (host syncs, data-dependent shapes), so it runs eagerly; X-LoRA cannot cache, so its
step is a full forward over the context (measured at small batches only). The bandwidth roofline
of each batch is shown beside the base. With ``--decode-compile`` the base and MiXSE are also
timed compiled (``torch.compile``, then captured into the graph), as the data phase decodes.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import Context, cli_main, free_memory, guarded, table
from benchmarks.decode import DecodeRunner, no_cache_step_time
from benchmarks.roofline import decode_roofline_tokens_per_s, weight_bytes_per_step
from benchmarks.timing import Timing
from benchmarks.variants import MixsePath, compare_logits, make_loop, make_lora, make_mixse, make_xlora, mixse_paths
from selfmoe.models.mixse import RouterSettings


def run(ctx: Context, *, bytes_per_s: float | None = None) -> dict[str, Any]:
    s = ctx.settings
    settings = RouterSettings(top_k=s.top_k)
    graphs = ctx.device.type == "cuda"
    models: dict[str, torch.nn.Module] = {"base": ctx.model, "mixse": make_mixse(ctx.model, ctx.experts, settings)}
    if s.peers:
        models["lora"] = make_lora(ctx.model, ctx.adapter_dirs[ctx.experts[0].name])
        models["loop"] = make_loop(ctx.model, ctx.experts, settings)
    out: dict[str, Any] = {"context": s.decode_context, "graphs": graphs, "batches": {}}
    weights = weight_bytes_per_step(ctx.model)
    paths = mixse_paths()
    variants = {"base": ("base", MixsePath())} | {k: ("mixse", p) for k, p in paths.items()}
    variants["lora"] = ("lora", MixsePath())
    for batch in s.decode_batches:
        row: dict[str, Any] = {}
        timings: dict[str, Timing] = {}
        cache = None

        def measure(name: str, model: torch.nn.Module, graph: bool, path: MixsePath, timings=timings, batch=batch):
            nonlocal cache
            with path.on(model):  # a graph records the path at capture; eager steps read it each call
                runner = DecodeRunner(
                    model, batch, s.decode_context, max_steps=s.decode_iters + 8, graph=graph, cache=cache
                )
                cache = runner.cache  # one cache per batch size, shared by every variant
                try:
                    timings[name] = runner.time(iters=s.decode_iters, warmup=s.warmup)
                finally:
                    runner.close()
            return {}

        kinds = [("graph", True)] if graphs else []
        kinds.append(("eager", False))
        if s.decode_compile:
            kinds.append(("compiled", graphs))
        for kind, graph in kinds:
            for name, (key, path) in variants.items():
                if kind != "graph" and name not in ("base", "mixse", "mixse-addfold"):
                    continue  # eager and compiled rows: the base and MiXSE (default, fold) only (device time)
                model = models.get(key)
                if model is None:
                    continue
                if kind == "compiled":
                    # What StaticDecoder does with data.compile: the compiled step, then its graph.
                    model = torch.compile(model, dynamic=False)
                row_name = f"{name}/{kind}"
                err = guarded(row_name, lambda m=model, n=row_name, g=graph, p=path: measure(n, m, g, p))
                if err:
                    row.setdefault("errors", {})[row_name] = err
        if "loop" in models:
            err = guarded("loop", lambda: measure("loop/eager", models["loop"], False, MixsePath()))
            if err:
                row.setdefault("errors", {})["loop/eager"] = err
        cache = None
        free_memory()
        if s.peers and batch in s.xlora_decode_batches:
            err = guarded("xlora", lambda b=batch, t=timings: _xlora(ctx, b, t))
            if err:
                row.setdefault("errors", {})["xlora/no-cache"] = err
        row["timings"] = timings
        row["tokens_per_s"] = tps = {k: t.per_second(batch) for k, t in timings.items()}
        # MiXSE and the PEFT LoRA are compared with the base in the same mode; the loop (eager
        # only) and X-LoRA (no cache) with both modes of the base.
        for kind in ("graph", "eager", "compiled"):
            if f"base/{kind}" in tps:
                row[f"ratio_vs_base_{kind}"] = {k: v / tps[f"base/{kind}"] for k, v in tps.items()}
        if bytes_per_s:
            context = s.decode_context + s.decode_iters / 2
            roof = decode_roofline_tokens_per_s(weights, ctx.facts["kv_bytes_per_token"], batch, context, bytes_per_s)
            row["roofline_tokens_per_s"] = roof
            best = row["tokens_per_s"].get("base/graph") or row["tokens_per_s"].get("base/eager")
            if best:
                row["base_fraction_of_roofline"] = best / roof
        out["batches"][batch] = row
    guarded("graph check", lambda: _check_graph_tokens(ctx, models, out) or {})
    return out


def _xlora(ctx: Context, batch: int, timings: dict[str, Timing]) -> dict[str, Any]:
    model = make_xlora(ctx.model, ctx.adapter_dirs, top_k=ctx.settings.top_k)
    timings["xlora/no-cache"] = no_cache_step_time(model, batch, ctx.settings.decode_context, iters=ctx.settings.iters)
    return {}


def _check_graph_tokens(ctx: Context, models: dict[str, torch.nn.Module], out: dict[str, Any]) -> None:
    """A graph replay computes what an eager step computes (batch 1): first-step logits and 8 greedy tokens.

    With random weights the logits are nearly flat, so a last-bit difference between the eager
    and the captured GEMMs can flip an argmax: the logits difference is the check.
    """
    if ctx.device.type != "cuda":
        return
    checks = {}
    for name in ("base", "mixse"):
        eager = DecodeRunner(models[name], 1, ctx.settings.decode_context, max_steps=16)
        graph = DecodeRunner(models[name], 1, ctx.settings.decode_context, max_steps=16, graph=True, cache=eager.cache)
        first = []
        for runner in (eager, graph):
            runner.reset()
            runner.step()
            first.append(runner.logits.float().clone())
        checks[name] = {
            "first_step_logits": compare_logits(first[1], first[0]),
            "same_8_tokens": bool(torch.equal(eager.tokens(8), graph.tokens(8))),
        }
    out["graph_vs_eager"] = checks


def show(result: dict[str, Any]) -> None:
    rows = []
    for batch, row in result.get("batches", {}).items():
        for k, v in row.get("tokens_per_s", {}).items():
            kind = k.rpartition("/")[2] if k.endswith(("eager", "compiled")) else "graph"
            ratios = row.get(f"ratio_vs_base_{kind}") or row.get("ratio_vs_base_eager", {})
            rows.append([batch, k, v, ratios.get(k, float("nan"))])
        if "roofline_tokens_per_s" in row:
            rows.append([batch, "roofline", row["roofline_tokens_per_s"], float("nan")])
    table("E4 batched decode", ["batch", "variant", "tokens/s", "÷ base (graph; eager/compiled rows: same kind)"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e4_decode")
