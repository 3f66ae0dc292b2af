"""benchmarks/compaction.py on a tiny engine: every mode answers every question, budgets hold."""

from __future__ import annotations

from bench_modules import load_benchmark
from tiny import tiny_engine


def test_compaction_bench_answers_every_question_in_every_mode() -> None:
    compaction = load_benchmark("compaction")
    engine = tiny_engine(chunk_tokens=64)
    result = compaction.run(engine, conversations=1, chunk_budgets=[1])
    assert result["questions"] == 6 and len(result["rows"]) == 6
    # The tiny model's 512-token window cannot hold the 40-message transcript: that mode is skipped.
    assert set(result["accuracy"]) == {"window", "memory, all chunks", "memory, 1 chunks"}
    assert result["chunks_per_conversation"][0] > 1  # the facts really went into several compacted chunks
    for row in result["rows"]:
        assert all(isinstance(a, str) for a in row["answers"].values())
    # With one chunk of budget, the chunk stating the fact is picked for some questions, not all
    # of them by accident of picking everything.
    assert 0 < result["fact_chunk_picked"]["memory, 1 chunks"] <= 1
    table = compaction.markdown(result, "python benchmarks/compaction.py")
    assert "| memory, 1 chunks |" in table and "| window |" in table
