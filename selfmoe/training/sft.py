"""SFTLitModule: what the expert and router phases share.

Response-only NLL on a model whose frozen part never enters a checkpoint: checkpoints hold the
trainable weights only (and every rank's RNG state, so a resumed run draws the same dropout
masks), and load non-strictly for that reason. Subclasses say which parameters may train and
what the model mode is during training.

Loss normalisation. An optimizer step must follow the gradient of the *global batch's* token
mean, ``sum of token NLLs / T`` with ``T`` the response tokens of the whole global batch, at any
world size ``W`` and accumulation ``A``. Lightning divides each micro-batch loss by ``A`` and DDP
averages gradients over the ``W`` ranks, so a micro-batch returns ``nll_sum x (W x A) / T``; the
``W x A`` returned micro-batches then add up to exactly ``sum / T``. ``T`` comes with the batch
(:class:`~selfmoe.data.batching.StepPlan`), computed by every rank from the same global batch.
A per-micro-batch penalty (the router's load-balancing term) is averaged over the global
batch's non-empty micro-batches the same way: ``x (W x A) / M``. The logged ``train/loss`` is
the global batch's token mean: one scalar all-reduce per optimizer step, which is also where a
NaN or infinite loss is caught, before the optimizer step and before any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from transformers import get_cosine_schedule_with_warmup

from selfmoe.config import OptimConfig
from selfmoe.data.sft import IGNORE_INDEX
from selfmoe.training.faults import NonFiniteLossError


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the response tokens and their count; position t predicts label t + 1 (as HF)."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


@dataclass
class LossTerms:
    nll_sum: torch.Tensor  # () summed response-token NLL of the micro-batch
    tokens: torch.Tensor  # () its response tokens
    penalty: torch.Tensor | None = None  # () a per-micro-batch term, already weighted (router: aux loss)


class SFTLitModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim: OptimConfig) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.strict_loading = False  # checkpoints carry the trainable weights only
        self.check_trainable(list(trainable_parameters(model)))
        self.num_trainable = sum(p.numel() for p in trainable_parameters(model).values())
        self.num_total = sum(p.numel() for p in model.parameters())
        # Token-weighted, so val/loss is the held-out NLL per response token whatever the padding.
        self.val_nll = MeanMetric()
        self._step_nll: torch.Tensor | None = None  # this rank's NLL sum over the current step's micro-batches

    def check_trainable(self, names: list[str]) -> None:
        """Raise if a parameter that must stay frozen is trainable."""

    def set_train_mode(self) -> None:
        self.model.train()

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning restores, rather than sets,
        # module modes: choose the training mode explicitly.
        self.set_train_mode()
        share = 100 * self.num_trainable / self.num_total
        rank_zero_info(f"trainable parameters: {self.num_trainable:,} of {self.num_total:,} ({share:.3f}%)")
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": self.num_trainable, "params/total": self.num_total}, step=0)

    # -- losses --------------------------------------------------------------------------------

    def nll(self, batch: dict[str, Any]) -> LossTerms:
        """The batch's summed response NLL and its token count."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return LossTerms(*response_nll(logits, batch["labels"]))

    def loss_terms(self, batch: dict[str, Any]) -> LossTerms:
        """What a training micro-batch contributes: the NLL terms and any penalty (none here)."""
        return self.nll(batch)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean NLL over the batch's response tokens."""
        terms = self.nll(batch)
        return terms.nll_sum / terms.tokens.clamp(min=1)

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The micro-batch on its own: token-mean NLL plus penalty (for batches without a step plan)."""
        terms = self.loss_terms(batch)
        loss = terms.nll_sum / terms.tokens.clamp(min=1)
        return loss if terms.penalty is None else loss + terms.penalty

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        plan = batch.get("step")
        if plan is None:  # a plain loader: each micro-batch is its own mean
            loss = self.training_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        # What Lightning (/ accumulation) and DDP (/ world size) will divide the gradient by.
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        if batch["input_ids"].numel() == 0:
            # An empty slot of a short last global batch: no forward pass, but a zero loss that
            # reaches every trainable weight, so DDP's gradient all-reduce still happens.
            loss = sum(p.sum() for p in trainable_parameters(self.model).values()) * 0.0
            nll_sum = torch.zeros((), device=self.device)
        else:
            terms = self.loss_terms(batch)
            loss = terms.nll_sum * (scale / plan["tokens"])
            if terms.penalty is not None:
                loss = loss + terms.penalty * (scale / plan["micro_batches"])
            nll_sum = terms.nll_sum.detach()
        self._step_nll = nll_sum if plan["micro"] == 0 or self._step_nll is None else self._step_nll + nll_sum
        if plan["micro"] == plan["accumulation"] - 1:
            self._log_step_loss(plan)
        return loss

    def _log_step_loss(self, plan: dict[str, int]) -> None:
        """Log the global batch's token-mean NLL; stop (before the optimizer step) if it is not finite."""
        assert self._step_nll is not None
        total = self.trainer.strategy.reduce(self._step_nll.float(), reduce_op="sum")
        step_loss = total / plan["tokens"]
        if not torch.isfinite(step_loss):
            raise NonFiniteLossError(
                f"the training loss is {step_loss.item()} at epoch {plan['epoch']}, step {plan['step']} of the epoch "
                f"(global step {self.trainer.global_step + 1}): training stopped before this optimizer step, and the "
                "last checkpoint (from the last good step) was kept. Lower the learning rate (expert.lr / router.lr) "
                "or check the training data; a rerun with other settings starts afresh."
            )
        self.log("train/loss", step_loss, prog_bar=True, batch_size=plan["micro_batches"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.nll(batch)
        loss = terms.nll_sum / terms.tokens.clamp(min=1)
        self.val_nll.update(loss.detach().float(), weight=terms.tokens)
        self.log("val/loss", self.val_nll, prog_bar=True)
        return loss

    def on_train_end(self) -> None:
        # The step count travels with the metrics: a spawn/fork-launched fit (ddp_notebook)
        # returns only those to the main process, which writes the manifest.
        self.trainer.callback_metrics["train/steps"] = torch.tensor(float(self.trainer.global_step))

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(trainable_parameters(self.model).values())
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_schedule_with_warmup(opt, int(self.optim.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints: trainable weights + every rank's RNG -------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{n}" for n in trainable_parameters(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Every rank runs this (only rank zero writes the file), so the RNG states of all ranks
        # can be gathered: each rank draws its own dropout masks.
        checkpoint["rng_state"] = {"torch": self._gather(torch.get_rng_state())}
        if torch.cuda.is_available() and self.device.type == "cuda":
            checkpoint["rng_state"]["cuda"] = self._gather(torch.cuda.get_rng_state(self.device))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rng_state")
        if not state:
            return
        torch.set_rng_state(_for_rank(state["torch"], self.global_rank))
        if "cuda" in state and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(_for_rank(state["cuda"], self.global_rank), self.device)

    def _gather(self, state: torch.Tensor) -> list[torch.Tensor]:
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        local = state.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(gathered, local)
        return [s.cpu() for s in gathered]


def _for_rank(states: torch.Tensor | list[torch.Tensor], rank: int) -> torch.Tensor:
    """This rank's saved RNG state (rank zero's when the run had fewer ranks, or the old format)."""
    if isinstance(states, torch.Tensor):
        return states
    return states[rank] if rank < len(states) else states[0]
