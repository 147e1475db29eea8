"""Held entry points answer as the exported ones do, and hand the very input tensors back."""

from __future__ import annotations

import torch

from recship.runtime.held_inputs import QueryTowerCall, RankerCall, held


class Tower(torch.nn.Module):
    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return (values.float().sum() + lengths.float()).unsqueeze(1)


class Ranker(torch.nn.Module):
    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return dense.sum(1) * lengths[: dense.shape[0]].float() + values.float().mean()


def test_a_held_entry_point_answers_as_the_exported_one_and_returns_its_inputs() -> None:
    values, lengths, dense = torch.arange(6), torch.tensor([1, 2, 3]), torch.rand(3, 4)
    for call, module, inputs in (
        (QueryTowerCall, torch.jit.script(Tower()), (values, lengths)),
        (RankerCall, torch.jit.script(Ranker()), (dense, values, lengths)),
    ):
        wrapped = held(module, call)
        assert wrapped is not None
        with torch.inference_mode():
            output, *returned = wrapped(*inputs)
            assert torch.equal(output, module(*inputs))
        assert all(a is b for a, b in zip(returned, inputs, strict=True))


def test_an_entry_point_torchscript_does_not_run_is_called_as_it_is() -> None:
    assert held(lambda values, lengths: values, QueryTowerCall) is None
