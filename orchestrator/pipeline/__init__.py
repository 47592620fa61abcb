"""Pipelines: recipes run as stages. ``spec`` reads pipeline files (no torch), ``runner`` runs their stages
through the launchers, ``command`` is ``python -m orchestrator.pipeline`` (its ``main``)."""

from orchestrator.pipeline.command import main

__all__ = ["main"]
