"""SFTLitModule: what the expert and router phases share.

Response-only NLL on a model whose frozen part never enters a checkpoint: checkpoints hold the
trainable weights only (and the RNG state, so a resumed run draws the same dropout masks),
and load non-strictly for that reason. Subclasses say which parameters may train and what
the model mode is during training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from transformers import get_cosine_schedule_with_warmup

from selfmoe.config import OptimConfig
from selfmoe.data.sft import IGNORE_INDEX


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL over the batch's response tokens (HF shifts the labels)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.val_nll.update(loss.detach().float(), weight=tokens)
        self.log("val/loss", self.val_nll, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = list(trainable_parameters(self.model).values())
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_schedule_with_warmup(opt, int(self.optim.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{n}" for n in trainable_parameters(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rng_state")
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
