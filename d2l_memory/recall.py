"""Which memories to apply for a query: pure selection logic, so it is easy to test and to explain.

Policy (every choice carries a human-readable reason):
1. The session's own history memories are always applied, all chunks; past the rank budget the
   newest chunks win (recent turns matter most).
2. Other memories (documents, tool docs) are all applied when they fit the remaining rank budget and
   number at most ``top_k``. Otherwise they are ranked by BM25 of their source text against the
   query and taken best first; a memory too big for what is left of the budget contributes its
   best-scoring chunks only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rank_bm25 import BM25Okapi

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Candidate:
    """A stored memory that could be applied."""

    record_id: str
    kind: str
    name: str | None
    chunk_texts: tuple[str, ...]
    """Source text of each chunk, in rank order (empty strings when no source text was kept)."""
    rank_per_chunk: int
    session_history: bool
    """True for the querying session's own compacted conversation."""

    @property
    def rank(self) -> int:
        return self.rank_per_chunk * len(self.chunk_texts)


@dataclass(frozen=True)
class Selection:
    record_id: str
    chunks: tuple[int, ...]
    """Chunk indices applied, in rank order."""
    score: float
    """BM25 relevance of the memory's source to the query (0 when not ranked)."""
    reason: str


@dataclass(frozen=True)
class Snippet:
    record_id: str
    chunk: int
    text: str
    score: float


def _bm25_scores(query: str, texts: Sequence[str]) -> list[float]:
    corpus = [words(t) or ["\u2205"] for t in texts]
    if not corpus:
        return []
    return [float(s) for s in BM25Okapi(corpus).get_scores(words(query))]


def select_memories(query: str, candidates: Sequence[Candidate], *, top_k: int, rank_budget: int) -> list[Selection]:
    chosen: list[Selection] = []
    budget = rank_budget
    for cand in (c for c in candidates if c.session_history):
        fit = min(len(cand.chunk_texts), budget // cand.rank_per_chunk)
        if fit <= 0:
            continue
        keep = tuple(range(len(cand.chunk_texts) - fit, len(cand.chunk_texts)))
        why = "session history, all chunks" if fit == len(cand.chunk_texts) else f"session history, newest {fit} chunks within the rank budget"
        chosen.append(Selection(cand.record_id, keep, 0.0, why))
        budget -= fit * cand.rank_per_chunk

    others = [c for c in candidates if not c.session_history]
    if not others:
        return chosen
    if len(others) <= top_k and sum(c.rank for c in others) <= budget:
        chosen += [Selection(c.record_id, tuple(range(len(c.chunk_texts))), 0.0, "all memories in scope fit the rank budget") for c in others]
        return chosen

    scores = _bm25_scores(query, [" ".join(c.chunk_texts) for c in others])
    ranked = sorted(range(len(others)), key=lambda i: -scores[i])  # stable: ties keep newest-first order
    for place, i in enumerate(ranked[:top_k], start=1):
        cand = others[i]
        if budget < cand.rank_per_chunk:
            break
        if cand.rank <= budget:
            chosen.append(Selection(cand.record_id, tuple(range(len(cand.chunk_texts))), scores[i], f"BM25 rank {place} of {len(others)}"))
            budget -= cand.rank
            continue
        chunk_scores = _bm25_scores(query, cand.chunk_texts)
        n = budget // cand.rank_per_chunk
        best = sorted(sorted(range(len(cand.chunk_texts)), key=lambda j: -chunk_scores[j])[:n])
        chosen.append(Selection(cand.record_id, tuple(best), scores[i],
                                f"BM25 rank {place} of {len(others)}; best {n} of {len(cand.chunk_texts)} chunks within the rank budget"))
        budget -= n * cand.rank_per_chunk
    return chosen


def best_snippets(query: str, candidates: Sequence[Candidate], selections: Sequence[Selection], n: int) -> list[Snippet]:
    """The ``n`` chunk texts of the selected memories most relevant to the query (for hybrid prompts)."""
    if n <= 0:
        return []
    by_id = {c.record_id: c for c in candidates}
    pool = [(s.record_id, j, by_id[s.record_id].chunk_texts[j]) for s in selections for j in s.chunks]
    pool = [p for p in pool if p[2].strip()]
    scores = _bm25_scores(query, [p[2] for p in pool])
    order = sorted(range(len(pool)), key=lambda i: -scores[i])[:n]
    return [Snippet(pool[i][0], pool[i][1], pool[i][2], scores[i]) for i in order]
