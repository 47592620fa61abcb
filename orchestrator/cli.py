"""The command-line house every entry point lives in: one ``--set`` option, one logging set-up, one
error path. Errors print one line, with every known secret replaced by ``***``, and set the exit
code: 2 for bad input, 130 for Ctrl-C or a stop on request, 1 for anything else (with the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from orchestrator import logs, storage
from orchestrator.errors import OrchestratorError
from orchestrator.slurm_options import SlurmOptions


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, with Ray's and the storage libraries' INFO lines")
    return p


def add_set(p: argparse.ArgumentParser, help: str = "recipe override") -> None:
    """``--set a.b=1 c.d=2`` or ``--set a.b=1 --set c.d=2``: both give every pair."""
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"{help}; values are YAML (--set optimizer.lr=2e-3 'run.storage_options={{endpoint_url: http://...}}')")


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="fsspec option for object storage (e.g. endpoint_url=http://127.0.0.1:8333)")


def storage_options(texts: list[str]) -> dict:
    options = dict(storage.parse_option(t) for t in texts)
    storage.remember_secrets(options)
    return options


SLURM_FLAGS = [("partition", str), ("nodes", int), ("gpus-per-node", int), ("time", str), ("account", str),
               ("qos", str), ("constraint", str), ("mem", str), ("cpus-per-gpu", int), ("exclude", str),
               ("max-requeues", int), ("log-dir", str)]


def add_slurm_flags(p: argparse.ArgumentParser, title: str, nodes_flag: str = "--nodes") -> None:
    """``--partition``, ``--time``, ... (``SlurmOptions``'s fields) in a group of their own."""
    group = p.add_argument_group(title)
    for flag, kind in SLURM_FLAGS:
        group.add_argument(nodes_flag if flag == "nodes" else f"--{flag}", type=kind, dest=f"slurm_{flag.replace('-', '_')}")


def slurm_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The Slurm flags given (``add_slurm_flags``), by ``SlurmOptions`` field name."""
    given = {flag.replace("-", "_"): getattr(args, f"slurm_{flag.replace('-', '_')}") for flag, _ in SLURM_FLAGS}
    return {k: v for k, v in given.items() if v is not None}


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """``--launcher slurm``'s job options from its flags; None under another launcher."""
    return SlurmOptions(**slurm_flags(args)) if args.launcher == "slurm" else None


def run(body: Callable[[argparse.Namespace], int | None], p: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv``, set up logging, run ``body``; errors become one redacted line and an exit code."""
    args = p.parse_args(argv)
    logs.setup(args.verbose)
    try:
        return body(args) or 0
    except OrchestratorError as exc:
        print(f"error: {storage.one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the same command continues from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - an unexpected failure: its traceback, still without secrets
        print(storage.redact(traceback.format_exc()), file=sys.stderr, end="")
        print(f"error: {storage.one_line(exc)}", file=sys.stderr)
        return 1
