"""Training: experiment config, DeepSpeed engine, the train loop, checkpoints, logging."""
