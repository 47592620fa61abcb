"""Launchers: thin adapters that build a TrainContext and call the training loop."""
