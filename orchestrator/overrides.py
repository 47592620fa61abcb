"""The one ``--set`` syntax of every entry point: ``[STAGE:]section.key=value``, the value read as YAML.

``--set a.b=1 c.d=2`` and ``--set a.b=1 --set c.d=2`` are the same. Recipes take ``section.key``;
sweeps also ``sweep.field``; pipelines also ``STAGE:section.key`` for one stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator.errors import RecipeError


@dataclass(frozen=True)
class Override:
    key: str  # dotted: section.key (or sweep.field)
    value: Any
    origin: str = "--set"  # where it came from, for error messages
    scope: str | None = None  # STAGE of STAGE:section.key=value

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1] if "." in self.key else ""


def parse(texts: Iterable[str | Override], origin: str = "--set") -> list[Override]:
    """Parse ``[STAGE:]section.key=value`` strings (Override objects pass through)."""
    out = []
    for text in texts:
        if isinstance(text, Override):
            out.append(text)
            continue
        target, sep, raw = text.partition("=")
        scope, _, key = target.rpartition(":")
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise RecipeError(f"{origin} {text!r}: expected section.key=value (e.g. optimizer.lr=2e-3)"
                              + (", or STAGE:section.key=value in a pipeline" if scope else ""))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{origin} {text!r}: the value is not valid YAML ({exc.problem})") from exc
        out.append(Override(key, value, origin, scope or None))
    return out


def from_mapping(values: dict[str, Any], origin: str) -> list[Override]:
    """``{"section.key": value}`` from a file (a pipeline stage's ``set:``, a sweep's proxy)."""
    for key in values:
        if not isinstance(key, str) or key.count(".") != 1:
            raise RecipeError(f"{origin}: {key!r}: expected section.key")
    return [Override(k, v, origin) for k, v in values.items()]
