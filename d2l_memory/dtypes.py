"""Torch dtypes named in JSON configs and checkpoint metadata ("bfloat16", "float16", ...)."""

from __future__ import annotations

import torch


def float_dtype(name: str) -> torch.dtype:
    """The floating-point torch dtype called ``name``; ``ValueError`` for anything else.

    Configs store dtypes as strings so they stay JSON; every reader parses them here, so a typo or
    an integer dtype fails the same way wherever it was written.
    """
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a torch floating-point dtype (e.g. 'float32', 'bfloat16', 'float16')")
    return dtype
