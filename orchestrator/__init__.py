"""InceptionNeXt training orchestration: data shards, recipes, one training loop, launchers."""

__version__ = "0.1.0"
