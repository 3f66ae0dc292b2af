"""MemoryAdapter: the LoRA weights of one memory, with chunk bookkeeping and a safetensors file format.

Layout (shared with d2l_store): for each target module path P, A is (R, d_in) and B is (d_out, R)
with R = n_chunks · rank_per_chunk and ΔW = B @ A (any scaling is already folded into B).
Chunk i owns A rows and B columns [i·r, (i+1)·r), so chunks concatenate and drop along the rank axis.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2l_memory.errors import CheckpointError, IncompatibleCheckpointError
from d2l_memory.lora import LoraPair

ADAPTER_FORMAT = "d2l-memory-adapter"
ADAPTER_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class MemoryAdapter:
    """LoRA factors for every target module, made from one or more chunks."""

    weights: Mapping[str, LoraPair]
    """Full module path → (A (R, d_in), B (d_out, R))."""
    rank_per_chunk: int
    chunk_spans: tuple[tuple[int, int], ...]
    """Token span [start, end) of each chunk in its source document."""
    base_model: str
    """Fingerprint of the base model the adapter was made for."""
    hypernet: str
    """Content hash of the hypernetwork that made it."""

    def __post_init__(self) -> None:
        expected = self.rank_per_chunk * len(self.chunk_spans)
        for name, (a, b) in self.weights.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != expected or b.shape[1] != expected:
                raise CheckpointError(
                    f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not hold {len(self.chunk_spans)} "
                    f"chunks of rank {self.rank_per_chunk}"
                )

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_spans)

    @property
    def rank(self) -> int:
        """Total rank, n_chunks · rank_per_chunk."""
        return self.n_chunks * self.rank_per_chunk

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @functools.cached_property
    def content_digest(self) -> str:
        """sha256 of the weights, computed once per object: equal weights give equal digests, so
        caches keyed by it survive the new objects that ``concat`` and ``select_chunks`` return."""
        return tensor_digest(self.to_tensors())

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> MemoryAdapter:
        moved = {n: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                 for n, (a, b) in self.weights.items()}
        return replace(self, weights=moved)

    def select_chunks(self, indices: Iterable[int]) -> MemoryAdapter:
        """A new adapter with only the given chunks, in the given order."""
        keep = list(indices)
        bad = [i for i in keep if not 0 <= i < self.n_chunks]
        if bad:
            raise IndexError(f"chunk indices {bad} out of range for {self.n_chunks} chunks")
        r = self.rank_per_chunk
        cols = torch.tensor([i * r + k for i in keep for k in range(r)], dtype=torch.long)
        weights = {
            n: (a.index_select(0, cols.to(a.device)).contiguous(), b.index_select(1, cols.to(b.device)).contiguous())
            for n, (a, b) in self.weights.items()
        }
        return replace(self, weights=weights, chunk_spans=tuple(self.chunk_spans[i] for i in keep))

    def drop_chunks(self, indices: Iterable[int]) -> MemoryAdapter:
        """Forget part of a memory: remove these chunks' rank slices."""
        drop = set(indices)
        bad = [i for i in drop if not 0 <= i < self.n_chunks]
        if bad:
            raise IndexError(f"chunk indices {sorted(bad)} out of range for {self.n_chunks} chunks")
        return self.select_chunks(i for i in range(self.n_chunks) if i not in drop)

    @staticmethod
    def concat(adapters: Sequence[MemoryAdapter]) -> MemoryAdapter:
        """Combine memories (or chunk adapters) along the rank axis, without rescaling."""
        if not adapters:
            raise ValueError("concat needs at least one adapter")
        first = adapters[0]
        identity = (first.base_model, first.hypernet, first.rank_per_chunk)
        for other in adapters[1:]:
            if (other.base_model, other.hypernet, other.rank_per_chunk) != identity:
                raise IncompatibleCheckpointError(
                    "cannot combine adapters made for different base models, hypernetworks or ranks: "
                    f"{identity} vs {(other.base_model, other.hypernet, other.rank_per_chunk)}"
                )
            if sorted(other.weights) != sorted(first.weights):
                raise IncompatibleCheckpointError("cannot combine adapters that target different modules")
        weights = {
            n: (torch.cat([ad.weights[n][0] for ad in adapters], 0),
                torch.cat([ad.weights[n][1] for ad in adapters], 1))
            for n in first.weights
        }
        spans = tuple(s for ad in adapters for s in ad.chunk_spans)
        return replace(first, weights=weights, chunk_spans=spans)

    # ---- tensors and files -------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{path.lora_A, path.lora_B}`` dict, the convention d2l_store keeps."""
        out: dict[str, torch.Tensor] = {}
        for name, (a, b) in self.weights.items():
            out[f"{name}.lora_A"] = a.detach().contiguous()
            out[f"{name}.lora_B"] = b.detach().contiguous()
        return out

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        rank_per_chunk: int,
        chunk_spans: Sequence[tuple[int, int]],
        base_model: str,
        hypernet: str,
    ) -> MemoryAdapter:
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        try:
            weights = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in names}
        except KeyError as exc:
            raise CheckpointError(f"adapter tensors lack {exc.args[0]}") from exc
        spans = tuple((int(s), int(e)) for s, e in chunk_spans)
        return cls(weights=weights, rank_per_chunk=rank_per_chunk, chunk_spans=spans, base_model=base_model,
                   hypernet=hypernet)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file whose header carries identity, chunk spans and a content hash."""
        path = Path(path)
        tensors = self.to_tensors()
        meta = {
            "format": ADAPTER_FORMAT,
            "schema_version": str(ADAPTER_SCHEMA_VERSION),
            "base_model": self.base_model,
            "hypernet": self.hypernet,
            "rank_per_chunk": str(self.rank_per_chunk),
            "chunk_spans": json.dumps([list(s) for s in self.chunk_spans]),
            "content_sha256": tensor_digest(tensors),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, expect_base_model: str | None = None, expect_hypernet: str | None = None
    ) -> MemoryAdapter:
        """Read a file written by ``save``; refuse tampered files and foreign base models or hypernetworks."""
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors adapter ({exc})") from exc
        if meta.get("format") != ADAPTER_FORMAT:
            raise CheckpointError(f"{path}: not a d2l-memory adapter (format={meta.get('format')!r})")
        if meta.get("schema_version") != str(ADAPTER_SCHEMA_VERSION):
            raise CheckpointError(f"{path}: adapter schema {meta.get('schema_version')!r} is not supported")
        if tensor_digest(tensors) != meta.get("content_sha256"):
            raise CheckpointError(f"{path}: content hash mismatch (file modified or corrupted)")
        check_identity(meta["base_model"], meta["hypernet"], expect_base_model, expect_hypernet, str(path))
        return cls.from_tensors(
            tensors,
            rank_per_chunk=int(meta["rank_per_chunk"]),
            chunk_spans=[tuple(s) for s in json.loads(meta["chunk_spans"])],
            base_model=meta["base_model"],
            hypernet=meta["hypernet"],
        )


def check_identity(
    base_model: str, hypernet: str, expect_base_model: str | None, expect_hypernet: str | None, what: str
) -> None:
    if expect_base_model is not None and base_model != expect_base_model:
        raise IncompatibleCheckpointError(
            f"{what} was made for base model {base_model!r}, but the engine runs {expect_base_model!r}"
        )
    if expect_hypernet is not None and hypernet != expect_hypernet:
        raise IncompatibleCheckpointError(
            f"{what} was made by hypernetwork {hypernet!r}, but the engine uses {expect_hypernet!r}"
        )


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
