"""E3: expert LoRA training MFU (target ≥ 40 %).

The expert phase's step: LoRA (r=8, alpha=16, dropout 0.05) on all seven linears of the frozen
base, adapters in float32 as PEFT makes them, built by the phase's own ``expert_model`` (the lean
LoRA forward and PEFT's input cast off under bf16-mixed, selfmoe/models/lora_train.py; on a GPU
every decoder layer compiled, selfmoe/models/compiling.py), the phase's autocast, train mode,
AdamW. Variants switch the compile, then the lean forward, off; PEFT stock (``get_peft_model``
and nothing else) is timed beside it. MFU = model FLOPs per step
(benchmarks.roofline.lora_training_flops_per_token) / step time / the datasheet bf16 peak; the
fraction of the measured matmul ceiling is shown too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import Context, cli_main, table
from benchmarks.roofline import H200_PEAK_BF16_FLOPS, linear_params, lora_training_flops_per_token
from benchmarks.shapes import shared_copy
from benchmarks.timing import synchronize, time_fn
from selfmoe.config import Config, available, load_config
from selfmoe.models.lora_train import autocast_precision

EXPERT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}  # configs/base.yaml expert.lora

# Label shown for each variant (the result keys stay machine-friendly).
LABELS = {
    "as_configured": "as configured",
    "compile_off": "expert.compile=false",
    "fused_lora_off": "expert.fused_lora=false",
    "peft_stock": "PEFT stock",
}


def expert_config(ctx: Context) -> Config:
    """The expert phase's config for this run: the shape's model preset and the device's trainer."""
    return phase_config(ctx.settings.shape, ctx.device)


def phase_config(shape: str, device: torch.device) -> Config:
    model = shape if shape in available("model") else "llama-3-8b"
    trainer = "gpu" if device.type == "cuda" else "cpu"
    return load_config("expert", [f"model={model}", f"trainer={trainer}"])


def run(ctx: Context, *, peak_flops: float = H200_PEAK_BF16_FLOPS, measured_matmul: float | None = None) -> dict:
    """The expert step as the phase runs it, then the variants that show what each change gives."""
    from peft import get_peft_model

    from selfmoe.phases.expert import expert_model, lora_config

    cfg = expert_config(ctx)
    builders: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
        "as_configured": lambda base: expert_model(cfg, base),  # compiled on a GPU (expert.compile)
        "compile_off": lambda base: expert_model(cfg, base, compile=False),
        # PEFT's forward, with its input cast still off under autocast (and no compile).
        "fused_lora_off": lambda base: expert_model(
            replace(cfg, expert=replace(cfg.expert, fused_lora=False)), base, compile=False
        ),
        "peft_stock": lambda base: get_peft_model(base, lora_config(cfg)),
    }
    out: dict[str, Any] = {"precision": cfg.trainer.precision}
    for name, build in builders.items():
        out[name] = _measure(ctx, cfg, build, peak_flops, measured_matmul)
    return out


def _measure(
    ctx: Context,
    cfg: Config,
    build: Callable[[torch.nn.Module], torch.nn.Module],
    peak_flops: float,
    measured_matmul: float | None,
) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from selfmoe.models.lora_train import lean_layers

    s = ctx.settings
    model = build(shared_copy(ctx.model))
    model.train()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.expert.lr)
    ids = ctx.input_ids(s.expert_batch, s.expert_len, seed=3)
    device = ctx.device.type
    precision = cfg.trainer.precision
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=autocast_precision(precision)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()  # the first step: where a compiled model compiles
    synchronize(ctx.device)
    first_step_s = time.perf_counter() - started
    t = time_fn(step, device=ctx.device, iters=s.iters, warmup=s.warmup)
    f = ctx.facts
    lora = sum(p.numel() for p in params)
    flops_token = lora_training_flops_per_token(
        linear_params(ctx.model), lora, f["layers"], f["heads"] * f["head_dim"], s.expert_len
    )
    tokens = ids.numel()
    achieved = flops_token * tokens / (t.median_ms / 1e3)
    out = {
        "lean_lora_layers": len(lean_layers(model)),
        "first_step_s": first_step_s,
        "lora_layers": len(layers),
        "cast_input": any(m.cast_input_dtype_enabled for m in layers),
        "lora_dropout": cfg.expert.lora.dropout,
        "tokens_per_step": tokens,
        "batch": s.expert_batch,
        "seq_len": s.expert_len,
        "lora_params": lora,
        "linear_params": linear_params(ctx.model),
        "timing": t,
        "tokens_per_s": t.per_second(tokens),
        "flops_per_token": flops_token,
        "achieved_flops": achieved,
        "peak_flops": peak_flops,
        "mfu": achieved / peak_flops,
    }
    if measured_matmul:
        out["fraction_of_measured_matmul"] = achieved / measured_matmul
    return out


def show(result: dict[str, Any]) -> None:
    rows = [
        [LABELS.get(name, name), r["timing"].median_ms, r["tokens_per_s"], r["achieved_flops"] / 1e12, r["mfu"]]
        for name, r in result.items()
        if isinstance(r, dict) and "timing" in r
    ]
    table("E3 expert LoRA training", ["variant", "median ms", "tokens/s", "TFLOP/s", "MFU"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e3_expert")
