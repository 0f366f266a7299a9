"""``python -m benchmarks``: every benchmark in one run, one JSON file (what docs/performance.md reports).

The primary shape (Llama-3-8B) runs E1-E5, the kernel profile and the routing kernel by token
count; the secondary (Gemma-7B) runs the parts named by ``--secondary-parts`` (E1 and E4 by
default, no peers). Ceilings (copy bandwidth, matmul rate) are measured first and used by every
roofline. Results are written after each part, so a failure late in the run keeps the earlier
numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import e1_prefill, e2_router, e3_expert, e4_decode, e5_selfgen, kernels, routing
from benchmarks.common import (
    Settings,
    apply_cli_args,
    console,
    environment,
    free_memory,
    guarded,
    make_context,
    parser,
    quick,
    write_json,
)
from benchmarks.roofline import Ceilings, measure_ceilings

PARTS = ("e1", "e4", "e2", "e3", "kernels", "routing", "e5")


def run_parts(settings: Settings, parts: list[str], ceilings: Ceilings | None, results: dict, out: Path | None) -> None:
    started = time.perf_counter()
    ctx = make_context(settings)
    shape = results.setdefault(settings.shape, {"facts": ctx.facts, "settings": settings.__dict__})
    console.print(f"[bold]{settings.shape}[/bold]: built in {time.perf_counter() - started:.1f} s")
    bw = ceilings.copy_bytes_per_s if ceilings else None
    calls = {
        "e1": lambda: e1_prefill.run(ctx),
        "e2": lambda: e2_router.run(ctx),
        "e3": lambda: e3_expert.run(ctx, measured_matmul=ceilings.matmul_flops if ceilings else None),
        "e4": lambda: e4_decode.run(ctx, bytes_per_s=bw),
        "e5": lambda: e5_selfgen.run(ctx, bytes_per_s=bw),
        "kernels": lambda: kernels.run(ctx),
        "routing": lambda: routing.run(ctx),
    }
    shows = {"e1": e1_prefill.show, "e2": e2_router.show, "e3": e3_expert.show, "e4": e4_decode.show}
    shows |= {"e5": e5_selfgen.show, "kernels": kernels.show, "routing": routing.show}
    for part in parts:
        t0 = time.perf_counter()
        shape[part] = result = guarded(part, calls[part])
        shape[part + "_seconds"] = time.perf_counter() - t0
        console.print(f"{settings.shape} {part}: {shape[part + '_seconds']:.1f} s")
        guarded(f"show {part}", lambda p=part, r=result: shows[p](r) or {})
        if out:
            write_json(out, results)
    calls.clear()  # drop the closures holding the model before the next shape is built


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--secondary", default="gemma-7b", help="second shape ('' to skip)")
    p.add_argument("--secondary-parts", default="e1,e4")
    p.add_argument("--no-sweep", action="store_true")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(device=device, iters=args.iters, shape=args.shape or "llama-3-8b")
    if args.quick:
        settings = quick(settings)
    settings.sweep = not args.no_sweep
    apply_cli_args(settings, args)
    results: dict[str, Any] = {"environment": environment(), "command": " ".join(["python -m benchmarks", *_argv()])}
    ceilings = measure_ceilings(device) if device == "cuda" else None
    if ceilings:
        results["ceilings"] = {"copy_bytes_per_s": ceilings.copy_bytes_per_s, "matmul_flops": ceilings.matmul_flops}
        copy, matmul = ceilings.copy_bytes_per_s / 1e12, ceilings.matmul_flops / 1e12
        console.print(f"ceilings: copy {copy:.2f} TB/s, matmul {matmul:.0f} TFLOP/s")
    run_parts(settings, [x for x in args.parts.split(",") if x], ceilings, results, args.out)
    free_memory()
    if args.secondary and not args.quick:
        second = Settings(**{**settings.__dict__, "shape": args.secondary, "peers": False, "sweep": False})
        run_parts(second, [x for x in args.secondary_parts.split(",") if x], ceilings, results, args.out)
    if args.out:
        write_json(args.out, results)
        console.print(f"results: {args.out}")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
