"""E3: expert LoRA training MFU (target ≥ 40 %).

The expert phase's step: PEFT LoRA (r=8, alpha=16, dropout 0.05) on all seven linears of the
frozen base, adapters in float32 as PEFT makes them, Lightning's bf16-mixed autocast, train
mode, AdamW. MFU = model FLOPs per step (benchmarks.roofline.lora_training_flops_per_token) /
step time / the datasheet bf16 peak; the fraction of the measured matmul ceiling is shown too.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import Context, cli_main, table
from benchmarks.roofline import H200_PEAK_BF16_FLOPS, linear_params, lora_training_flops_per_token
from benchmarks.shapes import TARGETS, shared_copy
from benchmarks.timing import time_fn

EXPERT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}  # configs/base.yaml expert.lora


def run(ctx: Context, *, peak_flops: float = H200_PEAK_BF16_FLOPS, measured_matmul: float | None = None) -> dict:
    """The expert step as configured, then two diagnostic variants that show where its time goes."""
    out = {"as_configured": _measure(ctx, peak_flops, measured_matmul)}
    # PEFT casts every LoRA input to the adapters' float32; under autocast the GEMM casts it back.
    out["no_input_cast"] = _measure(ctx, peak_flops, measured_matmul, cast_input=False)
    return out


def _measure(
    ctx: Context, peak_flops: float, measured_matmul: float | None, *, cast_input: bool = True, dropout: float = 0.05
) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    s = ctx.settings
    lora_config = LoraConfig(target_modules=list(TARGETS), **{**EXPERT_LORA, "lora_dropout": dropout})
    model = get_peft_model(shared_copy(ctx.model), lora_config)
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = cast_input
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    ids = ctx.input_ids(s.expert_batch, s.expert_len, seed=3)
    device = ctx.device.type

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_fn(step, device=ctx.device, iters=s.iters, warmup=s.warmup)
    f = ctx.facts
    lora = sum(p.numel() for p in params)
    flops_token = lora_training_flops_per_token(
        linear_params(ctx.model), lora, f["layers"], f["heads"] * f["head_dim"], s.expert_len
    )
    tokens = ids.numel()
    achieved = flops_token * tokens / (t.median_ms / 1e3)
    out = {
        "cast_input": cast_input,
        "lora_dropout": dropout,
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
        [name, r["timing"].median_ms, r["tokens_per_s"], r["achieved_flops"] / 1e12, r["mfu"]]
        for name, r in result.items()
        if isinstance(r, dict) and "timing" in r
    ]
    table("E3 expert LoRA training", ["variant", "median ms", "tokens/s", "TFLOP/s", "MFU"], rows)


if __name__ == "__main__":
    cli_main(__doc__, run, show, "e3_expert")
