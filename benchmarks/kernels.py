"""Where the time goes: device kernels per decoder layer and their time, from torch.profiler.

Profiles one eager decode step (batch 1) and one prefill forward of the base, MiXSE's fast path
(the default, each other epilogue, torch routing) and its reference path; reports
kernels per layer and the kernels MiXSE adds, by name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Context, cli_main, table
from benchmarks.decode import DecodeRunner
from benchmarks.variants import MixsePath, make_mixse, mixse_paths
from selfmoe.models.mixse import RouterSettings


def kernel_profile(fn, device: torch.device) -> dict[str, Any]:
    """Kernel launches (count, by name) and their summed device time for one call of ``fn``."""
    fn()  # warm: lazy init stays out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    names: Counter[str] = Counter()
    times: Counter[str] = Counter()
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            name = evt.name[:90]
            names[name] += 1
            times[name] += getattr(evt, "device_time_total", 0.0) / 1e3
    return {
        "kernels": sum(names.values()),
        "device_ms": sum(times.values()),
        "by_name": dict(names.most_common()),
        "ms_by_name": {k: round(v, 4) for k, v in times.most_common()},
    }


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    layers = ctx.facts["layers"]
    mixse = make_mixse(ctx.model, ctx.experts, RouterSettings(top_k=s.top_k))
    ids = ctx.input_ids(s.prefill_batch, s.prefill_len)  # the E1 forward
    out: dict[str, Any] = {"layers": layers}
    variants = {"base": (ctx.model, MixsePath())} | {k: (mixse, p) for k, p in mixse_paths().items()}
    for phase in ("decode", "prefill"):
        rows = {}
        for name, (model, path) in variants.items():
            with path.on(model):
                if phase == "decode":
                    runner = DecodeRunner(model, 1, s.decode_context, max_steps=8)
                    prof = kernel_profile(runner.step, ctx.device)
                else:
                    prof = kernel_profile(lambda m=model: _forward(m, ids), ctx.device)
            prof["kernels_per_layer"] = prof["kernels"] / layers
            rows[name] = prof
        for name in list(variants)[1:]:
            extra_ms = Counter(rows[name]["ms_by_name"])
            extra_ms.subtract(rows["base"]["ms_by_name"])
            rows[name]["extra_ms_by_name"] = {k: round(v, 4) for k, v in extra_ms.most_common(25)}
            extra = Counter(rows[name]["by_name"])
            extra.subtract(rows["base"]["by_name"])
            rows[name]["extra_by_name"] = {k: v for k, v in extra.most_common() if v > 0}
            rows[name]["extra_kernels_per_layer"] = (rows[name]["kernels"] - rows["base"]["kernels"]) / layers
        out[phase] = rows
    # Where a large decode batch spends its time (the base alone): attention over the cache.
    for batch in (16, 128):
        runner = DecodeRunner(ctx.model, batch, s.decode_context, max_steps=8)
        prof = kernel_profile(runner.step, ctx.device)
        prof["by_name"] = dict(list(prof["by_name"].items())[:25])
        prof["ms_by_name"] = dict(list(prof["ms_by_name"].items())[:25])
        out[f"decode_base_batch{batch}"] = prof
        del runner
    return out


@torch.inference_mode()
def _forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids)


def show(result: dict[str, Any]) -> None:
    rows = []
    for phase in ("decode", "prefill"):
        for name, prof in result.get(phase, {}).items():
            rows.append([phase, name, prof["kernels"], prof["kernels_per_layer"], prof["device_ms"]])
    table("Kernels per step (eager, batch 1)", ["phase", "variant", "kernels", "per layer", "device ms"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "profile")
