"""The adapter tensor convention, checked; and the chunk surgery (append, drop) done on it.

Convention: for each target module path P there are `P.lora_A` of shape (R, d_in) and `P.lora_B`
of shape (d_out, R), with R = n_chunks * rank_per_chunk and ΔW = lora_B @ lora_A (scale already
folded into B). Chunk i owns rows [i*r, (i+1)*r) of every A and the same columns of every B, so
chunks concatenate and drop along the rank axis without touching each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from d2l_store.blobformat import DTYPE_CODES
from d2l_store.errors import InvalidAdapterError
from d2l_store.scope import check_module_path

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
MAX_MODULES = 4096
MAX_CHUNKS = 65536

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class AdapterLayout:
    """What `check_adapter` learned about a tensor dict."""

    modules: tuple[str, ...]  # sorted module paths
    rank: int  # R = n_chunks * rank_per_chunk
    dtype: torch.dtype


def check_spans(chunk_spans: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Token spans (start, end), one per chunk, with 0 <= start <= end."""
    if isinstance(chunk_spans, (str, bytes)) or not isinstance(chunk_spans, Sequence):
        raise InvalidAdapterError(f"chunk_spans must be a sequence of (start, end), got {type(chunk_spans).__name__}")
    if not 1 <= len(chunk_spans) <= MAX_CHUNKS:
        raise InvalidAdapterError(f"{len(chunk_spans)} chunk spans given; need 1..{MAX_CHUNKS}")
    out = []
    for span in chunk_spans:
        if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
            raise InvalidAdapterError(f"chunk span {span!r} is not a pair of ints")
        start, end = span
        if not 0 <= start <= end < 2**62:
            raise InvalidAdapterError(f"chunk span {span!r} needs 0 <= start <= end")
        out.append((start, end))
    return tuple(out)


def check_adapter(tensors: Mapping[str, torch.Tensor], rank_per_chunk: int, n_chunks: int) -> AdapterLayout:
    """Validate `tensors` against the convention; raise InvalidAdapterError naming the first problem."""
    if isinstance(rank_per_chunk, bool) or not isinstance(rank_per_chunk, int) or rank_per_chunk < 1:
        raise InvalidAdapterError(f"rank_per_chunk must be a positive int, got {rank_per_chunk!r}")
    if not isinstance(tensors, Mapping) or not tensors:
        raise InvalidAdapterError("tensors must be a non-empty mapping of name -> tensor")
    rank = rank_per_chunk * n_chunks
    modules = _module_paths(tensors.keys())
    dtypes = set()
    for m in modules:
        a, b = tensors[m + A_SUFFIX], tensors[m + B_SUFFIX]
        for name, t in ((m + A_SUFFIX, a), (m + B_SUFFIX, b)):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                raise InvalidAdapterError(f"{name} is not a dense torch.Tensor")
            if t.dtype not in DTYPE_CODES:
                raise InvalidAdapterError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
            if t.dim() != 2 or min(t.shape) < 1:
                raise InvalidAdapterError(f"{name} has shape {tuple(t.shape)}; expected a non-empty matrix")
            if not bool(torch.isfinite(t).all()):
                raise InvalidAdapterError(f"{name} contains NaN or infinite values")
            dtypes.add(t.dtype)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise InvalidAdapterError(
                f"{m}: lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}, but rank must be "
                f"n_chunks * rank_per_chunk = {n_chunks} * {rank_per_chunk} = {rank}"
            )
    if len(dtypes) != 1:
        raise InvalidAdapterError(f"all tensors must share one dtype, got {sorted(map(str, dtypes))}")
    return AdapterLayout(modules=modules, rank=rank, dtype=dtypes.pop())


def _module_paths(keys: Iterable[str]) -> tuple[str, ...]:
    a_mods, b_mods = set(), set()
    for k in keys:
        if not isinstance(k, str):
            raise InvalidAdapterError(f"tensor name {k!r} is not a str")
        if k.endswith(A_SUFFIX):
            a_mods.add(check_module_path(k[: -len(A_SUFFIX)]))
        elif k.endswith(B_SUFFIX):
            b_mods.add(check_module_path(k[: -len(B_SUFFIX)]))
        else:
            raise InvalidAdapterError(f"tensor name {k[:80]!r} must end in {A_SUFFIX} or {B_SUFFIX}")
    if a_mods != b_mods:
        raise InvalidAdapterError(f"modules without a lora_A/lora_B pair: {sorted(a_mods ^ b_mods)[:5]}")
    if len(a_mods) > MAX_MODULES:
        raise InvalidAdapterError(f"{len(a_mods)} modules; the limit is {MAX_MODULES}")
    return tuple(sorted(a_mods))


def to_cpu(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


def concat_chunks(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> Tensors:
    """Old chunks then new ones along the rank axis; both must cover the same modules and shapes."""
    if set(old) != set(new):
        raise InvalidAdapterError("appended chunks must cover exactly the stored modules")
    out: Tensors = {}
    for k, t_old in old.items():
        t_new = new[k]
        if t_new.dtype != t_old.dtype:
            raise InvalidAdapterError(f"{k}: appended dtype {t_new.dtype} differs from stored {t_old.dtype}")
        dim = 0 if k.endswith(A_SUFFIX) else 1
        other = 1 - dim
        if t_new.shape[other] != t_old.shape[other]:
            raise InvalidAdapterError(
                f"{k}: appended shape {tuple(t_new.shape)} does not fit stored {tuple(t_old.shape)}"
            )
        out[k] = torch.cat([t_old, t_new.to("cpu")], dim=dim)
    return out


def keep_chunks(tensors: Mapping[str, torch.Tensor], keep: Sequence[int], rank_per_chunk: int) -> Tensors:
    """Only the chunks listed in `keep` (in that order)."""
    idx = torch.cat([torch.arange(i * rank_per_chunk, (i + 1) * rank_per_chunk) for i in keep])
    return {
        k: (t.index_select(0, idx) if k.endswith(A_SUFFIX) else t.index_select(1, idx)).contiguous()
        for k, t in tensors.items()
    }
