"""The evaluation harness: held-out documents answered in every mode, scored the same way.

Modes (each a way of giving the model the document):
    none           the question alone;
    in_context     the whole document in the prompt (only where it fits the window);
    rag            the BM25 top chunks of the document in the prompt;
    adapter        the document's D2L adapter, question alone in the prompt;
    adapter_recall the adapters of the document's chunks that the memory provider's recall picks for
                   the question (BM25 against each chunk's text, best ``recall_chunks`` kept), question
                   alone in the prompt; only documents cut into more chunks than that (on the others
                   it is the adapter mode);
    hybrid         adapter + the BM25 top chunks;
    wrong_adapter  another document's adapter (control: must stay near ``none``);
    distill        a context-distilled LoRA (gradient-trained per document; small subset only).
Every document comes from the held-out split: entities, values and half the phrasings never
appear in training.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rank_bm25 import BM25Okapi
from tqdm.auto import tqdm

from d2l_memory.adapter import MemoryAdapter
from d2l_memory.engine import MemoryEngine
from d2l_memory.evaluation.distill import DistillConfig, context_distill
from d2l_memory.evaluation.metrics import contains_match, exact_match, states_other_fact, token_f1
from d2l_memory.evaluation.rows import HYPERNET_FREE_MODES, MODES, is_short_doc, row_key, value_set
from d2l_memory.chunking import span_texts
from d2l_memory.config import GenerationConfig
from d2l_memory.errors import IncomparableEvaluationError
from d2l_memory.generation import context_window, generate_batch, prompt_ids
from d2l_memory.recall import Candidate, select_memories, words
from d2l_memory.training.synth import QA, Sample, make_sample, needle_document

logger = logging.getLogger(__name__)

HYPERNET_ONLY_SETTINGS = ("modes", "recall_chunks")
"""Settings that change only hypernetwork-dependent rows, so reused rows need not agree on them."""


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    docs: dict[str, int] = field(default_factory=lambda: {"facts": 40, "conversation": 16, "tool": 16})
    questions_per_doc: int = 4
    needle_tokens: tuple[int, ...] = (1024, 4096, 12288)
    """Needle documents are cut to about this many tokens (12K is past SmolLM2's 8K window)."""
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    distill_docs: int = 4
    """Fact documents that also get a context-distilled LoRA (about a minute each on CPU)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    rag_chunk_tokens: int = 128
    rag_top_k: int = 2
    recall_chunks: int = 2
    """Chunk adapters the adapter_recall mode applies (rank budget = this × rank per chunk)."""
    max_new_tokens: int = 24
    batch_size: int = 8
    modes: tuple[str, ...] = MODES


@dataclass
class Doc:
    sample: Sample
    qas: list[QA]
    memory: MemoryAdapter | None = None
    chunk_texts: tuple[str, ...] = ()
    """Source text of each chunk of ``memory`` (what recall ranks)."""
    tokens: int = 0
    needle_depth: float | None = None
    needle_target_tokens: int | None = None
    """The length a needle document was cut to (its token count varies a little around it)."""
    distilled: MemoryAdapter | None = None
    in_distill_subset: bool = False
    """One of the fact documents that the distill mode covers (the subset its table compares on)."""


@dataclass(frozen=True)
class Row:
    doc: int
    qa: QA


def build_docs(engine: MemoryEngine, cfg: EvalConfig) -> list[Doc]:
    docs: list[Doc] = []
    for domain, count in cfg.docs.items():
        for i in range(count):
            sample = make_sample(cfg.seed, "test", i, domain)  # type: ignore[arg-type]
            rng = random.Random(f"eval/{cfg.seed}/{sample.sample_id}")
            qas = rng.sample(list(sample.qas), min(cfg.questions_per_doc, len(sample.qas)))
            docs.append(Doc(sample, qas))
    for n_tokens in cfg.needle_tokens:
        for depth in cfg.needle_depths:
            rng = random.Random(f"eval/{cfg.seed}/needle/{n_tokens}/{depth}")
            text, qas = needle_document(rng, "test", n_chars=int(n_tokens * 4.2), depth=depth)
            sample = Sample(f"test-needle-{n_tokens}-{depth}", "needle", text, tuple(qas))
            docs.append(Doc(sample, list(qas), needle_depth=depth, needle_target_tokens=n_tokens))
    for doc in docs:
        doc.tokens = len(engine.tokenizer.encode(doc.sample.text, add_special_tokens=False))
    if "distill" in cfg.modes:
        for doc in [d for d in docs if d.sample.domain == "facts"][: cfg.distill_docs]:
            doc.in_distill_subset = True
    return docs


def _json_form(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def reusable_rows(
    previous: dict[str, Any], engine: MemoryEngine, cfg: EvalConfig, docs: Sequence[Doc]
) -> list[dict[str, Any]]:
    """The hypernetwork-free rows of an earlier result, after checking it answered the same questions
    about the same documents with the same base model and settings; the error says what differs."""
    ours, theirs = _json_form(asdict(cfg)), dict(previous.get("config", {}))
    for key in HYPERNET_ONLY_SETTINGS:
        ours.pop(key, None), theirs.pop(key, None)
    if ours != theirs:
        differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise IncomparableEvaluationError(
            f"the earlier evaluation used other settings ({', '.join(differing)}): its rows cannot be reused")
    if previous.get("base_model") != engine.base_model_id:
        raise IncomparableEvaluationError(
            f"the earlier evaluation ran on base model {previous.get('base_model')}, not {engine.base_model_id}")
    expected = {(d.sample.sample_id, qa.question, d.tokens) for d in docs for qa in d.qas}
    rows = [r for r in previous.get("rows", []) if r["mode"] in HYPERNET_FREE_MODES and r["mode"] in cfg.modes]
    answered_none = {row_key(r) for r in rows if r["mode"] == "none"}
    if "none" in cfg.modes and answered_none != expected:
        raise IncomparableEvaluationError(
            "the earlier evaluation's documents or questions differ from these (generator or tokenizer changed)")
    if any(row_key(r) not in expected for r in rows):
        raise IncomparableEvaluationError(
            "the earlier evaluation has rows for documents or questions that this one does not")
    # Results saved before rows recorded ``other_fact`` get it from the same documents here.
    answers = {d.sample.sample_id: [qa.answer for qa in d.sample.qas] for d in docs}
    return [r if "other_fact" in r else
            {**r, "other_fact": states_other_fact(r["answer"], r["gold"], r["question"], answers[r["doc"]])}
            for r in rows]


def rag_context(engine: MemoryEngine, text: str, question: str, cfg: EvalConfig) -> str:
    # The RAG baseline keeps rank_bm25's Okapi scores (not recall's bm25_scores) so that its rows stay
    # comparable with, and reusable from, evaluations run before recall changed its scoring.
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    size = cfg.rag_chunk_tokens
    chunks = [engine.tokenizer.decode(ids[s : s + size]) for s in range(0, len(ids), size)]
    scores = BM25Okapi([words(c) or ["\u2205"] for c in chunks]).get_scores(words(question))
    best = sorted(sorted(range(len(chunks)), key=lambda i: -scores[i])[: cfg.rag_top_k])  # document order
    return "\n...\n".join(chunks[i].strip() for i in best)


def recalled_chunks(memory: MemoryAdapter, chunk_texts: Sequence[str], question: str, n_chunks: int) -> MemoryAdapter:
    """The chunks of one memory that the provider's recall applies within a budget of ``n_chunks`` chunks."""
    candidate = Candidate("doc", "document", None, tuple(chunk_texts), memory.rank_per_chunk, session_history=False)
    (selection,) = select_memories(question, [candidate], top_k=1, rank_budget=n_chunks * memory.rank_per_chunk)
    return memory.select_chunks(selection.chunks)


def _wrong_partner(docs: Sequence[Doc], index: int) -> int:
    """The next document of the same domain (a different document, same kind of content)."""
    same = [i for i, d in enumerate(docs) if d.sample.domain == docs[index].sample.domain]
    return same[(same.index(index) + 1) % len(same)]


def _inputs(
    engine: MemoryEngine, docs: list[Doc], row: Row, mode: str, cfg: EvalConfig
) -> tuple[MemoryAdapter | None, str | None] | None:
    """(adapter, context) for one row in one mode, or None when the mode does not apply."""
    doc = docs[row.doc]
    if mode == "none":
        return None, None
    if mode == "in_context":
        prompt = prompt_ids(engine.tokenizer, row.qa.question, doc.sample.text)
        if len(prompt) + cfg.max_new_tokens > context_window(engine.model):
            return None  # cannot run at all: the document does not fit
        return None, doc.sample.text
    if mode == "rag":
        return None, rag_context(engine, doc.sample.text, row.qa.question, cfg)
    if mode == "adapter":
        return doc.memory, None
    if mode == "adapter_recall":
        if doc.memory is None or doc.memory.n_chunks <= cfg.recall_chunks:
            return None  # every chunk fits the budget: the same answer as the adapter mode
        return recalled_chunks(doc.memory, doc.chunk_texts, row.qa.question, cfg.recall_chunks), None
    if mode == "hybrid":
        return doc.memory, rag_context(engine, doc.sample.text, row.qa.question, cfg)
    if mode == "wrong_adapter":
        return docs[_wrong_partner(docs, row.doc)].memory, None
    if mode == "distill":
        return (doc.distilled, None) if doc.distilled is not None else None
    raise ValueError(f"unknown mode {mode!r}")


def run_eval(engine: MemoryEngine, cfg: EvalConfig = EvalConfig(), progress: bool = True,
             reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every mode of ``cfg`` on the held-out documents. With ``reuse`` (an earlier result of the same
    settings and base model), the hypernetwork-free modes are copied from it instead of recomputed."""
    started = time.perf_counter()
    docs = build_docs(engine, cfg)
    reused = reusable_rows(reuse, engine, cfg, docs) if reuse is not None else []
    reused_modes = sorted({r["mode"] for r in reused}, key=MODES.index)
    write_seconds: list[float] = []
    for doc in tqdm(docs, desc="internalizing", disable=not progress):
        t0 = time.perf_counter()
        doc.memory = engine.internalize(doc.sample.text, progress=False)
        if "adapter_recall" in cfg.modes:  # only that mode ranks chunk texts: skip re-tokenising otherwise
            doc.chunk_texts = tuple(span_texts(doc.sample.text, engine.tokenizer, doc.memory.chunk_spans))
        write_seconds.append(time.perf_counter() - t0)
    if "distill" in cfg.modes and "distill" not in reused_modes:
        subset = [d for d in docs if d.in_distill_subset]
        for doc in tqdm(subset, desc="context distillation", disable=not progress):
            doc.distilled = context_distill(engine, doc.sample.text, cfg.distill, seed=cfg.seed)
    rows = [Row(i, qa) for i, doc in enumerate(docs) for qa in doc.qas]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    results: list[dict[str, Any]] = list(reused)
    mode_seconds: dict[str, float] = {}
    for mode in (m for m in cfg.modes if m not in reused_modes):
        todo = [(row, inputs) for row in rows if (inputs := _inputs(engine, docs, row, mode, cfg)) is not None]
        # Similar prompt lengths share a batch, so short prompts are not padded to a 4K-token one.
        todo.sort(key=lambda item: len(item[1][1] or ""))
        t0 = time.perf_counter()
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"answering ({mode})", disable=not progress):
            batch = todo[start : start + cfg.batch_size]
            prompts = [prompt_ids(engine.tokenizer, row.qa.question, ctx) for row, (_, ctx) in batch]
            adapters = [adapter for _, (adapter, _) in batch]
            answers, _ = generate_batch(engine.model, engine.tokenizer, prompts, gen,
                                        None if all(a is None for a in adapters) else adapters)
            for (row, _), answer in zip(batch, answers, strict=True):
                results.append(_score(docs[row.doc], row.qa, mode, answer))
        mode_seconds[mode] = time.perf_counter() - t0
    return {
        "config": asdict(cfg),
        "base_model": engine.base_model_id,
        "hypernet": engine.hypernet_id,
        "hypernet_trained": engine.hypernet_trained,
        "chunking": asdict(engine.chunking),
        "n_docs": len(docs),
        "n_questions": len(rows),
        "internalize_seconds_mean": sum(write_seconds) / len(write_seconds),
        "mode_seconds": mode_seconds,
        "total_seconds": time.perf_counter() - started,
        "reused": {"modes": reused_modes, "hypernet": reuse.get("hypernet")} if reused_modes and reuse else None,
        "summary": summarise(results),
        "rows": results,
    }


def _score(doc: Doc, qa: QA, mode: str, answer: str) -> dict[str, Any]:
    return {
        "doc": doc.sample.sample_id, "domain": doc.sample.domain, "tokens": doc.tokens, "depth": doc.needle_depth,
        "target_tokens": doc.needle_target_tokens,
        "mode": mode, "question": qa.question, "gold": qa.answer, "answer": answer, "kind": qa.kind,
        "value_class": qa.value_class, "open_value": qa.open_value, "distilled_doc": doc.in_distill_subset,
        "contains": contains_match(answer, qa.answer), "exact": exact_match(answer, qa.answer),
        "f1": token_f1(answer, qa.answer),
        "other_fact": states_other_fact(answer, qa.answer, qa.question, (q.answer for q in doc.sample.qas)),
    }  # fmt: skip


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else float("nan")


def _group(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[str, dict[str, Any]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {str(k): {"n": len(v), "contains": _mean(v, "contains"), "exact": _mean(v, "exact"), "f1": _mean(v, "f1")}
            for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_mode[r["mode"]].append(r)
    out: dict[str, Any] = {}
    for mode, rows in by_mode.items():
        docs_rows = [r for r in rows if is_short_doc(r)]
        facts = [r for r in rows if r["domain"] == "facts"]
        out[mode] = {
            "short_docs": _group(docs_rows, lambda r: "all"),
            "by_domain": _group(rows, lambda r: r["domain"]),
            "facts_by_value": _group(facts, value_set),
            "by_value_class": _group(docs_rows, lambda r: r["value_class"]),
            "needle_by_length": _group([r for r in rows if r["domain"] == "needle"], lambda r: r["target_tokens"]),
            "needle_by_depth": _group([r for r in rows if r["domain"] == "needle"], lambda r: r["depth"]),
            "distill_subset": _group([r for r in rows if r["distilled_doc"]], lambda r: "subset"),
            "wrong_answers": _wrong_answers(docs_rows),
        }
    return out


def _wrong_answers(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per domain: questions, wrong answers, and wrong answers that state another fact of the document."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        cell = out.setdefault(r["domain"], {"n": 0, "wrong": 0, "other_fact": 0})
        cell["n"] += 1
        cell["wrong"] += not r["contains"]
        cell["other_fact"] += r["other_fact"]
    return dict(sorted(out.items()))
