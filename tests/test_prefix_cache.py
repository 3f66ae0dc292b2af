"""Prefix KV reuse: the same answers as a full prefill, per adapter, bounded, and off when asked."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_engine

from d2l_memory.engine import MemoryEngine
from d2l_memory.generation import batch_inputs, prompt_ids
from d2l_memory.lora import lora_scope
from d2l_memory.prefix_cache import PrefixCache, PrefixCacheConfig, common_prefix_length

SYSTEM = {
    "role": "system",
    "content": "Tool docs: call search(query, limit=10) to find items; errors raise NotFound. " * 3,
}
HISTORY = [SYSTEM, {"role": "user", "content": "Alice lives in Paris."}, {"role": "assistant", "content": "Noted."}]


def reuse_engine(enabled: bool = True, **cfg: object) -> MemoryEngine:
    # A wider weight init than the default tiny model's, so greedy answers vary with the prompt and
    # the adapter instead of repeating one token: comparing answers then means something.
    return tiny_engine(
        prefix_cache=PrefixCacheConfig(enabled, min_tokens=8, **cfg), init_range=0.2  # type: ignore[arg-type]
    )


def last_logits(
    engine: MemoryEngine, prompts: list[list[int]], adapters: object, cache: PrefixCache | None, k: int
) -> torch.Tensor:
    """The next-token logits as ``generate`` computes them: only the uncached tokens are fed, at the
    positions the attention mask gives them (padding takes no position)."""
    inputs = batch_inputs(
        engine.model, prompts, engine.tokenizer.pad_token_id, adapters, cache, k  # type: ignore[arg-type]
    )
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # type: ignore[union-attr]
    with torch.inference_mode(), lora_scope(engine.model, adapters):  # type: ignore[arg-type]
        out = engine.model(input_ids=inputs["input_ids"][:, k:], attention_mask=mask,  # type: ignore[index]
                           position_ids=positions[:, k:], cache=inputs.get("cache"))
    return out.logits[:, -1]


def test_cached_prefix_gives_the_logits_of_a_full_prefill_per_row_adapter() -> None:
    engine = reuse_engine()
    memories = [engine.internalize("Alice lives in Paris and works as a baker."), engine.internalize("Bob likes teal.")]
    prompts = [
        prompt_ids(engine.tokenizer, q, None, HISTORY) for q in ("What is the favourite colour of Bob?", "Where?")
    ]
    k = 40
    assert all(p[:k] == prompts[0][:k] for p in prompts) and all(len(p) > k for p in prompts)
    full = torch.cat([last_logits(engine, [p], m, None, 0) for p, m in zip(prompts, memories, strict=True)])
    cached = last_logits(engine, prompts, memories, engine.prefix_cache, k)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert engine.prefix_cache.misses == 2 and len(engine.prefix_cache) == 2
    # The same prefix computed under the other row's adapter is wrong for this row: keying by adapter matters.
    swapped = last_logits(engine, prompts, memories[::-1], engine.prefix_cache, k)
    assert (swapped - full).abs().max() > 1e-3


def test_answers_match_an_engine_without_reuse_and_later_calls_hit() -> None:
    reusing, plain = reuse_engine(), reuse_engine(enabled=False)
    memory_text = "Alice lives in Paris and works as a baker since 1999."
    for question in ("Where does Alice live?", "What is her job?"):
        got = reusing.generate(question, memory=reusing.internalize(memory_text), history=HISTORY)
        want = plain.generate(question, memory=plain.internalize(memory_text), history=HISTORY)
        assert got == want
    # The second question's memory is a new object with the same weights: its cached prefix is reused.
    assert (reusing.prefix_cache.misses, reusing.prefix_cache.hits) == (1, 1)
    assert len(plain.prefix_cache) == 0


def test_batched_rows_with_different_adapters_and_lengths_match_single_calls() -> None:
    engine = reuse_engine()
    memories = [engine.internalize("Alice lives in Paris and works as a baker since 1999."), None,
                engine.internalize("Tool docs: call search(query, limit=10).")]
    questions = ["Where?", "What is the favourite colour of Bob? Tell me.", "Colour?"]
    batched = engine.generate_batch(questions, memories=memories, histories=[HISTORY] * 3)
    engine.prefix_cache.clear()
    singles = [engine.generate(q, memory=m, history=HISTORY) for q, m in zip(questions, memories, strict=True)]
    assert batched == singles
    assert len(set(batched)) == 3  # the rows really differ, so matching them is a real check


def test_stream_reuses_the_prefix_and_yields_what_generate_returns() -> None:
    engine = reuse_engine()
    memory = engine.internalize("Bob likes teal.")
    text = engine.generate("Colour?", memory=memory, history=HISTORY)
    assert "".join(engine.stream("Colour?", memory=memory, history=HISTORY)).strip() == text
    assert engine.prefix_cache.hits == 1


def test_short_prefixes_are_not_cached_and_the_byte_budget_evicts_oldest() -> None:
    engine = reuse_engine()
    engine.generate("Where does Alice live?")  # chat template affixes only: shorter than min_tokens
    assert len(engine.prefix_cache) == 0
    engine.generate("Where?", history=HISTORY)
    one_entry = engine.prefix_cache.nbytes
    assert one_entry > 0
    tight = reuse_engine(max_bytes=one_entry * 2)
    for text in ("Alice lives in Paris.", "Bob likes teal.", "Carol is a baker."):
        tight.generate("Where?", memory=tight.internalize(text), history=HISTORY)
    assert len(tight.prefix_cache) == 2 and tight.prefix_cache.nbytes <= one_entry * 2


def test_a_prefix_must_leave_a_token_to_generate_from() -> None:
    engine = reuse_engine()
    prompt = prompt_ids(engine.tokenizer, "Where?", None, HISTORY)
    with pytest.raises(ValueError, match="at least one token"):
        batch_inputs(engine.model, [prompt], 0, None, engine.prefix_cache, len(prompt))


def test_a_history_that_grows_computes_only_its_new_turns_and_answers_the_same() -> None:
    reusing, plain = reuse_engine(), reuse_engine(enabled=False)
    memory_text = "Alice lives in Paris and works as a baker since 1999."
    history = list(HISTORY)
    for turn, question in enumerate(("Where does Alice live?", "What is her job?", "Since when?")):
        got = reusing.generate(question, memory=reusing.internalize(memory_text), history=history)
        want = plain.generate(question, memory=plain.internalize(memory_text), history=history)
        assert got == want, turn
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": got}]
    # Turn 1 prefills the whole prefix; turns 2 and 3 extend the previous turn's entry.
    assert (reusing.prefix_cache.misses, reusing.prefix_cache.extended, reusing.prefix_cache.hits) == (3, 2, 0)


def test_an_extended_prefix_has_the_logits_of_a_full_prefill() -> None:
    engine = reuse_engine()
    longer = [*HISTORY, {"role": "user", "content": "Bob likes teal."}, {"role": "assistant", "content": "Noted."}]
    short_prompt = prompt_ids(engine.tokenizer, "Where?", None, HISTORY)
    prompt = prompt_ids(engine.tokenizer, "Where?", None, longer)
    k_short, k = common_prefix_length(short_prompt, prompt), len(prompt) - 3
    assert 8 <= k_short < k
    last_logits(engine, [short_prompt], None, engine.prefix_cache, k_short)
    extended = last_logits(engine, [prompt], None, engine.prefix_cache, k)
    assert engine.prefix_cache.extended == 1
    torch.testing.assert_close(extended, last_logits(engine, [prompt], None, None, 0), rtol=1e-4, atol=1e-5)
