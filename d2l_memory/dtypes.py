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


def computes_natively(dtype: torch.dtype, device: str) -> bool:
    """Whether ``device`` has hardware arithmetic for ``dtype``, so autocasting to it saves time.

    CPUs without AVX512-BF16 or AMX emulate bf16 matmuls: measured on such a Xeon (AVX512 without
    BF16), a 2048×576 @ 576×1536 product took 3.8× longer in bf16 than in fp32 (2 threads, idle CPU). GPUs and full
    precision are taken as native; a torch without the CPU probes is assumed native too, which keeps
    the old behaviour rather than guessing.
    """
    if dtype == torch.float32 or not device.startswith("cpu"):
        return True
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
    checks = [getattr(torch.cpu, name, None) for name in probes]
    if not checks or any(check is None for check in checks):
        return True
    return any(check() for check in checks)
