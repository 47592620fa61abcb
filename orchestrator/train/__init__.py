"""The training loop and what it composes: checkpoints, metrics, the launcher context."""
