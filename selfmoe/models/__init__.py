"""Pure torch/transformers/PEFT models: never imports Lightning."""
