"""selfmoe: Self-MoE, one LLM turned into a mixture of self-specialized LoRA experts (MiXSE)."""

__version__ = "0.1.0"
