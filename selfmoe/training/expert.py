"""ExpertLitModule: train one PEFT LoRA adapter on a frozen base model (PAPER §1.2)."""

from __future__ import annotations

from selfmoe.training.sft import SFTLitModule, trainable_parameters

__all__ = ["ExpertLitModule", "trainable_parameters"]


class ExpertLitModule(SFTLitModule):
    """Only the LoRA matrices train; the model is in train mode so LoRA dropout is active."""

    def check_trainable(self, names: list[str]) -> None:
        bad = [n for n in names if "lora_" not in n]
        assert not bad, f"only LoRA weights may be trainable, found {bad[:3]}"
