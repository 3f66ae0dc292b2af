"""Slow: the memory provider with the shipped checkpoint on the default model.

The scenario is built from the held-out split (values training never saw), so these measure the
checkpoint, not memorisation. Decoding is greedy and the weights are fixed, so results are repeatable.

The compaction requirement is met since the provider's default rank budget became 2 chunks (first
session of 2026-12-04), so that recall applies the 2 compacted chunks that match the question instead
of all of them: the compacted 40-message conversation answers 3/6 early-turn questions, the window
alone 0/6 (the test asks for a gain of at least 0.25), with the step-2900 checkpoint and with the
step-2300 one alike. With every compacted chunk applied (the old 64-chunk budget) every checkpoint
answered 0/6 or 1/6.
The chunk-dropping test still fails: before the drop the step-2900 checkpoint answers the locker code
(7305) but calls the user a baker, not a florist. It stays a strict xfail: CI reports it as a known
failure, and it turns into an error (XPASS) as soon as a better checkpoint meets it, so the marker has
to be removed then.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from d2l_store import AdapterStore

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig, Scope
from d2l_memory.evaluation.metrics import contains_match
from d2l_memory.training import synth

pytestmark = pytest.mark.slow

SESSION = Scope(tenant="acme", user="dana", session="trip")
MIN_COMPACTION_GAIN = 0.25
"""Compacted memory must answer at least this share of early-turn questions more than the window alone."""


def forty_message_conversation(seed: int = 7, n_facts: int = 6) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """Facts in the first turns, then small talk until the conversation has 40 messages."""
    messages, qas = synth.long_conversation(random.Random(seed), "test", n_facts, n_messages=40)
    return messages, [(qa.question, qa.answer) for qa in qas]


@pytest.fixture(scope="module")
def engine() -> MemoryEngine:
    engine = MemoryEngine.from_pretrained()
    if not engine.hypernet_trained:
        pytest.fail("no shipped checkpoint: these tests measure it")
    return engine


@pytest.fixture()
def provider(engine: MemoryEngine, tmp_path: Path) -> MemoryProvider:
    store = AdapterStore.open(f"sqlite:///{tmp_path / 'index.db'}", tmp_path / "blobs")
    return MemoryProvider(engine, store, ProviderConfig(verbatim_messages=8, compact_block=4))


def compaction_scores(engine: MemoryEngine, provider: MemoryProvider) -> tuple[float, float, int]:
    """(share right with compacted memory + window, share right with the window alone, chunks)."""
    messages, questions = forty_message_conversation()
    for i in range(0, len(messages), 2):  # as a chat app would: one exchange at a time
        provider.append_messages(SESSION, messages[i : i + 2])
    window = provider.window(SESSION)
    assert len(window) <= 8 + 4 and not any(m["content"] == messages[0]["content"] for m in window)
    record = provider.session_memory(SESSION)
    assert record is not None
    with_memory = without = 0
    for question, answer in questions:
        with_memory += contains_match(provider.answer(question, SESSION, max_new_tokens=24).text, answer)
        without += contains_match(engine.generate(question, history=window, max_new_tokens=24), answer)
    n = len(questions)
    return with_memory / n, without / n, record.n_chunks


KNOWN_WEAK_CHECKPOINT = pytest.mark.xfail(
    strict=True, reason="shipped checkpoint (2900 CPU steps) recalls only one of the two compacted facts; see module doc")


def test_compacted_conversation_answers_early_turns_the_window_has_lost(engine: MemoryEngine,
                                                                        provider: MemoryProvider) -> None:
    with_memory, window_only, _ = compaction_scores(engine, provider)
    assert with_memory >= window_only + MIN_COMPACTION_GAIN, (with_memory, window_only)


LOCKER = ("What is my gym locker code?", "7305")
JOB = ("What is my profession?", "florist")


def told(provider: MemoryProvider, scope: Scope, statement: str) -> None:
    provider.append_messages(scope, [{"role": "user", "content": statement},
                                     {"role": "assistant", "content": "Thanks, I'll remember that."}])
    provider.compact(scope)  # one chunk per exchange, nothing left verbatim


def chunk_recall(provider: MemoryProvider, scope: Scope) -> dict[str, bool]:
    return {answer: contains_match(provider.answer(question, scope, max_new_tokens=16).text, answer)
            for question, answer in (LOCKER, JOB)}


@KNOWN_WEAK_CHECKPOINT
def test_dropping_a_chunk_forgets_what_it_taught(provider: MemoryProvider) -> None:
    scope = Scope(tenant="acme", user="erin", session="s")
    told(provider, scope, "The code for my gym locker is 7305.")
    told(provider, scope, "I'm a florist by profession.")
    record = provider.session_memory(scope)
    assert record is not None and record.n_chunks == 2
    assert chunk_recall(provider, scope) == {"7305": True, "florist": True}
    provider.forget_chunks(record.id, [0], scope)
    assert chunk_recall(provider, scope) == {"7305": False, "florist": True}


def test_a_document_in_one_scope_is_invisible_from_another(provider: MemoryProvider) -> None:
    owner, other = Scope(tenant="acme", user="fay"), Scope(tenant="acme", user="gus")
    provider.add_document("Fay's locker code is 5512. Fay works as a florist.", owner)
    assert provider.recall("locker code", other).adapter is None
    assert provider.recall("locker code", owner).adapter is not None
    assert "5512" not in provider.answer("What is Fay's locker code?", other, max_new_tokens=16).text
