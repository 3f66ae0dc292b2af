"""benchmarks/chunk_prior.py: its measures read 1 for identical adapters, stay near chance for
unrelated ones, and separate a shared A from document-specific B; it runs end to end on a tiny engine."""

from __future__ import annotations

import math

import pytest
import torch
from bench_modules import load_benchmark
from tiny import tiny_engine

from d2l_memory import MemoryAdapter

chunk_prior = load_benchmark("chunk_prior")
K, R, D_IN, D_OUT = 6, 4, 64, 48


def _adapter(a: torch.Tensor, b: torch.Tensor, spans: tuple[tuple[int, int], ...] = ((0, 10),)) -> MemoryAdapter:
    return MemoryAdapter(weights={"layers.0.mlp.down_proj": (a, b)}, rank_per_chunk=R, chunk_spans=spans,
                         base_model="base", hypernet="net")


def _random(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, D_IN, generator=g), torch.randn(D_OUT, R, generator=g)


def test_identical_adapters_share_everything() -> None:
    a, b = _random(0)
    s = chunk_prior.measure([_adapter(a, b) for _ in range(K)])["summary"]
    for key in ("common_share", "a_top_r_share", "b_top_r_share", "a_same_slot_cos", "b_same_slot_cos"):
        assert s[key]["mean"] == pytest.approx(1.0), key
    assert s["a_other_slot_cos"]["mean"] < 0.5


def test_unrelated_adapters_share_about_one_in_k() -> None:
    s = chunk_prior.measure([_adapter(*_random(seed)) for seed in range(K)])["summary"]
    assert s["common_share"]["mean"] == pytest.approx(1 / K, abs=0.08)
    assert s["a_top_r_share"]["mean"] < 0.45 and s["b_top_r_share"]["mean"] < 0.5
    chance = math.sqrt(2 / (math.pi * D_IN))  # mean |cos| of random directions in D_IN dimensions
    assert s["a_same_slot_cos"]["mean"] == pytest.approx(chance, rel=0.4)
    assert s["a_same_slot_cos"]["mean"] == pytest.approx(s["a_other_slot_cos"]["mean"], rel=0.4)


def test_a_shared_by_every_document_shows_in_a_but_not_in_b() -> None:
    shared_a, _ = _random(100)
    s = chunk_prior.measure([_adapter(shared_a, _random(seed)[1]) for seed in range(K)])["summary"]
    assert s["a_same_slot_cos"]["mean"] == pytest.approx(1.0) and s["a_top_r_share"]["mean"] == pytest.approx(1.0)
    assert s["b_same_slot_cos"]["mean"] < 0.3
    assert s["common_share"]["mean"] < 0.5  # B still differs, so ΔW does too


def test_multi_chunk_adapters_are_refused() -> None:
    a, b = _random(0)
    two = _adapter(torch.cat([a, a]), torch.cat([b, b], 1), spans=((0, 5), (5, 10)))
    with pytest.raises(ValueError, match="single-chunk"):
        chunk_prior.measure([two, two])


def test_runs_on_a_tiny_engine() -> None:
    engine = tiny_engine(chunk_tokens=64)
    with torch.no_grad():
        for head in engine.hypernet.heads.values():
            head.scale_b.fill_(1.0)  # a fresh head writes ΔW = 0, which has no energy to share
    adapters, ids = chunk_prior.first_chunks(engine, docs_per_domain=2)
    result = chunk_prior.measure(adapters)
    assert len(ids) == len(set(ids)) == 6 and result["adapters"] == 6
    assert set(result["modules"]) == set(adapters[0].weights)
    for key, s in result["summary"].items():
        assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0 + 1e-9, key
    result.update(hypernet=engine.hypernet_id, seconds=1.0)
    assert "| common share |" in chunk_prior.markdown(result, "python benchmarks/chunk_prior.py")
