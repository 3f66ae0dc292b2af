from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from d2l_store import AdapterStore, RecordNotFound

from d2l_memory import InvalidDocumentError, MemoryEngine, MemoryKind, MemoryProvider, ProviderConfig, Scope
from d2l_memory.provider import ancestors
from tiny import tiny_engine

ALICE = Scope(tenant="acme", user="alice")
BOB = Scope(tenant="acme", user="bob")
DOC_PARIS = "Alice lives in Paris and works as a baker since 1999. " * 3
DOC_TEAL = "What is the favourite colour of Bob? It is teal. " * 3
DOC_TOOL = "Tool docs: call search(query, limit=10) to find items; errors raise NotFound. " * 3


class CountingEngine:
    """Counts the chunks the engine encodes, to prove compaction never re-encodes old chunks."""

    def __init__(self, engine: MemoryEngine) -> None:
        self.chunks = 0
        original = engine.internalize_token_chunks

        def counted(chunks, spans, **kwargs):  # noqa: ANN001, ANN202
            self.chunks += len(chunks)
            return original(chunks, spans, **kwargs)

        engine.internalize_token_chunks = counted  # type: ignore[method-assign]


@pytest.fixture()
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore.open(f"sqlite:///{tmp_path / 'index.db'}", tmp_path / "blobs")
    yield s
    s.close()


@pytest.fixture()
def provider(engine: MemoryEngine, store: AdapterStore) -> MemoryProvider:
    return MemoryProvider(engine, store, ProviderConfig(verbatim_messages=4, compact_block=2, rank_budget=64, top_k=2))


def test_readding_unchanged_text_costs_nothing(provider: MemoryProvider) -> None:
    counter = CountingEngine(provider.engine)
    first = provider.add_document(DOC_PARIS, ALICE)
    encoded = counter.chunks
    again = provider.add_document(DOC_PARIS, ALICE)
    assert first.status == "created" and again.status == "unchanged"
    assert again.record.id == first.record.id and counter.chunks == encoded


def test_changed_text_supersedes_the_named_version(provider: MemoryProvider) -> None:
    first = provider.add_document(DOC_PARIS, ALICE, name="notes.md")
    second = provider.add_document(DOC_TEAL, ALICE, name="notes.md")
    assert second.status == "superseded" and second.record.supersedes == first.record.id
    assert second.record.version == 2
    ids = [r.id for r in provider.list_memories(ALICE)]
    assert ids == [second.record.id]
    with pytest.raises(RecordNotFound):
        provider.get_memory(first.record.id, ALICE)


def test_compaction_appends_chunks_without_reencoding_old_ones(provider: MemoryProvider) -> None:
    counter = CountingEngine(provider.engine)
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i}: Alice lives in Paris."}
        for i in range(6)
    ]
    assert provider.append_messages(ALICE, turns[:4]) is None  # fits the verbatim window
    first = provider.append_messages(ALICE, turns[4:])
    assert first is not None and first.messages == 2
    assert len(provider.window(ALICE)) == 4
    after_first = counter.chunks
    _, memory1 = provider.get_memory(first.record.id)

    more = [{"role": "user", "content": f"Later message {i} about the quick brown fox jumping."} for i in range(3)]
    second = provider.append_messages(ALICE, more)
    assert second is not None and second.messages == 3
    _, memory2 = provider.get_memory(second.record.id)
    # Only the three newly overflowed messages were encoded; the old chunks are reused bit for bit.
    new_text_chunks = counter.chunks - after_first
    assert memory2.n_chunks == memory1.n_chunks + new_text_chunks == second.record.n_chunks
    old = memory2.select_chunks(range(memory1.n_chunks))
    for name, (a, b) in memory1.weights.items():
        assert torch.equal(old.weights[name][0], a) and torch.equal(old.weights[name][1], b)
    assert [m["content"] for m in provider.window(ALICE)] == [m["content"] for m in (turns + more)[-4:]]
    assert len(provider.transcript(ALICE)) == 9


def test_recall_applies_all_when_they_fit_and_ranks_by_bm25_when_not(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE).record
    teal = provider.add_document(DOC_TEAL, ALICE).record
    both = provider.recall("anything", ALICE, top_k=5)
    assert set(both.memory_ids) == {paris.id, teal.id}
    assert both.adapter is not None and both.adapter.rank == paris.rank + teal.rank
    provider.add_document(DOC_TOOL, ALICE)
    one = provider.recall("favourite colour teal", ALICE, top_k=1)
    assert one.memory_ids == (teal.id,)
    assert "BM25 rank 1" in one.selections[0].reason
    tight = provider.recall("baker Paris", ALICE, top_k=3, rank_budget=paris.rank_per_chunk)
    assert tight.selections[0].record_id == paris.id and len(tight.selections[0].chunks) == 1
    assert tight.adapter is not None and tight.adapter.rank == paris.rank_per_chunk


def test_hybrid_recall_puts_the_best_snippet_in_the_prompt(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    provider.add_document(DOC_TEAL, ALICE)
    # Every word of the question is in the chunks that say "teal" (the others share only "is").
    adapters_only = provider.answer("Is it teal for Bob?", ALICE, max_new_tokens=2)
    hybrid = provider.answer("Is it teal for Bob?", ALICE, hybrid=True, max_new_tokens=2)
    assert not adapters_only.recall.snippets
    assert hybrid.recall.snippets and "teal" in hybrid.recall.snippets[0].text
    assert hybrid.prompt_tokens > adapters_only.prompt_tokens


def test_answer_uses_exactly_the_recalled_adapter(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    result = provider.answer("Where does Alice live?", ALICE, max_new_tokens=4)
    expected = provider.engine.generate("Where does Alice live?", memory=result.recall.adapter, max_new_tokens=4)
    assert result.text == expected and result.completion_tokens <= 4


def test_scopes_are_isolated_and_ancestors_are_visible(provider: MemoryProvider) -> None:
    tenant_doc = provider.add_document(DOC_TOOL, Scope(tenant="acme")).record
    alice_doc = provider.add_document(DOC_PARIS, ALICE).record
    session = Scope(tenant="acme", user="alice", agent="helper", session="s1")
    assert set(provider.recall("x", session).memory_ids) == {tenant_doc.id, alice_doc.id}
    assert provider.recall("x", BOB).memory_ids == (tenant_doc.id,)
    assert provider.recall("x", Scope(tenant="other")).memory_ids == ()
    with pytest.raises(RecordNotFound):
        provider.recall("x", BOB, memory_ids=[alice_doc.id])
    with pytest.raises(RecordNotFound):
        provider.forget(alice_doc.id, BOB)
    assert ancestors(session)[-1] == Scope(tenant="acme")


def test_forgetting_chunks_memories_and_scopes(provider: MemoryProvider) -> None:
    rec = provider.add_document(DOC_PARIS + DOC_TEAL, ALICE).record
    assert rec.n_chunks >= 3
    _, full = provider.get_memory(rec.id)
    dropped = provider.forget_chunks(rec.id, [0], ALICE)
    _, less = provider.get_memory(dropped.id)
    assert dropped.n_chunks == rec.n_chunks - 1
    expected = full.drop_chunks([0])
    for name, (a, b) in less.weights.items():
        assert torch.equal(a, expected.weights[name][0]) and torch.equal(b, expected.weights[name][1])
    first_chunk_text = rec.source_text[slice(*rec.metadata["chunk_chars"][0])]
    assert dropped.source_text == rec.source_text[len(first_chunk_text) :]
    provider.forget(dropped.id, ALICE)
    assert provider.list_memories(ALICE) == []
    provider.add_document(DOC_TEAL, ALICE)
    provider.append_messages(ALICE, [{"role": "user", "content": "hi"}])
    assert provider.forget_scope(ALICE) == 1 and provider.window(ALICE) == []


def test_expired_memories_disappear(provider: MemoryProvider) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1)
    rec = provider.add_document(DOC_PARIS, ALICE, expires_at=soon).record
    removed, _ = provider.expire(now=soon + timedelta(seconds=1))
    assert removed == 1
    with pytest.raises(RecordNotFound):
        provider.get_memory(rec.id)


def test_memories_from_another_engine_are_skipped_not_applied(store: AdapterStore, provider: MemoryProvider) -> None:
    foreign = MemoryProvider(tiny_engine(seed=1), store)
    other = foreign.add_document(DOC_PARIS, ALICE).record
    recall = provider.recall("Paris", ALICE)
    assert recall.memory_ids == () and recall.skipped[0][0] == other.id


def test_bad_input_is_refused(provider: MemoryProvider, tmp_path: Path) -> None:
    with pytest.raises(InvalidDocumentError):
        provider.add_document("   ", ALICE)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidDocumentError, match="blob.bin"):
        provider.add_file(tmp_path / "blob.bin", ALICE)
    with pytest.raises(InvalidDocumentError):
        provider.add_file(tmp_path / "missing.txt", ALICE)
    with pytest.raises(InvalidDocumentError):
        provider.append_messages(ALICE, [{"role": "user"}])  # type: ignore[list-item]
    assert provider.list_memories(ALICE) == []


def test_files_are_named_by_path(provider: MemoryProvider, tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n" + DOC_PARIS)
    first = provider.add_file(path, ALICE, kind=MemoryKind.TOOL_DOC)
    path.write_text("# Notes\n" + DOC_TEAL)
    second = provider.add_file(path, ALICE, kind=MemoryKind.TOOL_DOC)
    assert first.status == "created" and second.record.id != first.record.id
    assert second.status == "superseded" and second.record.metadata["name"] == str(path.resolve())
    assert second.record.kind == MemoryKind.TOOL_DOC


def test_async_variants(provider: MemoryProvider) -> None:
    async def run() -> tuple:
        added = await provider.aadd_document(DOC_PARIS, ALICE)
        answer = await provider.aanswer("Where?", ALICE, max_new_tokens=2)
        return added, answer

    added, answer = asyncio.run(run())
    assert answer.recall.memory_ids == (added.record.id,)


def test_visible_memories_and_their_chunk_texts(provider: MemoryProvider) -> None:
    mine = provider.add_document(DOC_PARIS, ALICE).record
    shared = provider.add_document(DOC_TOOL, Scope(tenant="acme")).record
    provider.add_document(DOC_TEAL, BOB)
    visible = provider.visible_memories(ALICE)
    assert {r.id for r in visible} == {mine.id, shared.id}
    texts = provider.chunk_texts(next(r for r in visible if r.id == mine.id))
    assert len(texts) == mine.n_chunks > 1 and "".join(texts) == mine.source_text


def test_compaction_keeps_the_text_of_earlier_chunks(provider: MemoryProvider) -> None:
    first = [{"role": "user", "content": f"First batch {i}: Alice lives in Paris."} for i in range(6)]
    provider.append_messages(ALICE, first)
    provider.compact(ALICE)
    provider.append_messages(ALICE, [{"role": "user", "content": "Second batch: Bob likes teal."}])
    done = provider.compact(ALICE)
    assert done is not None and done.record.version > 1
    text = "".join(provider.chunk_texts(provider.store.get_record(done.record.id)))
    assert "First batch 0" in text and "Bob likes teal" in text


@pytest.mark.parametrize("bad", ["int8", "float17", "bool"])
def test_a_storage_dtype_that_is_not_a_float_is_refused_up_front(
    engine: MemoryEngine, store: AdapterStore, bad: str
) -> None:
    with pytest.raises(ValueError, match=f"{bad!r} is not a torch floating-point dtype"):
        MemoryProvider(engine, store, ProviderConfig(storage_dtype=bad))
