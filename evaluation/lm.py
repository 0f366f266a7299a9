"""The lm-eval model ``selfmoe``: any target of this project, handed to lm-eval in memory.

It is lm-eval's own ``HFLM`` (so loglikelihoods, batching and generation are lm-eval's) around
a model object that :mod:`evaluation.targets` builds from config. Three ways to use it:

- ``make eval`` / ``python -m selfmoe eval`` (the runner builds it with the resolved config);
- Python: ``import evaluation.lm`` registers it, then
  ``lm_eval.simple_evaluate(model="selfmoe", model_args="target=mixse,model=tiny", ...)``;
- the stock CLI, through our thin entry point that imports the registration first:
  ``python -m evaluation.cli run --model selfmoe --model_args target=expert:math,model=gemma-7b
  --tasks gsm8k_cot``. ``overrides`` takes space-separated config ``key=value`` pairs
  (``--model_args "target=mixse,overrides=output_dir=runs/a router.name=mixse-top2"``).

With ``eval.cuda_graphs`` on a GPU, loglikelihood scoring forwards are replayed from CUDA graphs
(:mod:`selfmoe.models.graphed`); generation stays lm-eval's own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from evaluation.targets import BuiltTarget, build_target, parse_target
from selfmoe.config import Config, load_config
from selfmoe.models.graphed import Buckets, GraphedLM, max_positions


def default_device(cfg: Config) -> str:
    """The GPU of this process (``LOCAL_RANK``) when the trainer config asks for GPUs and there is
    one, else the CPU."""
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    if not (wants_gpu and torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def scoring_runner(model: torch.nn.Module, enabled: bool, batch_size: int | str | None) -> GraphedLM | None:
    """The CUDA-graph runner for scoring forwards, or None when switched off or not on a GPU."""
    first = next(model.parameters(), None)
    if not enabled or first is None or first.device.type != "cuda":
        return None
    # Full batches keep their size, and a shorter last batch rounds up to a power of two.
    usual = batch_size if isinstance(batch_size, int) else None
    return GraphedLM(model, buckets=Buckets(batch_size=usual, max_length=max_positions(model)))


@register_model("selfmoe")
class SelfMoELM(HFLM):
    """``HFLM`` over a target built from config (see :mod:`evaluation.targets`)."""

    def __init__(
        self,
        target: str = "base",
        model: str | None = None,
        overrides: str = "",
        cfg: Config | None = None,
        built: BuiltTarget | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        if cfg is None:
            cfg = load_config("eval", ([f"model={model}"] if model else []) + overrides.split())
        if built is None:
            built = build_target(cfg, parse_target(target, cfg), device or default_device(cfg))
        self.cfg, self.built = cfg, built
        # A model object makes HFLM single-process and ignore `device`; the rest are lm-eval's own.
        super().__init__(
            pretrained=built.model,
            tokenizer=built.tokenizer,
            batch_size=batch_size or cfg.eval.batch_size,
            max_length=max_length or cfg.eval.max_length or cfg.model.max_length,
            **kwargs,
        )
        self.scorer = scoring_runner(self.model, cfg.eval.cuda_graphs, self.batch_size)

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The loglikelihood path of a causal LM passes neither a mask nor labels. HFLM's autocast
        # option stays eager, because autocast's cached weight casts do not belong in a graph.
        if self.scorer is None or attn_mask is not None or labels is not None or self.mixed_precision_dtype is not None:
            return super()._model_call(inps, attn_mask, labels)
        # No copy: lm-eval takes log_softmax of the logits before its next call.
        return self.scorer(inps, copy=False)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # The probe halves the batch after each out-of-memory error. An OOM in the middle of a
        # capture would leave the graph half built, so the probe runs eagerly.
        scorer, self.scorer = self.scorer, None
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self.scorer = scorer
