"""RouterLitModule: train MiXSE's router on the union of the domains' data (PAPER §1.3)."""

from __future__ import annotations

import torch

from selfmoe.config import RouterConfig
from selfmoe.models.mixse import expert_parameters
from selfmoe.models.router import load_balancing_loss
from selfmoe.training.sft import LossTerms, SFTLitModule


class RouterLitModule(SFTLitModule):
    """Response NLL (+ optional load balancing); the base and experts stay frozen and in eval mode.

    Only ``model.mixse.router`` may train, or the experts too for the joint-training ablation.
    """

    def __init__(self, model: torch.nn.Module, cfg: RouterConfig) -> None:
        self.train_experts = cfg.train_experts
        super().__init__(model, cfg)
        self.aux_loss_coef = cfg.aux_loss_coef

    @property
    def mixse(self):
        return self.model.mixse

    def check_trainable(self, names: list[str]) -> None:
        allowed = {f"mixse.router.{n}" for n, _ in self.model.mixse.router.named_parameters()}
        if self.train_experts:
            ids = {id(p) for p in expert_parameters(self.model)}
            allowed |= {n for n, p in self.model.named_parameters() if id(p) in ids}
        bad = [n for n in names if n not in allowed]
        assert not bad, f"only the router may be trainable, found {bad[:3]}"

    def set_train_mode(self) -> None:
        # No dropout anywhere: the frozen base and experts are used exactly as at inference.
        self.model.eval()

    def on_train_epoch_start(self) -> None:
        self.set_train_mode()

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        if not self.aux_loss_coef:
            return self.nll(batch)
        self.mixse.collect_aux = True
        try:
            terms = self.nll(batch)
            aux = torch.stack(
                [load_balancing_loss(p, g, batch["attention_mask"]) for p, g in self.mixse.aux_records if p is not None]
            ).mean()
        finally:
            self.mixse.collect_aux = False
        self.log("train/aux_loss", aux, batch_size=batch["input_ids"].shape[0])
        # A mean over the micro-batches of the step: the balance of a micro-batch is not additive.
        terms.penalty = self.aux_loss_coef * aux
        return terms
