"""Functional LoRA: adds B·A·x to target modules' outputs, only inside an explicit ``with`` scope.

The base weights are never copied or modified. Inside ``lora_scope`` a forward hook on each target
module adds the low-rank update; leaving the scope removes the hooks, so the base model's outputs
are restored bit for bit. A batch may carry a different adapter per row (the serving case): the
per-row A and B are zero-padded to a common rank and applied with one batched matmul per module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch

LoraPair = tuple[torch.Tensor, torch.Tensor]
"""(A, B): A is (R, d_in) or (batch, R, d_in); B is (d_out, R) or (batch, d_out, R)."""


class HasLoraWeights(Protocol):
    @property
    def weights(self) -> Mapping[str, LoraPair]: ...


AdapterLike = HasLoraWeights | Mapping[str, LoraPair]


def weights_of(adapter: AdapterLike) -> Mapping[str, LoraPair]:
    return adapter if isinstance(adapter, Mapping) else adapter.weights


def is_per_row(adapters: AdapterLike | Sequence[AdapterLike | None] | None) -> bool:
    """True for a sequence with one adapter (or None) per batch row, False for one shared adapter."""
    return isinstance(adapters, Sequence) and not isinstance(adapters, Mapping)


def rows_of(adapters: AdapterLike | Sequence[AdapterLike | None] | None, n: int) -> list[AdapterLike | None]:
    """The adapter of each of ``n`` rows, whether given per row, shared, or None."""
    return list(adapters) if is_per_row(adapters) else [adapters] * n  # type: ignore[arg-type, list-item]


def stack_per_row(adapters: Sequence[AdapterLike | None]) -> dict[str, LoraPair]:
    """Batch one adapter per row into (batch, R_max, d_in) / (batch, d_out, R_max), zero-padded.

    A ``None`` row gets all-zero factors, i.e. the plain base model. Zero rows of A contribute
    exactly nothing, so padding never changes a row's output.
    """
    present = [weights_of(a) for a in adapters if a is not None]
    if not present:
        raise ValueError("stack_per_row needs at least one adapter (use no scope for a plain batch)")
    modules = sorted(present[0])
    for weights in present[1:]:
        if sorted(weights) != modules:
            raise ValueError("adapters in one batch must target the same modules")
    stacked: dict[str, LoraPair] = {}
    for name in modules:
        ref_a, ref_b = present[0][name]
        max_rank = max(w[name][0].shape[0] for w in present)
        a_rows = ref_a.new_zeros(len(adapters), max_rank, ref_a.shape[1])
        b_rows = ref_b.new_zeros(len(adapters), ref_b.shape[0], max_rank)
        for row, adapter in enumerate(adapters):
            if adapter is None:
                continue
            a, b = weights_of(adapter)[name]
            a_rows[row, : a.shape[0]] = a
            b_rows[row, :, : b.shape[1]] = b
        stacked[name] = (a_rows, b_rows)
    return stacked


def _lora_hook(a: torch.Tensor, b: torch.Tensor, name: str):  # noqa: ANN202 - torch hook signature
    a_t = a.transpose(-1, -2)  # (…, d_in, R)
    b_t = b.transpose(-1, -2)  # (…, R, d_out)
    batched = a.dim() == 3

    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if batched and x.shape[0] != a.shape[0]:
            raise ValueError(f"{name}: batch of {x.shape[0]} rows but {a.shape[0]} per-row adapters")
        # (B, T, d_in) @ (B|1, d_in, R) @ (B|1, R, d_out): two small matmuls, no loop over rows.
        return output + (x @ a_t.to(x.dtype)) @ b_t.to(x.dtype)

    return hook


@contextmanager
def lora_scope(
    model: torch.nn.Module, adapters: AdapterLike | Sequence[AdapterLike | None] | None
) -> Iterator[None]:
    """Make ``adapters`` active on ``model`` for the duration of the ``with`` block.

    ``adapters`` is one adapter for every row, a sequence with one adapter (or None) per batch row,
    or None for the plain base model. Module names are full paths such as
    ``model.layers.3.mlp.down_proj``.
    """
    if adapters is None:
        yield
        return
    if is_per_row(adapters):
        weights: Mapping[str, LoraPair] = stack_per_row(adapters)  # type: ignore[arg-type]
    else:
        weights = weights_of(adapters)
    modules = dict(model.named_modules())
    missing = [name for name in weights if name not in modules]
    if missing:
        raise KeyError(f"adapter targets modules the model lacks: {missing[:3]} (adapter for another model?)")
    handles = []
    try:
        for name, (a, b) in weights.items():
            _check_shapes(name, modules[name], a, b)
            handles.append(modules[name].register_forward_hook(_lora_hook(a, b, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_shapes(name: str, module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    d_in = getattr(module, "in_features", None)
    d_out = getattr(module, "out_features", None)
    if a.shape[-1] != d_in or b.shape[-2] != d_out or a.shape[-2] != b.shape[-1]:
        raise ValueError(
            f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a Linear({d_in} -> {d_out})"
        )
