from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2l_memory import CheckpointError, IncompatibleCheckpointError, MemoryAdapter

PATH = "model.layers.0.mlp.down_proj"


def make(n_chunks: int, r: int = 2, seed: int = 0, base: str = "base-x", hypernet: str = "hn-1") -> MemoryAdapter:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_chunks * r, 6, generator=gen)
    b = torch.randn(5, n_chunks * r, generator=gen)
    spans = tuple((i * 10, i * 10 + 10) for i in range(n_chunks))
    return MemoryAdapter({PATH: (a, b)}, rank_per_chunk=r, chunk_spans=spans, base_model=base, hypernet=hypernet)


def test_concat_and_drop_are_inverse_along_rank() -> None:
    first, second = make(2, seed=0), make(3, seed=1)
    both = MemoryAdapter.concat([first, second])
    assert (both.n_chunks, both.rank) == (5, 10)
    back = both.drop_chunks([2, 3, 4])
    assert torch.equal(back.weights[PATH][0], first.weights[PATH][0])
    assert torch.equal(back.weights[PATH][1], first.weights[PATH][1])
    assert back.chunk_spans == first.chunk_spans


def test_dropping_a_chunk_removes_exactly_its_contribution() -> None:
    memory = make(3)
    a, b = memory.weights[PATH]
    kept = memory.drop_chunks([1])
    ka, kb = kept.weights[PATH]
    expected = b[:, 0:2] @ a[0:2] + b[:, 4:6] @ a[4:6]
    torch.testing.assert_close(kb @ ka, expected)
    with pytest.raises(IndexError):
        memory.drop_chunks([3])


def test_concat_refuses_foreign_memories() -> None:
    with pytest.raises(IncompatibleCheckpointError):
        MemoryAdapter.concat([make(1), make(1, base="other")])
    with pytest.raises(IncompatibleCheckpointError):
        MemoryAdapter.concat([make(1), make(1, hypernet="hn-2")])


def test_save_load_round_trip_and_sizes(tmp_path: Path) -> None:
    memory = make(2)
    path = memory.save(tmp_path / "m.safetensors")
    loaded = MemoryAdapter.load(path, expect_base_model="base-x", expect_hypernet="hn-1")
    assert loaded.chunk_spans == memory.chunk_spans and loaded.rank == 4
    assert torch.equal(loaded.weights[PATH][0], memory.weights[PATH][0])
    assert memory.nbytes == (4 * 6 + 5 * 4) * 4
    assert memory.to(dtype=torch.float16).nbytes == memory.nbytes // 2


def test_load_refuses_foreign_and_tampered_files(tmp_path: Path) -> None:
    path = make(2).save(tmp_path / "m.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="base model"):
        MemoryAdapter.load(path, expect_base_model="another-model")
    with pytest.raises(IncompatibleCheckpointError, match="hypernetwork"):
        MemoryAdapter.load(path, expect_hypernet="hn-other")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="hash"):
        MemoryAdapter.load(path)
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError):
        MemoryAdapter.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(CheckpointError):
        MemoryAdapter.load(tmp_path / "junk.safetensors")


def test_inconsistent_shapes_are_refused() -> None:
    a, b = torch.zeros(3, 6), torch.zeros(5, 3)
    with pytest.raises(CheckpointError):
        MemoryAdapter({PATH: (a, b)}, rank_per_chunk=2, chunk_spans=((0, 1),), base_model="x", hypernet="y")
