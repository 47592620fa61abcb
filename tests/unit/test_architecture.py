"""The rooms of docs/architecture.md: no module imports one in a higher room, and no modules import each other."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.conftest import ROOT


def rooms() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rooms", ROOT / "scripts" / "rooms.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_upward_or_in_a_circle() -> None:
    r = rooms()
    edges = r.imports(r.modules())
    assert r.upward(edges) == [] and r.cycles(edges) == []
    assert "orchestrator.train.loop" not in edges["orchestrator.launch.ray_train"]  # the work comes as a value
    assert len(edges) > 60 and sum(map(len, edges.values())) > 300  # it read the whole code base


def test_the_check_finds_an_upward_import_and_a_circle() -> None:
    r = rooms()
    assert r.upward({"orchestrator.storage": {"orchestrator.launch.local"}, "orchestrator.launch.local": set()}) == [
        "orchestrator.storage (storage) imports orchestrator.launch.local (launch)"]
    assert r.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
