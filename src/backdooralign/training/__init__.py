"""Fine-tuning: the trainer (TrainConfig), the loss, distillation and the provider's alignment
stage."""
