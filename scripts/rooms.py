"""The rooms of the code base, top to bottom, and every import between modules (counting those inside functions
and under TYPE_CHECKING): ``python scripts/rooms.py`` prints the room table of docs/architecture.md and exits
non-zero when a module imports one in a higher room (STYLE.md guideline 14) or modules import each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (room, what it holds, module prefixes), top to bottom; a module belongs to the first room with a matching prefix.
ROOMS = [
    ("entry points", "commands: parse, check (preflight), make a Job, launch it, report",
     ["orchestrator.pretrain", "orchestrator.finetune", "orchestrator.segment", "orchestrator.pipeline",
      "orchestrator.tune", "orchestrator.doctor", "orchestrator.evaluate", "orchestrator.gradcam",
      "orchestrator.seg_figure", "orchestrator.runs", "orchestrator.data.__main__", "orchestrator.cli",
      "orchestrator.sweep", "orchestrator.preflight"]),
    ("launch", "run a Job on every rank: local/torchrun, Ray Train, Slurm", ["orchestrator.launch"]),
    ("rank functions", "what a Job runs on each rank: train, probe", ["orchestrator.train.loop", "orchestrator.probe"]),
    ("components", "the loop's parts: tasks, context, checkpoints, watchdog, trackers, metrics",
     ["orchestrator.train"]),
    ("data", "shards, readers, transforms, augmentation", ["orchestrator.data"]),
    ("storage", "recipe schema, run folders, storage URLs, weights lookup, faults, errors, logging", ["orchestrator"]),
    ("model", "the network, its heads, weight formats: torch and timm only", ["model"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for pkg in ("orchestrator", "model"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = f
    return found


def room_of(module: str) -> int:
    for i, (_, _, prefixes) in enumerate(ROOMS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise ValueError(module)


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, as ``shared/hooks/import_cycles.py`` counts them."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for mod, f in mods.items():
        base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                stem = ".".join((base[: len(base) - node.level + 1] if node.level else []) + ([node.module] if node.module else []))
                names = [f"{stem}.{a.name}" for a in node.names] + [stem]
            out |= {t for n in names if (t := resolve(n)) and t != mod}
        edges[mod] = out
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules that import each other, directly or around a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({ROOMS[room_of(m)][0]}) imports {t} ({ROOMS[room_of(t)][0]})"
            for m, ts in sorted(edges.items()) for t in sorted(ts) if room_of(t) < room_of(m)]


def main() -> int:
    mods = modules()
    edges = imports(mods)
    lines = {i: 0 for i in range(len(ROOMS))}
    count = {i: 0 for i in range(len(ROOMS))}
    for m, f in mods.items():
        lines[room_of(m)] += len(f.read_text().splitlines())
        count[room_of(m)] += 1
    print(f"{'room':16s} {'modules':>7s} {'lines':>6s}  holds")
    for i, (name, holds, _) in enumerate(ROOMS):
        print(f"{name:16s} {count[i]:7d} {lines[i]:6d}  {holds}")
    bad, circles = upward(edges), cycles(edges)
    print(f"imports between modules: {sum(map(len, edges.values()))}; upward: {len(bad)}; cycles: {len(circles)}")
    for line in bad + [" -> ".join(c) for c in circles]:
        print("  " + line)
    return 1 if bad or circles else 0


if __name__ == "__main__":
    sys.exit(main())
