"""Lightning glue: the LightningModules of the training phases and the Trainer factory."""
