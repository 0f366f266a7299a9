"""Which expert MiXSE uses on each benchmark: the paper's routing analysis (PAPER §2).

After lm-eval has scored a MiXSE target, a *routing pass* runs the model once more over the
texts lm-eval evaluated (per task, up to ``eval.routing_docs`` documents: the prompt with its
gold continuation for scored tasks, the prompt with the model's answer for generated ones),
with MiXSE recording its per-layer router outputs. Padding is masked exactly, which lm-eval's
own batches would not allow (its loglikelihood batches are right-padded with token 0 and carry
no attention mask). For each task the :class:`RoutingRecorder` averages over real tokens:

- ``probs``: the router's softmax weights over experts, per layer ``(L, N)`` and overall ``(N,)``
  (the mean over layers); each row sums to 1. This is what the paper's figure shows.
- ``gates``: the weights actually applied (zero outside the top-k), likewise.
- ``top1``: the share of tokens whose largest weight goes to each expert.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from selfmoe.models.mixse import RoutingRecord
from selfmoe.plots import heatmap_png

STATS = ("probs", "gates", "top1")


class RoutingRecorder:
    """Token-averaged routing per task, from MiXSE's per-layer records and a real-token mask."""

    def __init__(self, experts: Sequence[str], num_layers: int) -> None:
        self.experts = list(experts)
        self.num_layers = num_layers
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}

    def add(self, task: str, records: Sequence[RoutingRecord | None], mask: torch.Tensor) -> None:
        """Add one forward pass: ``records`` per layer, ``mask`` (B, T) True at real tokens."""
        n = len(self.experts)
        sums = self.sums.setdefault(task, {s: torch.zeros(self.num_layers, n, dtype=torch.float64) for s in STATS})
        keep = mask.bool()
        for layer, record in enumerate(records):
            if record is None:
                raise RuntimeError(f"layer {layer} recorded no routing: was model.mixse.record on?")
            probs = record.probs[keep.to(record.probs.device)].double().cpu()  # (tokens, N)
            gates = record.gates[keep.to(record.gates.device)].double().cpu()
            sums["probs"][layer] += probs.sum(0)
            sums["gates"][layer] += gates.sum(0)
            sums["top1"][layer] += torch.bincount(probs.argmax(-1), minlength=n).double()
        self.tokens[task] = self.tokens.get(task, 0) + int(keep.sum())

    def result(self) -> dict[str, dict[str, Any]]:
        """Per task: ``tokens`` and, per statistic, ``layers`` (L x N) and ``overall`` (N) averages."""
        out: dict[str, dict[str, Any]] = {}
        for task, sums in self.sums.items():
            count = max(self.tokens[task], 1)
            entry: dict[str, Any] = {"tokens": self.tokens[task]}
            for stat, total in sums.items():
                layers = total / count
                entry[stat] = {"layers": layers.tolist(), "overall": layers.mean(0).tolist()}
            out[task] = entry
        return out


def sample_text(sample: Mapping[str, Any]) -> str:
    """The text lm-eval evaluated for one logged sample (see the module docstring)."""
    args = sample["arguments"]
    first = args[0]
    if len(first) == 1:  # loglikelihood_rolling: the document itself
        return str(first[0])
    context, second = first[0], first[1]
    if isinstance(second, dict):  # generate_until: (context, generation kwargs) -> add the answer
        response = sample.get("resps", [[""]])[0]
        return str(context) + str(response[0] if isinstance(response, list) else response)
    target = sample.get("target")
    if isinstance(target, int) and 0 <= target < len(args):  # multiple choice: the gold choice
        return str(args[target][0]) + str(args[target][1])
    return str(context) + str(second)


@torch.no_grad()
def routing_pass(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Mapping[str, Iterable[str]],
    *,
    batch_size: int,
    max_length: int,
) -> RoutingRecorder:
    """Run ``model`` (a MiXSE) over each task's texts with routing recorded; returns the recorder."""
    mixse = model.mixse
    recorder = RoutingRecorder(mixse.experts, len(mixse.records))
    device = next(model.parameters()).device
    was_recording, side = mixse.record, tokenizer.padding_side
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the end: the question and the answer
    mixse.record = True
    try:
        for task, items in texts.items():
            items = list(items)
            for start in range(0, len(items), batch_size):
                batch = tokenizer(
                    items[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                ).to(device)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                recorder.add(task, mixse.records, batch["attention_mask"])
    finally:
        mixse.record, tokenizer.padding_side = was_recording, side
    return recorder


def routing_heatmap(routing: Mapping[str, Mapping[str, Any]], experts: Sequence[str], title: str) -> bytes:
    """The paper's routing figure: benchmarks as rows, experts as columns, mean router weight."""
    tasks = list(routing)
    values = torch.tensor([routing[t]["probs"]["overall"] for t in tasks], dtype=torch.float64)
    return heatmap_png(
        {"router weight (token mean)": values},
        tasks,
        experts,
        title=title,
        row_axis="benchmark",
        colorbar_label="mean router weight",
    )
