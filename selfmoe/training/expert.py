"""ExpertLitModule: train one PEFT LoRA adapter on a frozen base model (PAPER §1.2)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel
from torchmetrics import MeanMetric
from transformers import get_cosine_schedule_with_warmup

from selfmoe.config import TrainConfig
from selfmoe.data.sft import IGNORE_INDEX


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class ExpertLitModule(L.LightningModule):
    """Response-only NLL on a PEFT model whose only trainable weights are the LoRA matrices.

    Checkpoints hold the trainable weights only (a few MB, never the frozen base), and load
    non-strictly for that reason.
    """

    def __init__(self, model: PeftModel, optim: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.strict_loading = False  # checkpoints carry the adapter only
        trainable = trainable_parameters(model)
        bad = [n for n in trainable if "lora_" not in n]
        assert not bad, f"only LoRA weights may be trainable, found {bad[:3]}"
        self.num_trainable = sum(p.numel() for p in trainable.values())
        self.num_total = sum(p.numel() for p in model.parameters())
        # Token-weighted, so val/loss is the held-out NLL per response token whatever the padding.
        self.val_nll = MeanMetric()

    def on_fit_start(self) -> None:
        # from_pretrained leaves the base in eval mode and Lightning restores, not sets, module
        # modes: switch to train explicitly so LoRA dropout is active.
        self.model.train()
        share = 100 * self.num_trainable / self.num_total
        rank_zero_info(f"trainable parameters: {self.num_trainable:,} of {self.num_total:,} ({share:.3f}%)")
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": self.num_trainable, "params/total": self.num_total}, step=0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean NLL over the batch's response tokens (HF shifts the labels)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
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
        # LoRA dropout draws from the global RNG: saving its state makes a resumed run take the
        # same dropout masks as an uninterrupted one.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rng_state")
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
