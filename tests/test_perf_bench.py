"""benchmarks/perf.py pieces on a tiny engine: the chat-prefix rows measure what they say."""

from __future__ import annotations

from bench_modules import load_benchmark
from tiny import tiny_engine

from d2l_memory.prefix_cache import PrefixCacheConfig


def test_prefix_rows_store_once_then_reuse_and_reach_the_table() -> None:
    perf = load_benchmark("perf")
    engine = tiny_engine(chunk_tokens=64)
    plain = tiny_engine(chunk_tokens=64, prefix_cache=PrefixCacheConfig(enabled=False))
    rows = perf.bench_prefix(engine, plain, (96,))
    assert len(rows) == 1 and rows[0]["prefix_tokens"] > 96
    # Three first calls (each after clearing) and the three later ones: each first call misses once,
    # every later call hits; the engine without reuse never stores anything.
    assert (engine.prefix_cache.misses, engine.prefix_cache.hits) == (3, 3)
    assert len(plain.prefix_cache) == 0
    result = {"lengths": [], "serving": {"batches": [{"batch": 1, "base_tok_s": 1.0, "per_row_adapters_tok_s": 1.0}],
                                         "swap_s_batch_max": 0.001},
              "prefix": rows, "verdicts": [], "command": "x", "machine": "m", "base_model": "b", "chunk_tokens": 64,
              "window": 512,
              "compile": {"eager_tok_s_base": 2.0, "compiled_tok_s_base": 2.0, "first_compiled_call_s": 9.0,
                          "adapter_effect_eager": 0.5, "compiled_vs_eager_with_adapter": 0.5,
                          "compiled_applies_adapter": False}}
    table = perf.markdown(result)
    assert f"| {rows[0]['prefix_tokens']} | " in table and "shorter" in table
    assert "torch.compile" in table and "(1.00×)" in table and "**ignores**" in table
