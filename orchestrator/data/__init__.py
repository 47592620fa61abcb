"""Data layer: shard writer, synthetic dataset, streaming reader and transforms."""
