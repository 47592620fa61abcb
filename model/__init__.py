"""InceptionNeXt models: the factory (``model.factory``), the recipe's model section (``model.config``)
and weights parsing (``model.weight_format``). Depends on torch and timm only, never on the orchestrator."""
