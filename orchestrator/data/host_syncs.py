"""What would make a CUDA host wait for the device, counted on any device (this machine's CPU included).

A steady-state step must read nothing back from the device (README, STYLE.md 15): the host then queues step
k + 1 while the device runs step k. On a GPU, ``torch.cuda.set_sync_debug_mode`` catches violations; without
one, ``HostSyncs`` follows which tensors would live on the device (the step's inputs once moved there, the
model's parameters and state, and everything computed from them) and records, as a CUDA host would meet them:

- reads of a device value on the host: ``.item()``, ``float()``/``int()``/``bool()``, ``.tolist()``,
  ``.cpu()``, ``.numpy()``;
- data-dependent shapes: ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ...;
- tensors made from Python data on the device (``torch.tensor(..., device=...)``: a blocking copy);
- copies to the device from pageable host memory (only what ``pinned`` marks is pinned: the loader's batch)
  or without ``non_blocking=True``.

Everything created while ``warming()`` (lazily made constants, cached per device) counts as on the device.
Code that pins on CUDA pins through ``orchestrator.data.device.to_device``, which under ``HostSyncs`` pins on
the CPU too (``pin_memory`` then only marks the tensor), so the CPU runs the CUDA path's copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
                  "repeat_interleave", "masked_scatter"}
FROM_PYTHON = {"tensor", "as_tensor", "asarray"}
MOVES = {"to", "cuda", "copy_"}


def _names_a_device(value: Any) -> bool:
    return isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "mps", "xpu"))


class HostSyncs(TorchFunctionMode):
    """Records what would make the host wait (``events``) in the code run under it; see the module's doc."""

    active = 0  # how many are entered: ``device.to_device`` pins while one is

    def __enter__(self) -> HostSyncs:
        HostSyncs.active += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        HostSyncs.active -= 1
        super().__exit__(*exc)

    def __init__(self) -> None:
        super().__init__()
        self.device_tensors: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.pinned_tensors: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.events: list[str] = []
        self.learning = False

    def on_device(self, *tensors: Any) -> None:
        """These live on the device (parameters, optimizer state, buffers made before the step)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.device_tensors[t] = True

    def pinned(self, *tensors: Any) -> None:
        """These host tensors are in pinned memory (what the loader hands over on CUDA)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.pinned_tensors[t] = True

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """A first call: what it creates is on the device and nothing counts (lazy, once-per-device state)."""
        self.learning = True
        try:
            yield
        finally:
            self.learning = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "pin_memory" and not torch.cuda.is_available():  # a CPU build cannot pin: mark it instead
            self.pinned(args[0])
            return args[0]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(t in self.device_tensors for t in inputs)
        to_device = name in MOVES and (name != "to" or any(_names_a_device(a) for a in (*args[1:], *kwargs.values())))
        if not self.learning:
            self._check(name, args, kwargs, inputs, from_device, to_device)
        out = func(*args, **kwargs)
        if self.learning or from_device or to_device or kwargs.get("device") is not None:
            self.on_device(out)  # computed from device data, moved there, or made there
        return out

    def _check(self, name: str, args: tuple, kwargs: dict, inputs: list[torch.Tensor], from_device: bool,
               to_device: bool) -> None:
        if from_device and name in READS:
            self.events.append(f"{name}(): reads a device value on the host")
        elif from_device and (name in DATA_DEPENDENT or (name == "__getitem__" and any(
                t.dtype == torch.bool for t in inputs[1:]))):
            self.events.append(f"{name}: an output shape that depends on device data")
        elif name in FROM_PYTHON and kwargs.get("device") is not None:
            self.events.append(f"torch.{name}(..., device=...): a tensor from Python data copied to the device")
        elif to_device:
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and source not in self.device_tensors:
                if source not in self.pinned_tensors:
                    self.events.append(f"{name}: a copy to the device from pageable host memory")
                elif not kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False):
                    self.events.append(f"{name}: a blocking copy to the device (non_blocking=False)")
