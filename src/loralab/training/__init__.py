"""Training: the loop, optimizers and schedules, checkpoints, seeding, and the one-run recipe."""
