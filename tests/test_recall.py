from __future__ import annotations

from d2l_memory.recall import Candidate, select_memories

HISTORY = Candidate("h", "compacted_history", None,
                    ("User: my locker code is 7305", "User: I like jazz", "User: the weather is fine",
                     "User: the weather is fine"), rank_per_chunk=8, session_history=True)


def test_history_fits_whole() -> None:
    (chosen,) = select_memories("locker code", [HISTORY], top_k=4, rank_budget=64)
    assert chosen.chunks == (0, 1, 2, 3) and chosen.reason == "session history, all chunks"


def test_history_past_the_budget_keeps_the_chunks_the_query_is_about() -> None:
    (chosen,) = select_memories("what is my locker code?", [HISTORY], top_k=4, rank_budget=16)
    assert chosen.chunks[0] == 0 and len(chosen.chunks) == 2
    assert "best 2 of 4 chunks" in chosen.reason
    # Nothing matches: the newest chunks win the tie.
    (chosen,) = select_memories("zebra", [HISTORY], top_k=4, rank_budget=16)
    assert chosen.chunks == (2, 3)


def test_history_gets_half_the_budget_when_documents_are_in_scope() -> None:
    doc = Candidate("d", "document", "notes", ("Paris is the capital", "bakers bake bread"), 8, False)
    chosen = select_memories("bread and my locker code", [HISTORY, doc], top_k=4, rank_budget=40)
    assert [c.record_id for c in chosen] == ["h", "d"]
    assert chosen[0].chunks == (0, 3) and "within half the rank budget" in chosen[0].reason
    assert chosen[1].chunks == (0, 1)  # what history left unused goes to the documents
    tight = select_memories("bread", [HISTORY, doc], top_k=4, rank_budget=16)
    assert len(tight[0].chunks) == 1 and tight[1].chunks == (1,) and "best 1 of 2 chunks" in tight[1].reason
    (alone,) = select_memories("locker", [HISTORY], top_k=4, rank_budget=24)
    assert len(alone.chunks) == 3  # no documents: the whole budget


def test_bm25_tells_two_chunks_apart_and_scores_only_shared_words() -> None:
    from d2l_memory.recall import bm25_scores

    # Okapi's classic idf is exactly zero for a word in one of two texts; this one is not.
    assert bm25_scores("bread", ["Paris is the capital", "bakers bake bread"])[1] > 0
    scores = bm25_scores("the locker code", ["my locker code is 7305", "the weather", "jazz and blues"])
    assert scores[0] > scores[1] > 0 and scores[2] == 0
    assert bm25_scores("anything", []) == []
