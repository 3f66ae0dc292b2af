"""Helpers shared by the store tests: adapter factories, server requirements, store openers.

A plain module (not conftest) so subprocess targets can import it too; its name is unique in the
repository because pytest puts every test directory on sys.path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from d2l_store import AdapterStore, MemoryKind, Scope

POSTGRES_ENV = "D2L_TEST_POSTGRES_URL"
S3_ENV = "D2L_TEST_S3_ENDPOINT"
S3_BUCKET = "d2l-store-tests"
START_HINT = "start them with `store/scripts/start_test_servers.sh /tmp/env && . /tmp/env`"

BASE = "tiny-llama@sha256:0000"
HYPER = "hypernet@sha256:1111"
MODULES = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


def require_env(name: str, what: str) -> str:
    """The variable's value; if unset, skip the test, except on CI (CI=true) where it must fail,
    so a CI run can never pass by silently skipping its server tests."""
    value = os.environ.get(name, "")
    if value:
        return value
    msg = f"{what} tests need {name}; {START_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{msg} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


def ensure_bucket(endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(endpoint))
    if not fs.exists(S3_BUCKET):
        fs.mkdir(S3_BUCKET)


def make_adapter(
    n_chunks: int = 2,
    r: int = 4,
    modules: Sequence[str] = MODULES,
    d_in: int = 24,
    d_out: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors in the store's convention: A (R, d_in), B (d_out, R), R = n_chunks * r."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"{m}.lora_A"] = torch.randn(n_chunks * r, d_in, generator=g).to(dtype)
        out[f"{m}.lora_B"] = torch.randn(d_out, n_chunks * r, generator=g).to(dtype)
    return out


def spans(n_chunks: int, size: int = 512) -> list[tuple[int, int]]:
    return [(i * size, (i + 1) * size) for i in range(n_chunks)]


def put_simple(store: AdapterStore, scope: Scope, *, n_chunks: int = 2, r: int = 4, seed: int = 0, **kw: Any):
    """Put a random adapter with default fingerprints; returns the record."""
    kw.setdefault("kind", MemoryKind.DOCUMENT)
    kw.setdefault("base_model", BASE)
    kw.setdefault("hypernet", HYPER)
    return store.put(
        make_adapter(n_chunks=n_chunks, r=r, seed=seed), scope=scope, rank_per_chunk=r,
        chunk_spans=spans(n_chunks), **kw
    )


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def unique_prefix() -> str:
    return uuid.uuid4().hex[:12]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def tamper(store: AdapterStore, digest: str, change: Any) -> None:
    """Replace the bytes of blob `digest` with `change(old_bytes)`, on any blob backend."""
    from d2l_store.blobs import LocalBlobStore

    blobs = store.blobs
    if isinstance(blobs, LocalBlobStore):
        p = blobs.path(digest)
        p.write_bytes(change(p.read_bytes()))
    else:
        path = blobs.path(digest)  # type: ignore[attr-defined]
        blobs.fs.pipe_file(path, change(blobs.fs.cat_file(path)))  # type: ignore[attr-defined]


# ---- subprocess targets (spawned, so they import this module afresh) ------------------------------


def worker_writer(index_url: str, blob_root: str, tenant: str, n: int, go: Any, out: Any) -> None:
    """Once `go` is set, put `n` adapters (seed i) into its own tenant, appending a chunk to every third
    one and deleting every fifth; report the ids it expects to survive, with seeds and chunk counts."""
    store = AdapterStore.open(index_url, blob_root)
    go.wait()
    alive: dict[str, tuple[list[int], int]] = {}
    for i in range(n):
        rec = put_simple(store, Scope(tenant=tenant, user=f"u{i % 2}"), n_chunks=1, seed=i, metadata={"seeds": [i]})
        if i % 3 == 0:
            rec = store.append_chunks(rec.id, make_adapter(n_chunks=1, seed=1000 + i), spans(1))
            rec = store.put(  # record which seeds it holds: a new version with the same tensors
                store.get(rec.id)[1], scope=rec.scope, kind=rec.kind, base_model=rec.base_model, hypernet=rec.hypernet,
                rank_per_chunk=rec.rank_per_chunk, chunk_spans=rec.chunk_spans, metadata={"seeds": [i, 1000 + i]},
                supersedes=rec.id,
            )  # fmt: skip
        if i % 5 == 4:
            store.delete(rec.id, scope=Scope(tenant=tenant))
            continue
        alive[rec.id] = (rec.metadata["seeds"], rec.n_chunks)
    store.close()
    out.put((tenant, alive))


def expected_tensors(seeds: Sequence[int]) -> dict[str, torch.Tensor]:
    """The tensors `worker_writer` stored for these seeds: one chunk per seed, in order."""
    parts = [make_adapter(n_chunks=1, seed=s) for s in seeds]
    out = {}
    for k in parts[0]:
        out[k] = torch.cat([p[k] for p in parts], dim=0 if k.endswith(".lora_A") else 1)
    return out


def worker_reader(index_url: str, blob_root: str, tenants: Sequence[str], go: Any, stop_file: str, out: Any) -> None:
    """Once `go` is set and until `stop_file` exists: list every tenant and load every visible record, checking
    its tensors against its seeds, and collect garbage now and then. Reports (records read, problems)."""
    from d2l_store import RecordNotFound

    store = AdapterStore.open(index_url, blob_root, gc_grace_s=5.0)
    go.wait()
    reads, problems, rounds = 0, [], 0
    while not os.path.exists(stop_file) or rounds < 2:
        rounds += 1
        for tenant in tenants:
            for rec in store.list(Scope(tenant=tenant), limit=1000):
                try:
                    got, tensors = store.get(rec.id, scope=Scope(tenant=tenant))
                except RecordNotFound:
                    continue  # superseded or deleted since the listing: fine
                except Exception as e:  # anything else is corruption
                    problems.append(f"{rec.id}: {type(e).__name__}: {e}")
                    continue
                want = expected_tensors(got.metadata["seeds"]) if len(got.metadata["seeds"]) == got.n_chunks else None
                if want is not None and not all(torch.equal(tensors[k], want[k]) for k in want):
                    problems.append(f"{rec.id}: tensors differ from seeds {got.metadata['seeds']}")
                reads += 1
        if rounds % 3 == 0:
            store.gc_blobs()
    store.close()
    out.put((reads, problems))


KILL_POINTS = ("loop", "blob-temp", "before-index", "in-transaction")


def worker_killed(index_url: str, blob_root: str, point: str, ready_file: str) -> None:
    """Put into tenant `point`, stopping for good at `point`, where the parent SIGKILLs it:
    - "blob-temp": the blob's temp file is written, not yet renamed into place;
    - "before-index": the blob is in place, its index row not yet inserted;
    - "in-transaction": the index row is flushed inside the open transaction, not committed;
    - "loop": no stop; puts in a loop, touching `ready_file` after each, killed at a random moment."""
    import time

    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from d2l_store import store as store_mod
    from d2l_store.models import AdapterRow

    def halt(*_: Any, **__: Any) -> None:
        Path(ready_file).touch()
        time.sleep(3600)

    store = AdapterStore.open(index_url, blob_root)
    if point == "blob-temp":
        os.replace = halt  # type: ignore[assignment]  # this process only
    elif point == "before-index":
        store_mod.AdapterStore._insert = halt  # type: ignore[method-assign]
    elif point == "in-transaction":

        @event.listens_for(Session, "after_flush")
        def _stop(session: Session, _ctx: Any) -> None:
            if any(isinstance(o, AdapterRow) for o in session.new):
                halt()

    seed0 = KILL_POINTS.index(point) * 1000  # distinct tensors: no blob may already exist
    for i in range(1_000_000):
        put_simple(store, Scope(tenant=point), n_chunks=1, seed=seed0 + i)
        Path(f"{ready_file}.{i}").touch()
