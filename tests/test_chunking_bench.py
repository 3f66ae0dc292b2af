"""benchmarks/chunking.py: policy specs, the per-policy summary (provider path, cost) and its table."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench_modules import load_benchmark
from d2l_memory import ChunkConfig

chunking = load_benchmark("chunking")


def _row(doc: str, tokens: int, mode: str, question: str, right: bool, open_value: bool = True) -> dict[str, Any]:
    return {"doc": doc, "domain": "facts", "tokens": tokens, "mode": mode, "question": question,
            "contains": right, "open_value": open_value}


def test_policy_specs_parse_and_bad_ones_are_refused() -> None:
    assert chunking.parse_policy("512:24:12") == ChunkConfig(chunk_tokens=512, min_chunk_tokens=24,
                                                             short_document_chunks=12)
    for bad in ("512:24", "a:b:c", "512:0:8"):
        with pytest.raises(argparse.ArgumentTypeError, match="CAP:MIN:PIECES"):
            chunking.parse_policy(bad)


def test_policy_row_scores_modes_lengths_and_the_provider_path() -> None:
    rows = [
        _row("d1", 60, "adapter", "q1", True), _row("d1", 60, "adapter", "q2", False, open_value=False),
        _row("d2", 250, "adapter", "q3", False), _row("d2", 250, "adapter", "q4", True),
        _row("d1", 60, "wrong_adapter", "q1", False), _row("d1", 60, "wrong_adapter", "q2", False),
        _row("d2", 250, "wrong_adapter", "q3", False), _row("d2", 250, "wrong_adapter", "q4", False),
        # Only d2 has more chunks than the recall budget: recall answered its questions, not d1's.
        _row("d2", 250, "adapter_recall", "q3", True), _row("d2", 250, "adapter_recall", "q4", True),
    ]
    result = {"rows": rows, "config": {"modes": ["adapter", "wrong_adapter", "adapter_recall"]},
              "internalize_seconds_mean": 0.5, "mode_seconds": {}}
    policy = ChunkConfig(chunk_tokens=512, min_chunk_tokens=32, short_document_chunks=8)
    row = chunking.policy_row(result, policy, chunk_mb=1.0)
    assert row["accuracy"]["adapter"] == 0.5 and row["accuracy"]["wrong_adapter"] == 0.0
    assert row["accuracy"]["adapter_recall"] == 0.75  # d1 keeps its adapter answers (1 of 2), d2 recalled 2 of 2
    assert row["unseen"] == pytest.approx(2 / 3) and row["closed_set"] == 0.0
    assert row["by_length"] == {"0-100": 0.5, "100-200": None, "200-": 0.5}
    assert row["chunks_per_doc"] == 5.0 and row["max_chunks"] == 8  # 60 tokens: 2 chunks; 250: 8
    assert row["adapter_mb_per_doc"] == 5.0
    text = chunking.markdown({"hypernet": "hn-x", "seed": 1, "docs": 2, "questions": 4, "rank": 8,
                              "rank_budget": 16, "modes": ["adapter", "wrong_adapter", "adapter_recall"],
                              "policies": [row], "seconds": 60.0}, "python benchmarks/chunking.py")
    assert "| `512:32:8` | 50.0 | 0.0 | 75.0 | 66.7 | 0.0 | 50.0 | – | 50.0 | 5.0 (8) | 5.0 | 0.50 |" in text
