"""Fine-tuning: run setup and records (trainer), the loop (loop), reporting (callbacks),
losses, optimizers and schedules (optim), augmentation, runtime and checkpoint/resume."""
