"""The async twins run the blocking calls in worker threads: same results, and many at once."""

from __future__ import annotations

import asyncio
import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_testing import BASE, HYPER, assert_same_tensors, make_adapter, spans

from d2l_store import AdapterStore, RecordNotFound, Scope

T = Scope(tenant="acme", user="ann")
SYNC_NAMES = ["put", "get", "get_record", "list", "delete", "delete_scope", "expire", "gc_blobs", "append_chunks",
              "drop_chunks", "find_by_source_hash", "export_peft", "import_peft"]  # fmt: skip


def test_every_main_call_has_an_async_twin() -> None:
    for name in SYNC_NAMES:
        twin = getattr(AdapterStore, "a" + name)
        assert inspect.iscoroutinefunction(twin), name
        assert twin.__name__ == "a" + name and name in (twin.__doc__ or "")


def test_async_variants(store: AdapterStore, tmp_path: Path) -> None:
    async def scenario() -> None:
        kw = dict(scope=T, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=4, chunk_spans=spans(2))
        recs = await asyncio.gather(*(store.aput(make_adapter(seed=i), source_text=f"doc {i}", **kw) for i in range(6)))
        assert len({r.id for r in recs}) == 6
        listed = await store.alist(T, limit=100)
        assert {r.id for r in listed} == {r.id for r in recs}
        got, tensors = await store.aget(recs[0].id, scope=T, expect_base_model=BASE)
        assert_same_tensors(tensors, make_adapter(seed=0)) and got == recs[0]
        assert (await store.aget_record(recs[1].id)).id == recs[1].id
        assert (await store.afind_by_source_hash(T, recs[2].source_hash, BASE, HYPER)).id == recs[2].id
        grown = await store.aappend_chunks(recs[3].id, make_adapter(n_chunks=1, seed=9), spans(1))
        shrunk = await store.adrop_chunks(grown.id, [0])
        assert shrunk.version == 3 and shrunk.n_chunks == 2
        out = await store.aexport_peft(shrunk.id, tmp_path / "peft")
        back = await store.aimport_peft(
            out, scope=Scope(tenant="other"), kind="document", base_model=BASE, hypernet=HYPER
        )
        assert back.chunk_spans == shrunk.chunk_spans
        await store.adelete(recs[0].id, scope=T)
        with pytest.raises(RecordNotFound):
            await store.aget(recs[0].id)
        expiring = await store.aput(make_adapter(seed=20), expires_at=datetime.now(UTC) + timedelta(seconds=30), **kw)
        assert await store.aexpire(now=datetime.now(UTC) + timedelta(minutes=1)) == 1
        with pytest.raises(RecordNotFound):
            await store.aget_record(expiring.id)
        assert await store.adelete_scope(Scope(tenant="acme")) == 5
        report = await store.agc_blobs(grace_s=0)
        assert report.blobs_deleted >= 5
        assert await store.alist(Scope(tenant="acme")) == []

    asyncio.run(scenario())
