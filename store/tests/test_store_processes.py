"""Several processes on one store: concurrent writers and readers lose and corrupt nothing, and a
writer SIGKILLed at any point of a put leaves no visible half-written memory and no row without
its blob. Runs on an SQLite file (always) and PostgreSQL (when available), with local blobs."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from store_testing import KILL_POINTS, expected_tensors, put_simple, worker_killed, worker_reader, worker_writer

from d2l_store import AdapterStore, Scope
from d2l_store.models import AdapterRow, BlobRow

# Workers fork from a clean server process that has imported torch and the store once (not from
# pytest's process, whose threads and open connections a fork would copy): fast and safe.
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["d2l_store", "pytest"])  # installed modules: 3.11's server ignores sys.path
TIMEOUT_S = 120.0


def _wait_for(cond, what: str, procs: list[mp.process.BaseProcess]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            raise AssertionError(f"worker {dead[0].name} exited with {dead[0].exitcode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def procs() -> Iterator[list[mp.process.BaseProcess]]:
    """Processes a test starts; any still alive at the end are killed (by pid, ours only)."""
    started: list[mp.process.BaseProcess] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(10)


def _check_index_matches_blobs(store: AdapterStore) -> set[str]:
    """Every adapter row's blob exists and is intact; returns the referenced digests."""
    with store._read() as s:
        rows = s.execute(select(AdapterRow.id, AdapterRow.blob_digest)).all()
        blob_rows = set(s.scalars(select(BlobRow.digest)).all())
    for id, digest in rows:
        assert digest in blob_rows
        store.blobs.read(digest)  # raises BlobIntegrityError if missing or damaged
        store.get(id)
    return {d for _, d in rows}


def test_concurrent_writers_and_readers_lose_nothing(index_url: str, tmp_path: Path, procs: list) -> None:
    blob_root = str(tmp_path / "blobs")
    AdapterStore.open(index_url, blob_root).close()  # migrate once up front (openers would queue anyway)
    tenants = [f"w{i}" for i in range(3)]
    out, go = CTX.Queue(), CTX.Event()
    stop = tmp_path / "stop"
    writers = [CTX.Process(target=worker_writer, args=(index_url, blob_root, t, 20, go, out), name=t) for t in tenants]
    reader = CTX.Process(target=worker_reader, args=(index_url, blob_root, tenants, go, str(stop), out), name="reader")
    procs.extend([*writers, reader])
    for p in procs:
        p.start()
    go.set()  # all at once, so writes and reads really overlap
    results = [out.get(timeout=TIMEOUT_S) for _ in writers]
    stop.touch()
    reads, problems = out.get(timeout=TIMEOUT_S)
    for p in procs:
        p.join(TIMEOUT_S)
        assert p.exitcode == 0, p.name
    assert problems == []
    assert reads > 0

    store = AdapterStore.open(index_url, blob_root)
    for tenant, alive in results:
        listed = {r.id: r for r in store.list(Scope(tenant=tenant), limit=1000)}
        assert set(listed) == set(alive), tenant
        for id, (seeds, n_chunks) in alive.items():
            rec, tensors = store.get(id, scope=Scope(tenant=tenant))
            assert rec.n_chunks == n_chunks and rec.metadata["seeds"] == seeds
            want = expected_tensors(seeds)
            assert all(torch.equal(tensors[k], want[k]) for k in want)
    store.gc_blobs(grace_s=0)
    assert set(store.blobs.digests()) == _check_index_matches_blobs(store)
    store.close()


def test_writer_killed_mid_put_leaves_nothing_half_written(index_url: str, tmp_path: Path, procs: list) -> None:
    blob_root = str(tmp_path / "blobs")
    AdapterStore.open(index_url, blob_root).close()
    ready = {p: tmp_path / f"ready-{p}" for p in KILL_POINTS}

    def start(point: str) -> mp.process.BaseProcess:
        p = CTX.Process(target=worker_killed, args=(index_url, blob_root, point, str(ready[point])), name=point)
        procs.append(p)
        p.start()
        return p

    # "in-transaction" holds SQLite's write lock while it waits to be killed, so it goes last.
    early = [start(p) for p in ("loop", "blob-temp", "before-index")]
    _wait_for(lambda: Path(f"{ready['loop']}.2").exists(), "three puts of the loop writer", early)
    time.sleep(random.uniform(0.0, 0.3))  # kill the looping writer wherever it happens to be
    os.kill(early[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
    late = start("in-transaction")
    _wait_for(
        lambda: all(ready[p].exists() for p in KILL_POINTS[1:]),
        "the writers to stop at their points",
        early[1:] + [late],
    )
    for p in [*early[1:], late]:
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    for p in procs:
        p.join(TIMEOUT_S)
        assert p.exitcode == -signal.SIGKILL, p.name

    store = AdapterStore.open(index_url, blob_root)
    reported = len(list(tmp_path.glob("ready-loop.*")))
    assert len(store.list(Scope(tenant="loop"), limit=1000)) in (reported, reported + 1)  # +1: killed after commit
    for point in KILL_POINTS[1:]:
        assert store.list(Scope(tenant=point)) == [], point
    referenced = _check_index_matches_blobs(store)
    assert list((Path(blob_root) / "tmp").glob("*.tmp"))  # the blob-temp writer's leftover

    report = store.gc_blobs(grace_s=0)
    assert report.temp_files_removed >= 1 and report.blobs_deleted >= 2  # before-index, in-transaction
    assert set(store.blobs.digests()) == referenced
    assert list((Path(blob_root) / "tmp").iterdir()) == []
    rec = put_simple(store, Scope(tenant="after"))  # no stale lock is left behind
    assert store.get(rec.id)[0].id == rec.id
    store.close()
