"""Slow: the memory provider with the shipped checkpoint on the default model.

The scenario is built from the held-out split (values training never saw), so these measure the
checkpoint, not memorisation. Decoding is greedy and the weights are fixed, so results are repeatable.

The compaction requirement is met since the provider's default rank budget became 2 chunks (first
session of 2026-12-04), so that recall applies the 2 compacted chunks that match the question instead
of all of them: the compacted 40-message conversation answers 3/6 early-turn questions, the window
alone 0/6 (the test asks for a gain of at least 0.25), with the step-2900 checkpoint and with the
step-2300 one alike; the step-3500, step-4000, step-4600, step-5200, step-5800, step-6200, step-6450,
step-6900 and step-7300 ones pass too. With every compacted chunk
applied (the old 64-chunk budget) every checkpoint up to step 2900 answered 0/6 or 1/6.
The chunk-dropping test states six held-out facts in six compacted chunks (one exchange each) and
drops the chunk of the first unseen value the memory recalls. It replaced (2026-12-03) a hand-written
pair (a locker code and "florist") that the step-2900 checkpoint half-recalled before any drop
("baker"), which kept it a strict xfail. Seed 11 was fixed before any result was seen; seeds 12 and
13 were run afterwards as a check. Step-2900 checkpoint: 3, 5 and 3 of 6 facts recalled before the
drop; the dropped one forgotten each time; every other recalled fact still recalled after it.
Step-3500 checkpoint: 3, 5 and 4 of 6 before; the dropped one forgotten each time; on
seed 12 one other fact ("librarian", a closed-set value) was lost with it: recall still applies the
chunk that states it, but, its BM25 partner having been dropped, sums it with another chunk (checked),
and that pair answers wrongly. So the "others kept" clause holds on seeds 11 and 13 only.
Step-4000 checkpoint (shipped 2026-12-04): all three tests pass; 3, 4 and 4 of 6 recalled before the
drop on seeds 11, 12 and 13, the dropped one forgotten each time, and on seed 12 "librarian" lost
again as with step 3500.
Step-4600 checkpoint (shipped 2026-12-04 evening): all three tests pass (seed 11); 5, 6 and 4 of 6
recalled before the drop on seeds 11, 12 and 13, the dropped one forgotten each time; on seed 12
"librarian" is lost again, and on seed 11 a closed-set fact missed before the drop ("dentist") comes
back after it.
Step-5200 checkpoint (shipped 2026-12-04 night): all three tests pass (seed 11); 5, 6 and 5 of 6
recalled before the drop on seeds 11, 12 and 13, the dropped one forgotten each time and every other
recalled fact kept on all three seeds ("librarian" no longer lost on seed 12); "dentist" again comes
back after the drop on seed 11.
Step-5800 checkpoint (shipped 2026-12-07): all three tests pass (seed 11); 5, 6 and 4 of 6 recalled
before the drop on seeds 11, 12 and 13, the dropped one forgotten each time and every other recalled
fact kept on all three seeds; "dentist" comes back after the drop on seed 11 once more.
Step-6200 checkpoint (shipped in the second session of 2026-12-07): all three tests pass (seed 11); 5,
5 and 5 of 6 recalled before the drop on seeds 11, 12 and 13, the dropped one forgotten each time and
every other recalled fact kept on all three seeds; "dentist" comes back after the drop on seed 11.
Step-6450 checkpoint of the thirteenth cycle (shipped in the fifth session of 2026-12-07), with the
engine's finer default chunking (a compacted block now makes several chunks): all three tests pass
(seed 11); seeds 12 and 13 were not rerun.
Step-6900 checkpoint of the fourteenth cycle (shipped in the sixth session of 2026-12-07): all three
tests pass (seed 11); seeds 12 and 13 were not rerun.
Step-7300 checkpoint of the fifteenth cycle (shipped in the seventh session of 2026-12-07): all three
tests pass (seed 11, in a fresh-clone `.ci/run`); seeds 12 and 13 were not rerun.
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


def test_compacted_conversation_answers_early_turns_the_window_has_lost(engine: MemoryEngine,
                                                                        provider: MemoryProvider) -> None:
    with_memory, window_only, _ = compaction_scores(engine, provider)
    assert with_memory >= window_only + MIN_COMPACTION_GAIN, (with_memory, window_only)


def told(provider: MemoryProvider, scope: Scope, exchange: list[dict[str, str]]) -> None:
    provider.append_messages(scope, exchange)
    provider.compact(scope)  # one chunk per exchange, nothing left verbatim


def recalled(provider: MemoryProvider, scope: Scope, qas: list[synth.QA]) -> list[bool]:
    return [contains_match(provider.answer(qa.question, scope, max_new_tokens=16).text, qa.answer) for qa in qas]


def test_dropping_a_chunk_forgets_what_it_taught(provider: MemoryProvider) -> None:
    """Six held-out facts, one compacted chunk each. Of the facts the memory recalls, the one whose
    chunk is dropped must be gone, and the others must stay (their rank slices are untouched)."""
    scope = Scope(tenant="acme", user="erin", session="s")
    messages, qas = synth.long_conversation(random.Random(11), "test", n_facts=6, n_messages=12)
    for i in range(0, len(messages), 2):
        told(provider, scope, messages[i : i + 2])
    record = provider.session_memory(scope)
    assert record is not None and record.n_chunks == len(qas)
    before = recalled(provider, scope, qas)
    # Only a value training never saw proves forgetting: a closed-set one can come back from the prior.
    taught = [i for i, ok in enumerate(before) if ok and qas[i].open_value]
    assert taught, f"the memory recalled no unseen fact before the drop: {before}"
    dropped = taught[0]
    provider.forget_chunks(record.id, [dropped], scope)
    after = recalled(provider, scope, qas)
    assert not after[dropped], f"still answers {qas[dropped].answer!r} after its chunk was dropped"
    kept = [i for i, ok in enumerate(before) if ok and i != dropped]
    assert all(after[i] for i in kept), {"before": before, "after": after}


def test_a_document_in_one_scope_is_invisible_from_another(provider: MemoryProvider) -> None:
    owner, other = Scope(tenant="acme", user="fay"), Scope(tenant="acme", user="gus")
    provider.add_document("Fay's locker code is 5512. Fay works as a florist.", owner)
    assert provider.recall("locker code", other).adapter is None
    assert provider.recall("locker code", owner).adapter is not None
    assert "5512" not in provider.answer("What is Fay's locker code?", other, max_new_tokens=16).text
