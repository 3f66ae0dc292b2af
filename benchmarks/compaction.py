"""Chat-history compaction: long held-out conversations, questions about turns the verbatim window lost.

    python benchmarks/compaction.py [--conversations 5] [--chunks 1 2 4] [--benchmarks]

Each conversation has 40 messages: 6 facts stated in the first 12 (values from the held-out split),
small talk after. The messages go into a ``MemoryProvider`` one exchange at a time (verbatim window 8
messages, compaction blocks of 4), as a chat app would send them, so the facts end up only in the
session's compacted chunk adapters. Every fact question is then answered, greedy, contains-match:

- ``window``: the verbatim window alone (a chat app without memory);
- ``memory, all chunks``: the window plus every one of the session's compacted chunk adapters;
- ``memory, k chunks``: the window plus the k chunks recall picks for the question (rank budget
  k × rank per chunk); ``picked`` says how often the chunk stating the fact was among them;
- ``transcript``: all 40 messages verbatim in the prompt (the in-context reference; skipped where they
  do not fit the model's window).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from d2l_store import AdapterStore

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig, Scope
from d2l_memory.evaluation.metrics import contains_match
from d2l_memory.generation import context_window
from d2l_memory.reporting import command_line, save_results, script_command
from d2l_memory.training.synth import long_conversation

logger = logging.getLogger("benchmarks.compaction")
CONFIG = ProviderConfig(verbatim_messages=8, compact_block=4)
EVERY_CHUNK = 1 << 20
"""A rank budget no conversation reaches: the ``memory, all chunks`` row."""
MAX_NEW_TOKENS = 24


def run(engine: MemoryEngine, conversations: int, chunk_budgets: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore.open(f"sqlite:///{tmp}/index.db", Path(tmp) / "blobs")
        provider = MemoryProvider(engine, store, dataclasses.replace(CONFIG, rank_budget=EVERY_CHUNK))
        rank = engine.hypernet.cfg.rank_per_chunk
        budgeted = {k: MemoryProvider(engine, store, dataclasses.replace(CONFIG, rank_budget=k * rank))
                    for k in chunk_budgets}
        for c in range(conversations):
            scope = Scope(tenant="bench", user=f"user{c}", session="chat")
            messages, qas = long_conversation(random.Random(f"compaction/{c}"), "test")
            for i in range(0, len(messages), 2):
                provider.append_messages(scope, messages[i : i + 2])
            window = provider.window(scope)
            record = provider.session_memory(scope)
            chunk_texts = provider.chunk_texts(record) if record else ()
            for qa in qas:
                answers = {
                    "window": engine.generate(qa.question, history=window, max_new_tokens=MAX_NEW_TOKENS),
                    "memory, all chunks": provider.answer(qa.question, scope, max_new_tokens=MAX_NEW_TOKENS).text,
                }
                transcript_tokens = engine.count_prompt_tokens(qa.question, history=messages)
                if transcript_tokens + MAX_NEW_TOKENS <= context_window(engine.model):
                    answers["transcript"] = engine.generate(qa.question, history=messages,
                                                            max_new_tokens=MAX_NEW_TOKENS)
                picked = {}
                for k, budget_provider in budgeted.items():
                    result = budget_provider.answer(qa.question, scope, max_new_tokens=MAX_NEW_TOKENS)
                    answers[f"memory, {k} chunks"] = result.text
                    chosen = [j for s in result.recall.selections for j in s.chunks]
                    picked[f"memory, {k} chunks"] = any(qa.answer in chunk_texts[j] for j in chosen)
                correct = {m: contains_match(a, qa.answer) for m, a in answers.items()}
                rows.append({"conversation": c, "question": qa.question, "gold": qa.answer, "chunks": len(chunk_texts),
                             "answers": answers, "correct": correct, "fact_chunk_picked": picked})
        store.close()
    modes = list(dict.fromkeys(m for r in rows for m in r["answers"]))
    summary = {m: sum(r["correct"][m] for r in rows if m in r["correct"]) / sum(m in r["correct"] for r in rows)
               for m in modes}
    budget_modes = rows[0]["fact_chunk_picked"] if rows else {}
    picked_rate = {m: sum(r["fact_chunk_picked"][m] for r in rows) / len(rows) for m in budget_modes}
    return {"hypernet": engine.hypernet_id, "conversations": conversations, "questions": len(rows),
            "chunks_per_conversation": sorted({r["chunks"] for r in rows}), "seconds": time.perf_counter() - started,
            "accuracy": summary, "fact_chunk_picked": picked_rate, "rows": rows}


def markdown(result: dict[str, Any], command: str, provenance: str = "") -> str:
    lines = [
        "## Chat-history compaction (provider, held-out conversations)",
        "",
        command_line(command, provenance),
        f"Hypernetwork `{result['hypernet']}`; {result['conversations']} conversations of 40 messages (6 facts in the "
        f"first 12), {result['questions']} questions about those facts; compacted into "
        f"{', '.join(map(str, result['chunks_per_conversation']))} chunk adapters per conversation; "
        f"{result['seconds'] / 60:.1f} min. Greedy answers, contains-match.",
        "",
        "| mode | accuracy | chunk stating the fact applied |",
        "|---|---|---|",
    ]
    for mode, acc in result["accuracy"].items():
        picked = result["fact_chunk_picked"].get(mode)
        applied = "all" if mode == "memory, all chunks" else "n/a" if picked is None else f"{100 * picked:.0f}%"
        lines.append(f"| {mode} | {100 * acc:.1f}% | {applied} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4],
                        help="rank budgets, in chunks, for the recall-picked rows")
    parser.add_argument("--hypernet", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.conversations < 1 or any(k < 1 for k in args.chunks):
        parser.error("--conversations and every --chunks value must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = MemoryEngine.from_pretrained(hypernet=args.hypernet)
    result = run(engine, args.conversations, args.chunks)
    text = markdown(result, script_command("compaction.py", argv))
    print(text)
    save_results(result, args.out / "compaction.json", text, "compaction" if args.benchmarks else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
