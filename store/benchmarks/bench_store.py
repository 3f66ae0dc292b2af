"""Throughput and latency of d2l-store puts and gets for adapters the size of the default model's.

The default base model is SmolLM2-135M: the hypernetwork writes a rank-8 LoRA per chunk into
`mlp.down_proj` of all 30 layers (d_in 1536, d_out 576), in float16, so one chunk is
30 * 8 * (1536 + 576) * 2 bytes = 1.01 MB and a memory of n chunks is n times that.

    .venv/bin/python store/benchmarks/bench_store.py                      # SQLite only
    .venv/bin/python store/benchmarks/bench_store.py --postgres-url postgresql://user:pw@127.0.0.1/db

One client, sequential calls; every put stores distinct bytes (no dedupe shortcut), every get
re-hashes its blob and decodes it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
import torch

from d2l_store import AdapterStore, MemoryKind, Scope

LAYERS, D_IN, D_OUT, RANK = 30, 1536, 576, 8
BASE, HYPER = "HuggingFaceTB/SmolLM2-135M-Instruct", "d2l-hypernet@bench"


def make_adapter(n_chunks: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n_chunks)
    out = {}
    for layer in range(LAYERS):
        m = f"model.layers.{layer}.mlp.down_proj"
        out[f"{m}.lora_A"] = (torch.randn(n_chunks * RANK, D_IN, generator=g) * 0.02).half()
        out[f"{m}.lora_B"] = (torch.randn(D_OUT, n_chunks * RANK, generator=g) * 0.02).half()
    return out


@dataclass
class Result:
    backend: str
    n_chunks: int
    mbytes: float
    put_s: list[float]
    get_s: list[float]


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench(store: AdapterStore, backend: str, n_chunks: int, n_ops: int) -> Result:
    tensors = make_adapter(n_chunks)
    a0 = tensors["model.layers.0.mlp.down_proj.lora_A"]
    scope = Scope(tenant="bench", user=uuid.uuid4().hex[:8])
    spans = [(i * 512, (i + 1) * 512) for i in range(n_chunks)]
    ids: list[str] = []
    counter = iter(range(10**9))

    def put() -> None:
        a0[0, 0] = next(counter)  # distinct bytes each time, so no put is a dedupe no-op
        ids.append(store.put(tensors, scope=scope, kind=MemoryKind.DOCUMENT, base_model=BASE, hypernet=HYPER,
                             rank_per_chunk=RANK, chunk_spans=spans).id)  # fmt: skip

    put()  # warm up: connections, directories, caches
    store.get(ids[0])
    put_s = _timed(put, n_ops)
    rng = random.Random(0)
    get_s = _timed(lambda: store.get(rng.choice(ids), scope=scope, expect_base_model=BASE), n_ops)
    mbytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    store.delete_scope(scope)
    store.gc_blobs(grace_s=0)
    return Result(backend, n_chunks, mbytes, put_s, get_s)


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def table(results: list[Result]) -> str:
    rows = [
        "| index | chunks | adapter MB | ops | puts/s | put p50 ms | put p99 ms | gets/s | get p50 ms | get p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.backend} | {r.n_chunks} | {r.mbytes:.1f} | {len(r.put_s)} | {len(r.put_s) / sum(r.put_s):.1f} "
            f"| {pct(r.put_s, 50):.1f} | {pct(r.put_s, 99):.1f} | {len(r.get_s) / sum(r.get_s):.1f} "
            f"| {pct(r.get_s, 50):.1f} | {pct(r.get_s, 99):.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--postgres-url", default=os.environ.get("D2L_BENCH_POSTGRES_URL"),
                   help="also benchmark a PostgreSQL index (default: $D2L_BENCH_POSTGRES_URL)")  # fmt: skip
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 64], help="memory sizes in chunks")
    p.add_argument(
        "--ops", type=int, nargs="+", default=[200, 50, 12], help="puts (and gets) per size, one per --chunks"
    )
    p.add_argument("--dir", type=Path, default=None, help="where blobs and the SQLite index go (default: a temp dir)")
    args = p.parse_args(argv)
    if len(args.ops) != len(args.chunks):
        p.error(f"--ops needs one count per --chunks value ({len(args.chunks)}), got {len(args.ops)}")

    torch.set_num_threads(1)
    print(f"python {platform.python_version()}, torch {torch.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.platform()}", file=sys.stderr)  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        indexes = [("SQLite", f"sqlite:///{tmp}/index.db")]
        if args.postgres_url:
            indexes.append(("PostgreSQL", args.postgres_url))
        for name, url in indexes:
            with AdapterStore.open(url, Path(tmp) / f"blobs-{name}") as store:
                for n_chunks, n_ops in zip(args.chunks, args.ops, strict=True):
                    print(f"{name}: {n_chunks} chunks x {n_ops} ops ...", file=sys.stderr)
                    results.append(bench(store, name, n_chunks, n_ops))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
