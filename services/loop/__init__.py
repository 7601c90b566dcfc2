"""The RL loop: the Trainer and its step pieces, evaluation, checkpoints, run outputs and metrics."""
