"""How finely to cut documents: greedy fact answers of one hypernetwork under several chunking policies.

    python benchmarks/chunking.py [--hypernet DIR] [--seed 1] [--docs 120] [--policies 512:512:1 32:32:64 ...]
                                  [--modes adapter wrong_adapter adapter_recall] [--benchmarks]

Every chunk of a document gets an adapter of the same rank, so cutting a short document finer stores it
with more rank per fact. A policy ``CAP:MIN:PIECES`` is a ``ChunkConfig``: chunks of at most CAP
tokens; short documents cut into up to PIECES even chunks of at most MIN tokens (``MIN = CAP`` is
plain fixed-size chunking). Each policy internalizes the same held-out fact documents and answers the
same questions (``d2l-memory eval``'s harness), in these modes:

- ``adapter``: every chunk adapter of the document applied;
- ``wrong_adapter``: another document's adapters (the control: what a policy gains without the
  document's content);
- ``adapter_recall``: only the chunks the memory provider's recall picks for the question within its
  rank budget (``--rank-budget``, default ``ProviderConfig.rank_budget``), which is what
  ``MemoryProvider.answer`` applies;
  documents with no more chunks than the budget get all of them, as in the provider.

The default ``--seed 1`` draws documents other than the judge's and ``d2l-memory eval``'s (seed 0),
so a policy picked here is not picked on the documents it is then reported on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from d2l_memory import ChunkConfig, MemoryEngine
from d2l_memory.chunking import chunk_count
from d2l_memory.evaluation.harness import EvalConfig, run_eval
from d2l_memory.evaluation.rows import MODES, provider_recall_rows, row_key
from d2l_memory.provider import ProviderConfig
from d2l_memory.reporting import command_line, save_results, script_command

logger = logging.getLogger("benchmarks.chunking")
DEFAULT_POLICIES = ("512:512:1", "32:32:64", "512:32:8", "512:24:12", "512:16:16")
LENGTH_BUCKETS = ((0, 100), (100, 200), (200, 10**9))
BYTES_PER_VALUE = 2  # adapters are stored as float16 by default (ProviderConfig.storage_dtype)


def parse_policy(text: str) -> ChunkConfig:
    """``CAP:MIN:PIECES`` → ChunkConfig; a typed argparse error names a bad spec."""
    try:
        cap, low, pieces = (int(x) for x in text.split(":"))
        return ChunkConfig(chunk_tokens=cap, min_chunk_tokens=low, short_document_chunks=pieces)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"policy {text!r} is not CAP:MIN:PIECES with positive whole numbers "
                                         f"({err})") from None


def policy_name(c: ChunkConfig) -> str:
    return f"{c.chunk_tokens}:{c.min_chunk_tokens}:{c.short_document_chunks}"


def _rate(rows: list[dict[str, Any]]) -> float | None:
    return sum(r["contains"] for r in rows) / len(rows) if rows else None


def policy_row(result: dict[str, Any], chunking: ChunkConfig, chunk_mb: float) -> dict[str, Any]:
    """One policy's summary: accuracy per mode, per value kind and per document length, and its cost."""
    facts = [r for r in result["rows"] if r["domain"] == "facts"]
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in facts:
        by_mode[r["mode"]].append(r)
    own = by_mode["adapter"]
    docs = {r["doc"]: r["tokens"] for r in facts}
    chunks = [chunk_count(n, chunking) for n in docs.values()]
    accuracy = {mode: _rate(rows) for mode, rows in by_mode.items()}
    if "adapter_recall" in result["config"]["modes"] and own:
        keyed = {mode: {row_key(r): r for r in rows} for mode, rows in by_mode.items()}
        provider = provider_recall_rows(keyed["adapter"], keyed.get("adapter_recall", {}))
        accuracy["adapter_recall"] = _rate(list(provider.values()))
    return {
        "policy": policy_name(chunking),
        "chunking": dataclasses.asdict(chunking),
        "accuracy": accuracy,
        "unseen": _rate([r for r in own if r["open_value"]]),
        "closed_set": _rate([r for r in own if not r["open_value"]]),
        "by_length": {f"{lo}-{hi if hi < 10**9 else ''}": _rate([r for r in own if lo <= r["tokens"] < hi])
                      for lo, hi in LENGTH_BUCKETS},
        "chunks_per_doc": sum(chunks) / len(chunks),
        "max_chunks": max(chunks),
        "adapter_mb_per_doc": chunk_mb * sum(chunks) / len(chunks),
        "internalize_s_per_doc": result["internalize_seconds_mean"],
        "mode_seconds": result["mode_seconds"],
    }


def chunk_megabytes(engine: MemoryEngine) -> float:
    """Stored size of one chunk adapter (every target's A and B, all layers) at float16."""
    cfg = engine.hypernet.cfg
    values = sum(cfg.num_layers * cfg.rank_per_chunk * (t.d_in + t.d_out) for t in cfg.targets)
    return values * BYTES_PER_VALUE / 1e6


def markdown(result: dict[str, Any], command: str) -> str:
    modes = result["modes"]
    lengths = [f"{lo}–{hi - 1}" if hi < 10**9 else f"{lo}+" for lo, hi in LENGTH_BUCKETS]
    lines = [
        "## Chunking policy: how finely documents are cut (held-out fact documents)", "",
        command_line(command, ""),
        f"Hypernetwork `{result['hypernet']}`; {result['docs']} fact documents of seed {result['seed']} "
        f"({result['questions']} questions; seed 0 is the judge's set), greedy answers, contains-match, %. "
        f"Policy `CAP:MIN:PIECES`: chunks of at most CAP tokens, short documents cut into up to PIECES even "
        f"chunks of at most MIN tokens, longer ones into chunks of up to CAP (`ChunkConfig`). adapter_recall "
        f"applies the chunks recall picks within a rank budget of {result['rank_budget']} "
        f"({result['rank_budget'] // result['rank']} chunks). Adapter MB at float16. {result['seconds'] / 60:.1f} min.", "",
        "| policy | " + " | ".join(modes) + " | unseen values | closed-set values | "
        + " | ".join(f"{x} tokens" for x in lengths) + " | chunks per doc (max) | adapter MB per doc | "
        "internalize s per doc |",
        "|---|" + "---|" * (len(modes) + 2 + len(lengths) + 3),
    ]

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    for p in result["policies"]:
        cells = [pct(p["accuracy"].get(m)) for m in modes] + [pct(p["unseen"]), pct(p["closed_set"])]
        cells += [pct(v) for v in p["by_length"].values()]
        cells += [f"{p['chunks_per_doc']:.1f} ({p['max_chunks']})", f"{p['adapter_mb_per_doc']:.1f}",
                  f"{p['internalize_s_per_doc']:.2f}"]
        lines.append(f"| `{p['policy']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=1, help="document draw (default 1; the judge's is 0)")
    parser.add_argument("--docs", type=int, default=120, help="held-out fact documents")
    parser.add_argument("--policies", type=parse_policy, nargs="+",
                        default=[parse_policy(p) for p in DEFAULT_POLICIES], metavar="CAP:MIN:PIECES")
    parser.add_argument("--modes", nargs="+", choices=("adapter", "wrong_adapter", "adapter_recall"),
                        default=["adapter", "wrong_adapter", "adapter_recall"])
    parser.add_argument("--rank-budget", type=int, default=ProviderConfig().rank_budget,
                        help="adapter_recall's rank budget (default: the provider's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if "adapter_recall" in args.modes and "adapter" not in args.modes:
        parser.error("adapter_recall needs the adapter mode (documents within the budget use its answers)")
    if args.rank_budget < 1:
        parser.error("--rank-budget must be at least 1")
    if args.docs < 2:
        parser.error("--docs must be at least 2 (each document is another's wrong-adapter control)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    engine = MemoryEngine.from_pretrained(hypernet=args.hypernet)
    rank, budget = engine.hypernet.cfg.rank_per_chunk, args.rank_budget
    modes = tuple(m for m in MODES if m in args.modes)
    cfg = EvalConfig(seed=args.seed, docs={"facts": args.docs}, needle_tokens=(), modes=modes,
                     recall_chunks=max(1, budget // rank))
    policies = []
    for chunking in args.policies:
        logger.info("policy %s", policy_name(chunking))
        result = run_eval(engine.with_chunking(chunking), cfg, progress=False)
        policies.append(policy_row(result, chunking, chunk_megabytes(engine)))
        logger.info("policy %s: %s", policy_name(chunking), policies[-1]["accuracy"])
    n_questions = result["n_questions"]
    summary = {"hypernet": engine.hypernet_id, "seed": args.seed, "docs": args.docs, "questions": n_questions,
               "modes": list(modes), "rank": rank, "rank_budget": budget, "policies": policies,
               "seconds": time.perf_counter() - started}
    text = markdown(summary, script_command("chunking.py", argv))
    print(text)
    save_results(summary, args.out / "chunking.json", text, "chunking" if args.benchmarks else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
