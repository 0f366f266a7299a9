"""Routing one layer by token count: the Triton kernel against torch's chain (device time).

``MiXSE.route`` for layer 0 of the shape's MiXSE (N experts, rank r, top-k of the settings),
followed by the column gates of the layer's linears, two ways: torch's chain (the router GEMM,
softmax, top-k, scatter, gather and scale) and the routing kernel with the launch configuration
it picks for the token count (``routing_kernel._launch_config``). ``read`` is the floor: one
reduction over the same hidden states. Each call routes another buffer of hidden states (the
buffers together are larger than the L2), and the calls are replayed from one CUDA graph, so the
figures are device time without launch overhead. GPU only.

    python -m benchmarks.routing [--shape llama-3-8b] [--out routing.json]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Context, cli_main, table
from benchmarks.variants import make_mixse
from selfmoe.models import routing_kernel
from selfmoe.models.mixse import RouterSettings

TOKENS = (1, 128, 512, 2048, 8192, 16384)
L2_BYTES = 50 << 20  # the H200's L2 is 50 MB: the buffers of one variant total at least 4x that


def replayed_us(fn: Callable[[torch.Tensor], Any], buffers: list[torch.Tensor], reps: int = 10) -> float:
    """Device microseconds per call: ``fn`` over every buffer, captured once, replayed ``reps`` times."""
    for b in buffers:
        fn(b)  # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for b in buffers:
            fn(b)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(buffers))


def run(ctx: Context) -> dict[str, Any]:
    if ctx.device.type != "cuda":
        return {"note": "GPU only: device time from CUDA graph replay"}
    s = ctx.settings
    model = make_mixse(ctx.model, ctx.experts, RouterSettings(top_k=s.top_k))
    mixse, slot = model.mixse, model.mixse.slots[0]
    width, dtype = model.config.hidden_size, s.torch_dtype

    def route(fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(hidden: torch.Tensor) -> torch.Tensor:
            mixse.fused_routing = fused
            slot.gates = mixse.route(hidden, 0)
            return slot.column_gates(slot.columns_of, hidden.dtype)

        return call

    out: dict[str, Any] = {"experts": len(mixse.experts), "columns": slot.columns_of.column_expert.numel()}
    rows = {}
    with torch.inference_mode():
        for tokens in TOKENS:
            count = max(2, min(64, -(-4 * L2_BYTES // (tokens * width * dtype.itemsize))))
            gen = torch.Generator(device=ctx.device).manual_seed(tokens)
            buffers = [torch.randn(tokens, width, generator=gen, device=ctx.device, dtype=dtype) for _ in range(count)]
            row: dict[str, Any] = {
                "read_us": replayed_us(lambda b: b.sum(dtype=torch.float32), buffers),
                "torch_us": replayed_us(route(False), buffers),
            }
            if routing_kernel.available(buffers[0], mixse.router.layer_weight(0)):
                row["kernel_us"] = replayed_us(route(True), buffers)
                row["torch_over_kernel"] = row["torch_us"] / row["kernel_us"]
                columns = {fused: route(fused)(buffers[0]).float() for fused in (True, False)}
                # More than a rounding apart (a bf16 ulp: 2**-7 relative): another expert picked, a near-tie.
                apart = (columns[True] - columns[False]).abs() > 2**-7 * columns[False].abs() + 1e-6
                row["tokens_routed_apart"] = apart.any(-1).float().mean().item()
            rows[tokens] = row
            del buffers
    mixse.fused_routing = True
    out["by_tokens"] = rows
    return out


def show(result: dict[str, Any]) -> None:
    rows = [
        [t, r["read_us"], r["torch_us"], r.get("kernel_us", "-"), r.get("torch_over_kernel", "-")]
        for t, r in result.get("by_tokens", {}).items()
    ]
    table("Routing one layer (device µs)", ["tokens", "read (floor)", "torch", "kernel", "torch ÷ kernel"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "routing")
