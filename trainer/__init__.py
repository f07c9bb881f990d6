"""Training: experiment config, DeepSpeed engine, the train loop, checkpoints, logging; and the two entry points,
the `music2vec` command line (trainer.cli) and the demo job (trainer.demo)."""
