"""Core operations on every backend: put/get, list, delete, expiry and gc, chunks, dedupe, versions,
compatibility checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import torch
from store_testing import BASE, HYPER, assert_same_tensors, make_adapter, put_simple, spans

from d2l_store import (
    AdapterStore,
    ConflictError,
    IncompatibleAdapterError,
    MemoryKind,
    RecordNotFound,
    Scope,
)

T = Scope(tenant="acme", user="ann")


def test_put_get_round_trip(store: AdapterStore) -> None:
    tensors = make_adapter(n_chunks=3, r=2, dtype=torch.bfloat16)
    rec = store.put(
        tensors, scope=T, kind=MemoryKind.TOOL_DOC, base_model=BASE, hypernet=HYPER, rank_per_chunk=2,
        chunk_spans=[(0, 10), (10, 20), (20, 25)], source_text="the manual", tags=["b", "a", "a"],
        metadata={"name": "manual", "n": 3, "nested": {"x": [1.5, None, True]}},
    )  # fmt: skip
    got, loaded = store.get(rec.id, scope=Scope(tenant="acme"))
    assert_same_tensors(loaded, tensors)
    assert got == rec
    assert (got.rank, got.n_chunks, got.rank_per_chunk, got.n_modules) == (6, 3, 2, 2)
    assert got.chunk_spans == ((0, 10), (10, 20), (20, 25))
    assert got.tags == ("a", "b")
    assert got.metadata == {"name": "manual", "n": 3, "nested": {"x": [1.5, None, True]}}
    assert got.kind is MemoryKind.TOOL_DOC and got.dtype == "bfloat16"
    assert got.source_text == "the manual" and got.source_hash and got.source_hash.startswith("sha256:")
    assert got.version == 1 and got.supersedes is None and got.expires_at is None
    assert got.created_at.tzinfo is not None and got.created_at == got.updated_at
    assert store.get_record(rec.id) == rec


def test_identical_adapters_share_one_blob(store: AdapterStore) -> None:
    a = put_simple(store, T, seed=1)
    b = put_simple(store, Scope(tenant="other"), seed=1)
    c = put_simple(store, T, seed=2)
    assert a.blob_digest == b.blob_digest != c.blob_digest
    assert a.id != b.id


def test_list_filters(store: AdapterStore) -> None:
    docs = [put_simple(store, Scope(tenant="acme", user=u, agent=ag), seed=i, tags=t)
            for i, (u, ag, t) in enumerate([("ann", "", ["x"]), ("ann", "bot", ["x", "y"]),
                                            ("bob", "bot", ["y"])])]  # fmt: skip
    conv = put_simple(store, Scope(tenant="acme", user="ann"), kind="conversation", seed=9)
    other_model = put_simple(store, Scope(tenant="acme"), base_model="other@1", hypernet="h2", seed=10)
    put_simple(store, Scope(tenant="globex", user="ann"), seed=11)

    def ids(scope: Scope, **kw: object) -> set[str]:
        return {r.id for r in store.list(scope, **kw)}  # type: ignore[arg-type]

    everything = {*(d.id for d in docs), conv.id, other_model.id}
    assert ids(Scope(tenant="acme")) == everything
    assert ids(Scope(tenant="acme", user="ann")) == {docs[0].id, docs[1].id, conv.id}
    assert ids(Scope(tenant="acme", agent="bot")) == {docs[1].id, docs[2].id}
    assert ids(Scope(tenant="acme", user="ann"), exact_scope=True) == {docs[0].id, conv.id}
    assert ids(Scope(tenant="acme"), exact_scope=True) == {other_model.id}
    assert ids(Scope(tenant="acme"), kind=MemoryKind.CONVERSATION) == {conv.id}
    assert ids(Scope(tenant="acme"), kind="document", tags=["y"]) == {docs[1].id, docs[2].id}
    assert ids(Scope(tenant="acme"), tags=["x", "y"]) == {docs[1].id}
    assert ids(Scope(tenant="acme"), tags=["nope"]) == set()
    assert ids(Scope(tenant="acme"), base_model="other@1") == {other_model.id}
    assert ids(Scope(tenant="acme"), hypernet=HYPER) == everything - {other_model.id}
    assert ids(Scope(tenant="nobody")) == set()
    listed = store.list(Scope(tenant="acme"))
    assert all(r.source_text is None for r in listed)
    assert [r.id for r in listed] == sorted((r.id for r in listed), reverse=True)  # newest first


def test_pagination_by_offset_and_cursor(store: AdapterStore) -> None:
    made = {put_simple(store, T, seed=i).id for i in range(7)}
    pages, cursor = [], None
    while True:
        page = store.list(T, limit=3, cursor=cursor)
        if not page:
            break
        pages.append([r.id for r in page])
        cursor = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [i for p in pages for i in p]
    assert set(flat) == made and flat == sorted(made, reverse=True)
    by_offset = [r.id for off in (0, 3, 6) for r in store.list(T, limit=3, offset=off)]
    assert by_offset == flat
    # A cursor stays correct while others write: new records sort before it.
    put_simple(store, T, seed=99)
    assert [r.id for r in store.list(T, limit=3, cursor=pages[0][-1])] == pages[1]


def test_list_can_include_source_text(store: AdapterStore) -> None:
    put_simple(store, T, source_text="héllo wörld ✓")
    [rec] = store.list(T, include_source_text=True)
    assert rec.source_text == "héllo wörld ✓"


def test_delete(store: AdapterStore) -> None:
    a, b = put_simple(store, T, seed=1), put_simple(store, T, seed=2)
    with pytest.raises(RecordNotFound):
        store.delete(a.id, scope=Scope(tenant="other"))
    store.delete(a.id, scope=Scope(tenant="acme"))
    with pytest.raises(RecordNotFound):
        store.get(a.id)
    with pytest.raises(RecordNotFound):
        store.delete(a.id)
    assert [r.id for r in store.list(T)] == [b.id]


def test_delete_scope(store: AdapterStore) -> None:
    keep_other_user = put_simple(store, Scope(tenant="acme", user="bob"), seed=1)
    keep_other_tenant = put_simple(store, Scope(tenant="globex", user="ann"), seed=2)
    keep_empty_tenant = put_simple(store, Scope(user="ann"), seed=3)
    for i in range(3):
        put_simple(store, Scope(tenant="acme", user="ann", session=f"s{i}"), seed=10 + i)
    assert store.delete_scope(Scope(tenant="acme", user="ann")) == 3
    assert store.delete_scope(Scope(tenant="acme", user="ann")) == 0
    assert [r.id for r in store.list(Scope(tenant="acme"))] == [keep_other_user.id]
    assert store.get_record(keep_other_tenant.id).id == keep_other_tenant.id
    assert store.get_record(keep_empty_tenant.id, scope=Scope()).id == keep_empty_tenant.id


def test_expire_then_gc_removes_only_orphan_blobs(store: AdapterStore) -> None:
    now = datetime.now(UTC)
    soon = put_simple(store, T, seed=1, expires_at=now + timedelta(hours=1))
    past = put_simple(store, T, seed=2, expires_at=now - timedelta(seconds=1))
    forever = put_simple(store, T, seed=3)
    shared = put_simple(store, Scope(tenant="other"), seed=1)  # same blob as `soon`, no expiry
    assert {r.id for r in store.list(T)} == {soon.id, forever.id}  # expired is hidden at once
    with pytest.raises(RecordNotFound):
        store.get(past.id)

    assert store.expire(now=now + timedelta(hours=2)) == 2
    assert store.gc_blobs(grace_s=3600).blobs_deleted == 0  # young leases are spared
    report = store.gc_blobs(grace_s=0)
    assert report.blobs_deleted == 1 and report.bytes_freed == past.nbytes  # `soon`'s blob is shared
    assert store.get(forever.id)[0].id == forever.id
    assert store.get(shared.id)[0].id == shared.id
    store.delete(shared.id)
    assert store.gc_blobs(grace_s=0).blobs_deleted == 1
    assert sorted(store.blobs.digests()) == [forever.blob_digest]


def test_gc_spares_a_blob_being_written_and_adopts_strays(store: AdapterStore) -> None:
    from d2l_store import blobformat, queries
    from d2l_store.blobs import digest_of

    data = bytes(blobformat.encode(make_adapter(seed=5), {"format": "pt"}))
    digest = digest_of(data)
    with store._write() as s, s.begin():  # a writer that leased and wrote, then died
        queries.lease_blob(s, digest, len(data), datetime.now(UTC))
    store.blobs.write(digest, data)
    stray = bytes(blobformat.encode(make_adapter(seed=6), {"format": "pt"}))  # a file with no row at all
    store.blobs.write(digest_of(stray), stray)
    assert store.gc_blobs(grace_s=3600).blobs_deleted == 0
    assert set(store.blobs.digests()) == {digest, digest_of(stray)}
    assert store.gc_blobs(grace_s=0).blobs_deleted == 2
    assert list(store.blobs.digests()) == []


def test_append_and_drop_chunks(store: AdapterStore) -> None:
    first = make_adapter(n_chunks=2, r=3, seed=1)
    rec = store.put(first, scope=T, kind="conversation", base_model=BASE, hypernet=HYPER, rank_per_chunk=3,
                    chunk_spans=spans(2), tags=["log"], metadata={"k": 1}, source_text="a b")  # fmt: skip
    more = make_adapter(n_chunks=1, r=3, seed=2)
    grown = store.append_chunks(rec.id, more, [(1024, 1100)], scope=T, source_text="a b c")
    assert (grown.version, grown.supersedes, grown.n_chunks, grown.rank) == (2, rec.id, 3, 9)
    assert grown.chunk_spans == ((0, 512), (512, 1024), (1024, 1100))
    assert grown.tags == ("log",) and grown.metadata == {"k": 1} and grown.created_at == rec.created_at
    assert grown.source_text == "a b c"
    _, t = store.get(grown.id)
    for m in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(t[f"{m}.lora_A"], torch.cat([first[f"{m}.lora_A"], more[f"{m}.lora_A"]], 0))
        assert torch.equal(t[f"{m}.lora_B"], torch.cat([first[f"{m}.lora_B"], more[f"{m}.lora_B"]], 1))

    with pytest.raises(RecordNotFound):
        store.get(rec.id)  # the old version is gone
    shrunk = store.drop_chunks(grown.id, [0, 2])
    assert (shrunk.version, shrunk.n_chunks, shrunk.chunk_spans) == (3, 1, ((512, 1024),))
    assert shrunk.source_hash is None  # no longer describes the content
    _, t2 = store.get(shrunk.id)
    m = "model.layers.1.mlp.down_proj"
    assert torch.equal(t2[f"{m}.lora_A"], first[f"{m}.lora_A"][3:6])
    assert torch.equal(t2[f"{m}.lora_B"], first[f"{m}.lora_B"][:, 3:6])
    with pytest.raises(ValueError, match="empty adapter"):
        store.drop_chunks(shrunk.id, [0])
    with pytest.raises(ValueError, match="out of range"):
        store.drop_chunks(shrunk.id, [1])
    with pytest.raises(ValueError, match="rank"):
        store.append_chunks(shrunk.id, make_adapter(n_chunks=1, r=2), [(0, 1)])  # wrong rank per chunk
    with pytest.raises(RecordNotFound):
        store.append_chunks(shrunk.id, more, [(0, 1)], scope=Scope(tenant="other"))


def test_dedupe_by_source_hash(store: AdapterStore) -> None:
    text = "The capital of Freedonia is Fredville."
    rec = put_simple(store, T, source_text=text)
    found = store.find_by_source_hash(T, rec.source_hash, BASE, HYPER)  # type: ignore[arg-type]
    assert found is not None and found.id == rec.id and found.source_text == text
    h = rec.source_hash
    assert h is not None
    assert store.find_by_source_hash(Scope(tenant="acme", user="bob"), h, BASE, HYPER) is None
    assert store.find_by_source_hash(Scope(tenant="acme"), h, BASE, HYPER) is None  # exact scope
    assert store.find_by_source_hash(Scope(tenant="x", user="ann"), h, BASE, HYPER) is None
    assert store.find_by_source_hash(T, h, "other-base", HYPER) is None
    assert store.find_by_source_hash(T, h, BASE, "other-hypernet") is None
    given = put_simple(store, T, seed=3, source_hash="doc:v1:42")  # a caller's own hash, no text kept
    assert store.find_by_source_hash(T, "doc:v1:42", BASE, HYPER).id == given.id  # type: ignore[union-attr]
    store.delete(rec.id)
    assert store.find_by_source_hash(T, h, BASE, HYPER) is None


def test_supersede_makes_a_new_version(store: AdapterStore) -> None:
    v1 = put_simple(store, T, seed=1, metadata={"v": 1})
    v2 = put_simple(store, T, seed=2, metadata={"v": 2}, supersedes=v1.id)
    assert (v2.version, v2.supersedes, v2.created_at) == (2, v1.id, v1.created_at)
    assert v2.updated_at >= v1.updated_at
    with pytest.raises(RecordNotFound):
        store.get_record(v1.id)
    assert [r.id for r in store.list(T)] == [v2.id]
    with pytest.raises(ConflictError):  # someone else already replaced v1: re-read and retry
        put_simple(store, T, seed=3, supersedes=v1.id)
    with pytest.raises(RecordNotFound):  # another tenant's record cannot be replaced
        put_simple(store, Scope(tenant="other"), seed=3, supersedes=v2.id)
    v3 = put_simple(store, T, seed=3, supersedes=v2.id)
    assert v3.version == 3 and [r.id for r in store.list(T)] == [v3.id]


def test_get_checks_compatibility(store: AdapterStore) -> None:
    rec = put_simple(store, T)
    assert store.get(rec.id, expect_base_model=BASE, expect_hypernet=HYPER)[0].id == rec.id
    with pytest.raises(IncompatibleAdapterError, match="base model"):
        store.get(rec.id, expect_base_model="SmolLM2-360M@sha256:ffff")
    with pytest.raises(IncompatibleAdapterError, match="hypernetwork"):
        store.get(rec.id, expect_base_model=BASE, expect_hypernet="hypernet@sha256:2222")
    assert store.list(T, base_model="SmolLM2-360M@sha256:ffff") == []


def test_get_in_another_tenant_is_not_found(store: AdapterStore) -> None:
    rec = put_simple(store, T)
    for scope in (Scope(tenant="globex"), Scope(tenant="globex", user="ann"), Scope(user="ann"), Scope()):
        with pytest.raises(RecordNotFound):
            store.get(rec.id, scope=scope)
        with pytest.raises(RecordNotFound):
            store.export_peft(rec.id, "/nonexistent/never-written", scope=scope)
        assert store.list(scope) == []
    with pytest.raises(RecordNotFound):
        store.get(rec.id, scope=Scope(tenant="acme", user="bob"))  # same tenant, other user
