"""InceptionNeXt model factory and weight loading (timm's implementation)."""

from model.factory import create_model
from model.weights import load_weights, resolve_init

__all__ = ["create_model", "load_weights", "resolve_init"]
