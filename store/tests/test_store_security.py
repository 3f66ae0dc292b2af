"""Damaged blobs are detected and never loaded; hostile ids, scopes, tags and metadata cannot escape
the blob root or reach another tenant; malformed adapters are refused before anything is written."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from store_testing import BASE, HYPER, files_under, make_adapter, put_simple, spans, tamper

from d2l_store import (
    AdapterStore,
    BlobIntegrityError,
    InvalidAdapterError,
    InvalidIdentifierError,
    RecordNotFound,
    Scope,
    StoreError,
)
from d2l_store import blobformat as blobformat_mod
from d2l_store.blobs import LocalBlobStore
from d2l_store.models import AdapterRow

T = Scope(tenant="acme", user="ann")

DAMAGE = {
    "bit flip": lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:],
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "header edit": lambda b: b.replace(b"tiny-llama", b"tiny-llamb"),
    "appended": lambda b: b + b"\0" * 8,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_blob_is_detected_and_never_loaded(
    store: AdapterStore, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = put_simple(store, T)
    tamper(store, rec.blob_digest, DAMAGE[damage])

    def refuse(*_: object) -> None:
        raise AssertionError("a damaged blob reached the safetensors loader")

    monkeypatch.setattr(blobformat_mod, "st_load", refuse)
    with pytest.raises(BlobIntegrityError, match=rec.blob_digest):
        store.get(rec.id)
    with pytest.raises(BlobIntegrityError):
        store.append_chunks(rec.id, make_adapter(n_chunks=1), spans(1))
    with pytest.raises(BlobIntegrityError):
        store.drop_chunks(rec.id, [0])
    assert store.get_record(rec.id).id == rec.id  # the record is still there to inspect or delete


def test_missing_blob_is_an_integrity_error(store: AdapterStore) -> None:
    rec = put_simple(store, T)
    store.blobs.delete(rec.blob_digest)
    with pytest.raises(BlobIntegrityError, match="missing"):
        store.get(rec.id)


def test_swapped_blob_is_detected(store: AdapterStore) -> None:
    a, b = put_simple(store, T, seed=1), put_simple(store, T, seed=2)
    good_b = store.blobs.read(b.blob_digest)
    tamper(store, a.blob_digest, lambda _: good_b)  # a valid safetensors file, under the wrong name
    with pytest.raises(BlobIntegrityError):
        store.get(a.id)


def test_putting_again_repairs_a_damaged_blob(store: AdapterStore) -> None:
    rec = put_simple(store, T, seed=4)
    tamper(store, rec.blob_digest, DAMAGE["truncated"])
    again = put_simple(store, T, seed=4)
    assert again.blob_digest == rec.blob_digest
    assert store.get(rec.id)[0].id == rec.id


def test_blob_header_must_describe_its_record(sqlite_store: AdapterStore) -> None:
    """An index row edited behind the store's back no longer matches its (intact) blob's header."""
    rec = put_simple(sqlite_store, T, n_chunks=2, r=4)
    with sqlite_store._write() as s, s.begin():
        s.execute(update(AdapterRow).where(AdapterRow.id == rec.id).values(chunk_spans=[[0, 1], [1, 2]]))
    with pytest.raises(BlobIntegrityError, match="header"):
        sqlite_store.get(rec.id)


HOSTILE_IDS = [
    "../../../../etc/passwd",
    "' OR '1'='1",
    "0" * 31 + "'",
    "0123456789ABCDEF0123456789ABCDEF",  # upper case is not an id we make
    "0123456789abcdef0123456789abcdef\n",
    "0123456789abcdef0123456789abcde\u0444",
    "",
    "0" * 33,
    "%",
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_hostile_record_ids_are_refused(sqlite_store: AdapterStore, bad: str) -> None:
    put_simple(sqlite_store, T)
    for call in (sqlite_store.get, sqlite_store.get_record, sqlite_store.delete):
        with pytest.raises(InvalidIdentifierError):
            call(bad)
    with pytest.raises(InvalidIdentifierError):
        sqlite_store.list(T, cursor=bad)
    with pytest.raises(InvalidIdentifierError):
        put_simple(sqlite_store, T, supersedes=bad)
    assert len(sqlite_store.list(T)) == 1


@pytest.mark.parametrize("bad", ["../x", "a/b", "x' OR tenant != 'x", "a b", "tab\there", "nul\x00", "%", "*",
                                 "zero\u200bwidth", "bidi\u202eevil", "e\u0301", "\u212a", "x" * 129, 7])  # fmt: skip
def test_hostile_scope_fields_are_refused(bad: object) -> None:
    for field in ("tenant", "user", "agent", "session"):
        with pytest.raises(InvalidIdentifierError):
            Scope(**{field: bad})  # type: ignore[arg-type]


def test_blob_paths_come_only_from_hashes(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "root")
    for bad in ("../" * 8 + "etc/passwd", "/etc/passwd", "a" * 63 + "/", "A" * 64):
        with pytest.raises(InvalidIdentifierError):
            blobs.path(bad)
        with pytest.raises(InvalidIdentifierError):
            blobs.read(bad)
    assert files_under(tmp_path) == []
    blobs.write("0" * 64, b"not these bytes")  # a caller bug: reads still check bytes against the name
    with pytest.raises(BlobIntegrityError):
        blobs.read("0" * 64)


def test_hostile_but_valid_names_stay_inside_the_store(tmp_path: Path) -> None:
    """Tags and fingerprints that look like paths or SQL are plain data: stored and matched exactly,
    never used as paths, so every file the store writes is under its blob root or next to its index."""
    store = AdapterStore.open(f"sqlite:///{tmp_path}/db/index.db", tmp_path / "blobs")
    tags = ["../../../../tmp/pwned", "/etc/passwd", "x=1", "--", "a:b@c+d", "ünïcødé", "中文", "..", "."]
    odd = "../../etc/passwd';DROP-TABLE-adapters;--"
    rec = put_simple(store, Scope(tenant="..", user="--", agent="a=b", session="中文"), tags=tags,
                     base_model=odd, hypernet=odd,
                     metadata={"../x": "'; DROP TABLE adapters; --", "ü": "\u202e"})  # fmt: skip
    scope = Scope(tenant="..")
    for tag in tags:
        assert [r.id for r in store.list(scope, tags=[tag])] == [rec.id]
    # no prefix matching
    assert store.list(scope, tags=["../../../../tmp"]) == [] and store.list(scope, tags=[".../"]) == []
    got, _ = store.get(rec.id, scope=scope, expect_base_model=odd, expect_hypernet=odd)
    assert got.metadata == {"../x": "'; DROP TABLE adapters; --", "ü": "\u202e"}
    assert got.scope == Scope(tenant="..", user="--", agent="a=b", session="中文")
    store.export_peft(rec.id, tmp_path / "export")
    store.close()
    written = {p.relative_to(tmp_path).parts[0] for p in files_under(tmp_path)}
    assert written == {"db", "blobs", "export"}
    assert not Path("/tmp/pwned").exists()


def test_unicode_tenants_are_isolated(store: AdapterStore) -> None:
    names = ["ß", "ss", "SS", "K", "Ｋ", "é", "e", "Ä", unicodedata.normalize("NFC", "A\u0308") + "x", "ä"]
    recs = {n: put_simple(store, Scope(tenant=n, user=n), seed=i) for i, n in enumerate(names)}
    for n, rec in recs.items():
        assert [r.id for r in store.list(Scope(tenant=n))] == [rec.id]
        for other in names:
            if other != n:
                with pytest.raises(RecordNotFound):
                    store.get_record(rec.id, scope=Scope(tenant=other))
    assert store.delete_scope(Scope(tenant="ss")) == 1
    assert store.get_record(recs["ß"].id, scope=Scope(tenant="ß")).id == recs["ß"].id


def test_empty_tenant_is_a_tenant_of_its_own(store: AdapterStore) -> None:
    mine = put_simple(store, Scope(tenant="acme"), seed=1)
    shared = put_simple(store, Scope(), seed=2)
    assert [r.id for r in store.list(Scope())] == [shared.id]
    assert store.delete_scope(Scope()) == 1
    assert store.get_record(mine.id).id == mine.id


def test_one_tenant_cannot_touch_another(store: AdapterStore) -> None:
    victim = put_simple(store, Scope(tenant="victim", user="u"), source_text="secret")
    attacker = Scope(tenant="attacker", user="u")
    h = victim.source_hash
    assert h is not None
    assert store.find_by_source_hash(attacker, h, BASE, HYPER) is None
    assert store.list(attacker) == [] and store.list(Scope(tenant="attacker"), tags=[]) == []
    for op in (
        lambda: store.get(victim.id, scope=attacker),
        lambda: store.delete(victim.id, scope=attacker),
        lambda: store.append_chunks(victim.id, make_adapter(n_chunks=1), spans(1), scope=attacker),
        lambda: store.drop_chunks(victim.id, [0], scope=attacker),
        lambda: put_simple(store, attacker, supersedes=victim.id),
    ):
        with pytest.raises(RecordNotFound):
            op()
    assert store.delete_scope(attacker) == 0 and store.delete_scope(Scope(tenant="attacker")) == 0
    got, _ = store.get(victim.id, scope=Scope(tenant="victim"))
    assert got.version == 1 and got.source_text == "secret"


# ---- malformed adapters and arguments ------------------------------------------------------------------


def _bad_tensors() -> dict[str, dict[str, torch.Tensor]]:
    good = make_adapter(n_chunks=2, r=4)
    a, b = "model.layers.0.mlp.down_proj.lora_A", "model.layers.0.mlp.down_proj.lora_B"
    return {
        "empty": {},
        "missing B": {k: v for k, v in good.items() if k != b},
        "wrong rank": good | {a: torch.randn(7, 24), b: torch.randn(16, 7)},
        "1-d": good | {a: torch.randn(8)},
        "NaN": good | {a: torch.full((8, 24), float("nan"))},
        "int dtype": good | {a: torch.ones(8, 24, dtype=torch.int64)},
        "mixed dtypes": good | {a: good[a].half()},
        "odd name": good | {"model.layers.0.mlp.down_proj.weight": torch.randn(2, 2)},
        "path-like module": {"../../x.lora_A": torch.randn(8, 4), "../../x.lora_B": torch.randn(4, 8)},
    }


@pytest.mark.parametrize("case", list(_bad_tensors()))
def test_malformed_tensors_are_refused_before_writing(sqlite_store: AdapterStore, case: str) -> None:
    with pytest.raises((InvalidAdapterError, InvalidIdentifierError)):
        sqlite_store.put(_bad_tensors()[case], scope=T, kind="document", base_model=BASE, hypernet=HYPER,
                         rank_per_chunk=4, chunk_spans=spans(2))  # fmt: skip
    assert list(sqlite_store.blobs.digests()) == [] and sqlite_store.list(T) == []


@pytest.mark.parametrize(
    "kw",
    [
        {"chunk_spans": [(5, 1), (0, 1)]},
        {"chunk_spans": [(0, 1)]},  # one span for two chunks' rank
        {"chunk_spans": []},
        {"chunk_spans": "ab"},
        {"kind": "diary"},
        {"base_model": ""},
        {"hypernet": "has space"},
        {"tags": "one-string"},
        {"tags": ["x"] * 0 + ["bad tag"]},
        {"metadata": {"x": float("nan")}},
        {"metadata": {"x": object()}},
        {"metadata": {"x": "nul\x00"}},
        {"metadata": {"x": "y" * 70_000}},
        {"source_text": "nul\x00"},
        {"source_text": "lone \ud800 surrogate"},
        {"source_hash": "../../x"},
        {"expires_at": datetime(2030, 1, 1)},  # naive
        {"rank_per_chunk": 0},
        {"scope": "acme"},
    ],
    ids=repr,
)
def test_malformed_arguments_are_refused(sqlite_store: AdapterStore, kw: dict[str, object]) -> None:
    args: dict[str, object] = dict(
        scope=T, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=4, chunk_spans=spans(2)
    )
    with pytest.raises(StoreError):
        sqlite_store.put(make_adapter(n_chunks=2, r=4), **(args | kw))  # type: ignore[arg-type]
    assert sqlite_store.list(T) == []


def test_list_arguments_are_checked(sqlite_store: AdapterStore) -> None:
    for kw in ({"limit": 0}, {"limit": 10_001}, {"offset": -1}, {"kind": "diary"}, {"tags": ["a b"]}):
        with pytest.raises(StoreError):
            sqlite_store.list(T, **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        sqlite_store.list("acme")  # type: ignore[arg-type]
