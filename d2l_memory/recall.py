"""Which memories to apply for a query: pure selection logic, so it is easy to test and to explain.

Policy (every choice carries a human-readable reason):
1. The session's own history memories are always applied, all chunks while they fit the rank
   budget (half of it when other memories are in scope, so a long chat cannot crowd out every
   document). Past it, the chunks whose text best matches the query (BM25) are applied, the newest
   first among equals: the newest turns are still verbatim in the prompt, so what the compacted
   history must supply is an older turn the question is about.
2. Other memories (documents, tool docs) are all applied when they fit the remaining rank budget and
   number at most ``top_k``. Otherwise they are ranked by BM25 of their source text against the
   query and taken best first; a memory too big for what is left of the budget contributes its
   best-scoring chunks only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


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


def bm25_scores(query: str, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each text against the query, with Lucene's always-positive idf.

    The classic idf, log((N - n + 0.5) / (n + 0.5)), is zero for a word in half of the texts and
    negative beyond: between a memory's two chunks it cannot tell which one the query is about, and
    in the small corpora of one scope it can invert the ranking; log(1 + ...) does neither.
    A text scores above 0 exactly when it shares a word with the query.
    """
    docs = [words(t) for t in texts]
    if not docs:
        return []
    n_docs = len(docs)
    avg_len = sum(len(d) for d in docs) / n_docs or 1.0
    df = Counter(w for d in docs for w in set(d))
    idf = {w: math.log(1 + (n_docs - n + 0.5) / (n + 0.5)) for w, n in df.items()}
    terms = words(query)
    scores = []
    for doc in docs:
        tf = Counter(doc)
        norm = k1 * (1 - b + b * len(doc) / avg_len)
        scores.append(sum(idf[w] * tf[w] * (k1 + 1) / (tf[w] + norm) for w in terms if w in tf))
    return scores


def _best_chunks(query: str, texts: Sequence[str], n: int, *, later_wins_ties: bool) -> tuple[int, ...]:
    """Indices of the ``n`` texts that best match the query, in their original (rank) order."""
    scores = bm25_scores(query, texts)
    order = sorted(range(len(texts)), key=lambda j: (-scores[j], -j if later_wins_ties else j))
    return tuple(sorted(order[:n]))


def select_memories(query: str, candidates: Sequence[Candidate], *, top_k: int, rank_budget: int) -> list[Selection]:
    chosen: list[Selection] = []
    others = [c for c in candidates if not c.session_history]
    history_budget = rank_budget // 2 if others else rank_budget
    budget = history_budget
    for cand in (c for c in candidates if c.session_history):
        n = len(cand.chunk_texts)
        fit = min(n, budget // cand.rank_per_chunk)
        if fit <= 0:
            continue
        if fit == n:
            chosen.append(Selection(cand.record_id, tuple(range(n)), 0.0, "session history, all chunks"))
        else:
            keep = _best_chunks(query, cand.chunk_texts, fit, later_wins_ties=True)
            chosen.append(Selection(cand.record_id, keep, 0.0,
                                    f"session history, best {fit} of {n} chunks for the query within "
                                    f"{'half ' if others else ''}the rank budget"))
        budget -= fit * cand.rank_per_chunk

    if not others:
        return chosen
    budget += rank_budget - history_budget
    if len(others) <= top_k and sum(c.rank for c in others) <= budget:
        everything = "all memories in scope fit the rank budget"
        chosen += [Selection(c.record_id, tuple(range(len(c.chunk_texts))), 0.0, everything) for c in others]
        return chosen

    scores = bm25_scores(query, [" ".join(c.chunk_texts) for c in others])
    ranked = sorted(range(len(others)), key=lambda i: -scores[i])  # stable: ties keep newest-first order
    for place, i in enumerate(ranked[:top_k], start=1):
        cand = others[i]
        if budget < cand.rank_per_chunk:
            break
        if cand.rank <= budget:
            why = f"BM25 rank {place} of {len(others)}"
            chosen.append(Selection(cand.record_id, tuple(range(len(cand.chunk_texts))), scores[i], why))
            budget -= cand.rank
            continue
        n = budget // cand.rank_per_chunk
        why = f"BM25 rank {place} of {len(others)}; best {n} of {len(cand.chunk_texts)} chunks within the rank budget"
        best = _best_chunks(query, cand.chunk_texts, n, later_wins_ties=False)
        chosen.append(Selection(cand.record_id, best, scores[i], why))
        budget -= n * cand.rank_per_chunk
    return chosen


def best_snippets(
    query: str, candidates: Sequence[Candidate], selections: Sequence[Selection], n: int
) -> list[Snippet]:
    """The ``n`` chunk texts of the selected memories most relevant to the query (for hybrid prompts)."""
    if n <= 0:
        return []
    by_id = {c.record_id: c for c in candidates}
    pool = [(s.record_id, j, by_id[s.record_id].chunk_texts[j]) for s in selections for j in s.chunks]
    pool = [p for p in pool if p[2].strip()]
    scores = bm25_scores(query, [p[2] for p in pool])
    order = sorted(range(len(pool)), key=lambda i: -scores[i])[:n]
    return [Snippet(pool[i][0], pool[i][1], pool[i][2], scores[i]) for i in order]
