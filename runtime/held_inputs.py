"""TorchScript entry points that hand their inputs back with their output, so a forward run
from Python takes the GIL only to return.

A TorchScript forward runs without the GIL, but when its interpreter drops its last reference
to an input made in Python, the input's Python object is released, and that needs the GIL: the
forward waits there for up to the switch interval (5 ms) whenever another thread of the process
runs Python, as a worker's event loop does. An input the forward returns is still referenced
when the forward ends, so it is released back in Python, under the GIL. Ranker, 1,600 rows,
beside a Python-busy thread: 20.6-23.1 ms as exported, 8.2-9.3 ms held (the one wait left is
the return's); 5.6-7.0 ms alone (benchmarks/README.md).

The wrapped entry point is typed by an interface (`QueryTower`, `Ranker`), so every wrapper of a
kind compiles to one TorchScript type: typed by the entry point's own class, each load added a
type that kept ~20 MiB per upgrade cycle alive (tests/integration/test_upgrade_memory.py).
(Not `from __future__ import annotations`: TorchScript reads the signatures.)
"""

from collections.abc import Callable

import torch


@torch.jit.interface
class QueryTower(torch.nn.Module):
    """What a query tower entry point computes (an interface: any module that has it)."""

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pass


@torch.jit.interface
class Ranker(torch.nn.Module):
    """What a ranker entry point computes (an interface: any module that has it)."""

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        pass


class QueryTowerCall(torch.nn.Module):
    """The query tower's (values, lengths) -> embeddings, returning the inputs after it."""

    entry_point: QueryTower

    def __init__(self, entry_point: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.entry_point = entry_point

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.entry_point(values, lengths), values, lengths


class RankerCall(torch.nn.Module):
    """The ranker's (dense, values, lengths) -> logits, returning the inputs after it."""

    entry_point: Ranker

    def __init__(self, entry_point: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.entry_point = entry_point

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.entry_point(dense, values, lengths), dense, values, lengths


def held(
    entry_point: Callable[..., torch.Tensor], call: type[torch.nn.Module]
) -> torch.jit.ScriptModule | None:
    """`entry_point` wrapped in `call` and scripted when it is TorchScript; else None (an
    AOTInductor package is not run by TorchScript's interpreter)."""
    if not isinstance(entry_point, torch.jit.ScriptModule):
        return None
    return torch.jit.script(call(entry_point))


def output_of(
    entry_point: Callable[..., torch.Tensor], call: type[torch.nn.Module]
) -> Callable[..., torch.Tensor]:
    """A callable with `entry_point`'s signature and output that runs it held when it can."""
    wrapped = held(entry_point, call)
    if wrapped is None:
        return entry_point
    return lambda *inputs: wrapped(*inputs)[0]
