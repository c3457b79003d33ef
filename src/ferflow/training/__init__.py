"""Fine-tuning: the loop, losses, schedules, augmentation and checkpoint/resume."""
