"""The same documents answered by a classic BM25 RAG query engine and by D2LQueryEngine, side by side.

    .venv/bin/python examples/llamaindex_rag.py [--docs DIR] [--question Q ...] [--store DIR]

1. classic RAG: llama-index-core's RetrieverQueryEngine; a BM25 retriever over SentenceSplitter
   nodes finds chunks and the base model (a D2LLLM with no memories) reads them in its prompt;
2. D2L adapters: D2LQueryEngine.from_documents internalizes each document once into a stored
   memory; per question the recalled memories' adapters are active and the prompt is the question;
3. D2L hybrid: the adapters plus the 3 best-matching chunks in the prompt.

For each question: the answer, the latency and the prompt tokens of each. Runs offline on the
defaults (SmolLM2-135M-Instruct and the shipped hypernetwork). Memories go to a temporary store
unless --store names a folder. With a base model that has no trained hypernetwork the adapters are
zero and the "D2L adapters" answers are the base model's answers without any context: the script
says so.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_index.core import Document, SimpleDirectoryReader
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from llama_index.memory.d2l import D2LLLM, D2LQueryEngine, shared_engine
from llama_index.memory.d2l.retriever import bm25_scores

SAMPLE_DOCUMENTS = {
    "people.md": "Orvane Tessaly lives in Brakmoor and works for Quillfen Logistics. Orvane was born in 1987. "
                 "Orvane's badge number is 4821, and Orvane plays the cello. Orvane's sister, Mirel Tessaly, "
                 "lives in Dastow and works as a pharmacist.",
    "tools.md": "The tool sync_ledger(batch_size=64, retries=3) reconciles the warehouse ledger. If the ledger "
                "is locked it raises LedgerBusyError. The tool export_manifest(fmt='csv') writes the manifest.",
    "office.md": "The Quillfen office in Brakmoor opens at 7:30. The canteen serves barley soup on Wednesdays. "
                 "Parking permits are renewed every March at the front desk.",
}
SAMPLE_QUESTIONS = (
    "Where does Orvane Tessaly live?",
    "What is the default value of retries in sync_ledger?",
    "What does the canteen serve on Wednesdays?",
)


class BM25NodeRetriever(BaseRetriever):
    """Classic sparse retrieval: the top-k nodes by BM25 (the same scorer D2LRetriever uses)."""

    def __init__(self, nodes: list[BaseNode], similarity_top_k: int = 2) -> None:
        self.nodes = nodes
        self.similarity_top_k = similarity_top_k
        super().__init__()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        scores = bm25_scores(query_bundle.query_str, [n.get_content() for n in self.nodes])
        best = sorted(range(len(self.nodes)), key=lambda i: -scores[i])[: self.similarity_top_k]
        return [NodeWithScore(node=self.nodes[i], score=scores[i]) for i in best]


class PromptTokens(BaseEventHandler):
    """Sums the prompt tokens D2LLLM reports for every LLM call (a query may make several)."""

    total: int = 0

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)) and event.response is not None:
            self.total += int(event.response.additional_kwargs.get("prompt_tokens", 0))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def load_documents(folder: Path | None) -> list[Document]:
    if folder is not None:
        return SimpleDirectoryReader(str(folder), required_exts=[".md", ".txt"]).load_data()
    return [Document(text=text, metadata={"file_path": name}) for name, text in SAMPLE_DOCUMENTS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, help="folder of .md/.txt documents (default: built-in samples)")
    parser.add_argument("--question", action="append", help="question to ask (repeatable)")
    parser.add_argument("--store", type=Path, help="folder for the memory store (default: a temporary one)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    documents = load_documents(args.docs)
    questions = tuple(args.question or SAMPLE_QUESTIONS)
    store = args.store or Path(tempfile.mkdtemp(prefix="d2l-llamaindex-"))
    store.mkdir(parents=True, exist_ok=True)

    print("Loading the base model and hypernetwork (offline)...")
    engine, load_s = timed(shared_engine)
    print(f"  loaded in {load_s:.1f} s; hypernetwork {engine.hypernet_id}"
          + ("" if engine.hypernet_trained else "\n  UNTRAINED hypernetwork: its adapters are zero, so 'D2L adapters' "
             "answers are the base model's answers with no context at all."))

    # Classic RAG: split, index for BM25, retrieve top chunks into the prompt of the plain base model.
    nodes = SentenceSplitter(chunk_size=128, chunk_overlap=16).get_nodes_from_documents(documents)
    llm = D2LLLM(engine=engine, max_new_tokens=args.max_new_tokens)
    classic = RetrieverQueryEngine.from_args(BM25NodeRetriever(nodes), llm=llm)

    # D2L: one memory per document, internalized once (re-runs against the same --store cost nothing).
    common = {"engine": engine, "index_url": f"sqlite:///{store / 'index.db'}", "blob_root": str(store / "blobs"),
              "max_new_tokens": args.max_new_tokens}
    adapters, write_s = timed(lambda: D2LQueryEngine.from_documents(documents, "examples/llamaindex", **common))
    hybrid = D2LQueryEngine("examples/llamaindex", hybrid=True, **common)
    print(f"\n{len(documents)} documents: {len(nodes)} BM25 nodes for classic RAG; "
          f"internalized into adapters in {write_s:.1f} s (store: {store})")

    counter = PromptTokens()
    get_dispatcher().add_event_handler(counter)
    totals = {"classic BM25 RAG": [0.0, 0], "D2L adapters": [0.0, 0], "D2L hybrid": [0.0, 0]}
    for question in questions:
        print(f"\nQ: {question}")
        counter.total = 0
        response, seconds = timed(lambda: classic.query(question))
        rows = [("classic BM25 RAG", response.response, seconds, counter.total)]
        for label, engine_ in (("D2L adapters", adapters), ("D2L hybrid", hybrid)):
            response, seconds = timed(lambda: engine_.query(question))
            rows.append((label, response.response, seconds, response.metadata["prompt_tokens"]))
        for label, answer, seconds, tokens in rows:
            short = textwrap.shorten((answer or "").replace("\n", " "), width=80, placeholder=" ...")
            print(f"  {label:<17} {seconds:5.2f} s  {tokens:4d} prompt tokens | {short}")
            totals[label][0] += seconds
            totals[label][1] += tokens

    print(f"\nMean over {len(questions)} questions:")
    for label, (seconds, tokens) in totals.items():
        print(f"  {label:<17} {seconds / len(questions):5.2f} s  {tokens / len(questions):6.0f} prompt tokens")


if __name__ == "__main__":
    main()
