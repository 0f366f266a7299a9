"""Seeds, prompts, self-generation, filters and the SFT data shared by the training phases."""
