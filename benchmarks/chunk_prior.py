"""How much of an adapter belongs to its document? A diagnostic of a hypernetwork's single-chunk adapters.

    python benchmarks/chunk_prior.py [--docs 8] [--hypernet DIR] [--out benchmarks/results] [--benchmarks]

One single-chunk adapter per held-out document (``--docs`` each of facts, conversation and tool
documentation, each cut into chunks of up to 512 tokens; the first chunk where a document has more),
then per target module, over the K adapters ΔW_i = B_i A_i:

- ``common share``: K·‖mean ΔW‖² / Σ‖ΔW_i‖², the part of the adapters' energy that is the same for
  every document (1: one adapter for all; near 1/K: nothing shared). A chunked document applies
  that common part once per chunk.
- ``A in r dirs`` / ``B in r dirs``: the share of the energy of all K·r rows of A (columns of B)
  inside their top r singular directions (r = rank per chunk). 1/K would mean K unrelated subspaces;
  1 means every document reads (A) or writes (B) through the same r directions. ``in 1 dir``: the
  same for the top direction alone (1 would mean every slot of every document is one direction).
- ``same-slot |cos|``: mean |cosine| between rank slot s of one document and the same slot of
  another, for A and B; ``other-slot`` is the same for different slots, the baseline. High same-slot
  alignment in A means a slot fires on nearly the same inputs whatever the document.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from d2l_memory import ChunkConfig, MemoryAdapter, MemoryEngine
from d2l_memory.reporting import command_line, save_results, script_command
from d2l_memory.training.synth import make_sample

logger = logging.getLogger("benchmarks.chunk_prior")
DOMAINS = ("facts", "conversation", "tool")
MEASURES = ("common_share", "a_top_1_share", "a_top_r_share", "b_top_1_share", "b_top_r_share", "a_same_slot_cos", "a_other_slot_cos",
            "b_same_slot_cos", "b_other_slot_cos")


def top_r_share(vectors: torch.Tensor, r: int) -> float:
    """Share of the energy of the rows of ``vectors`` inside their top-r singular directions."""
    energies = torch.linalg.svdvals(vectors.double()).pow(2)
    return float(energies[:r].sum() / energies.sum())


def slot_alignment(slots: torch.Tensor) -> tuple[float, float]:
    """(same-slot, other-slot) mean |cos| between documents; ``slots`` is (K documents, r slots, d)."""
    k, r, _ = slots.shape
    unit = torch.nn.functional.normalize(slots.double(), dim=-1)
    cos = torch.einsum("isd,jtd->ijst", unit, unit).abs()  # (K, K, r, r)
    other_doc = ~torch.eye(k, dtype=torch.bool)
    same_slot = torch.eye(r, dtype=torch.bool)
    pairs = cos[other_doc]  # (K·(K-1), r, r)
    return float(pairs[:, same_slot].mean()), float(pairs[:, ~same_slot].mean()) if r > 1 else float("nan")


def measure_module(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], r: int) -> dict[str, float]:
    """The measures for one target module; ``pairs`` holds each document's (A (r, d_in), B (d_out, r))."""
    a = torch.stack([p[0] for p in pairs]).double()  # (K, r, d_in)
    b = torch.stack([p[1].T for p in pairs]).double()  # (K, r, d_out): B's columns as rows
    delta = b.transpose(1, 2) @ a  # (K, d_out, d_in)
    total = delta.pow(2).sum()
    common = len(pairs) * delta.mean(0).pow(2).sum() / total if total > 0 else torch.tensor(float("nan"))
    a_same, a_other = slot_alignment(a)
    b_same, b_other = slot_alignment(b)
    return {"common_share": float(common), "a_top_1_share": top_r_share(a.flatten(0, 1), 1),
            "a_top_r_share": top_r_share(a.flatten(0, 1), r), "b_top_1_share": top_r_share(b.flatten(0, 1), 1),
            "b_top_r_share": top_r_share(b.flatten(0, 1), r), "a_same_slot_cos": a_same,
            "a_other_slot_cos": a_other, "b_same_slot_cos": b_same, "b_other_slot_cos": b_other}


def measure(adapters: Sequence[MemoryAdapter]) -> dict[str, Any]:
    """Per-module measures over single-chunk adapters of different documents, and their summary."""
    if len(adapters) < 2 or any(a.n_chunks != 1 for a in adapters):
        raise ValueError("need at least two single-chunk adapters")
    r = adapters[0].rank_per_chunk
    modules = {name: measure_module([a.weights[name] for a in adapters], r) for name in adapters[0].weights}
    summary = {}
    for key in MEASURES:
        values = [m[key] for m in modules.values()]
        summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return {"adapters": len(adapters), "rank": r, "summary": summary, "modules": modules}


def first_chunks(engine: MemoryEngine, docs_per_domain: int) -> tuple[list[MemoryAdapter], list[str]]:
    adapters, ids = [], []
    for domain in DOMAINS:
        for i in range(docs_per_domain):
            sample = make_sample(0, "test", i, domain)  # type: ignore[arg-type]
            adapters.append(engine.internalize(sample.text, progress=False).select_chunks([0]))
            ids.append(sample.sample_id)
    return adapters, ids


def markdown(result: dict[str, Any], command: str) -> str:
    labels = {"common_share": "common share", "a_top_1_share": "A in 1 dir", "a_top_r_share": "A in r dirs",
              "b_top_1_share": "B in 1 dir", "b_top_r_share": "B in r dirs",
              "a_same_slot_cos": "A same-slot abs cos", "a_other_slot_cos": "A other-slot abs cos",
              "b_same_slot_cos": "B same-slot abs cos", "b_other_slot_cos": "B other-slot abs cos"}
    lines = ["## Adapter structure: what single-chunk adapters share across documents", "",
             command_line(command, ""),
             f"Hypernetwork `{result['hypernet']}`; {result['adapters']} held-out documents, one chunk each, rank "
             f"{result['rank']}; {len(result['modules'])} target modules; {result['seconds']:.0f} s.", "",
             "| measure | mean | min | max |", "|---|---|---|---|"]
    for key, label in labels.items():
        s = result["summary"][key]
        lines.append(f"| {label} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8, help="held-out documents per domain")
    parser.add_argument("--hypernet", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.docs < 1:
        parser.error("--docs must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    # Whole documents as one chunk (up to 512 tokens), as this diagnostic has always measured, not the
    # finer pieces the engine cuts short documents into by default.
    whole = ChunkConfig(chunk_tokens=512, min_chunk_tokens=512)
    engine = MemoryEngine.from_pretrained(hypernet=args.hypernet, chunking=whole)
    adapters, ids = first_chunks(engine, args.docs)
    result = {"hypernet": engine.hypernet_id, "documents": ids, **measure(adapters),
              "seconds": time.perf_counter() - started}
    text = markdown(result, script_command("chunk_prior.py", argv))
    print(text)
    save_results(result, args.out / "chunk_prior.json", text, "chunk-prior" if args.benchmarks else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
