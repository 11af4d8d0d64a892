"""One LightningModule per distillation method, all on `DistillationModule`."""
