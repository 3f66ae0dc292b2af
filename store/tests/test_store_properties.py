"""Property-based round trips (hypothesis) over shapes, dtypes, metadata, scopes and tags, on every
backend: what goes in comes out bit for bit, through the store and through a PEFT export/import."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from store_testing import BASE, HYPER, assert_same_tensors

from d2l_store import AdapterStore, InvalidIdentifierError, MemoryKind, Scope

SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _nfc(s: str) -> bool:
    return unicodedata.is_normalized("NFC", s)


name_chars = st.characters(categories=["L", "N"]) | st.sampled_from("._:@+=-")
scope_field = st.text(name_chars, max_size=12).filter(_nfc)
scopes = st.builds(Scope, tenant=scope_field, user=scope_field, agent=scope_field, session=scope_field)
tags = st.lists(st.text(name_chars | st.just("/"), min_size=1, max_size=10).filter(_nfc), max_size=4)
plain_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | plain_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3),
    max_leaves=8,
)
metadata = st.dictionaries(plain_text, json_values, max_size=4)


@st.composite
def adapters(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], int, list[tuple[int, int]]]:
    """Random tensors in the store's convention, with values that stress the dtype (zeros, signed
    zeros, tiny and huge finite numbers) besides ordinary ones."""
    dtype = draw(st.sampled_from(DTYPES))
    r, n_chunks = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    layers = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True))
    projs = draw(st.lists(st.sampled_from(PROJ), min_size=1, max_size=2, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, finfo.tiny, -finfo.max, finfo.max, finfo.eps], dtype=dtype)
    out = {}
    for layer in layers:
        for proj in projs:
            d_in, d_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
            for suffix, shape in ((".lora_A", (r * n_chunks, d_in)), (".lora_B", (d_out, r * n_chunks))):
                t = (torch.randn(shape, generator=g) * 10 ** draw(st.integers(-3, 3))).to(dtype)
                pick = torch.randint(0, 4 * len(specials), shape, generator=g)
                t = torch.where(pick < len(specials), specials[pick.clamp(max=len(specials) - 1)], t)
                out[f"model.layers.{layer}.mlp.{proj}{suffix}"] = t
    starts = sorted(draw(st.lists(st.integers(0, 10_000), min_size=n_chunks, max_size=n_chunks)))
    spans = [(s, s + draw(st.integers(0, 600))) for s in starts]
    return out, r, spans


@SETTINGS
@given(adapter=adapters(), scope=scopes, tags=tags, meta=metadata, text=st.none() | plain_text,
       kind=st.sampled_from(MemoryKind))  # fmt: skip
def test_put_get_round_trip(store: AdapterStore, adapter: Any, scope: Scope, tags: list[str], meta: dict,
                            text: str | None, kind: MemoryKind) -> None:  # fmt: skip
    tensors, r, spans = adapter
    rec = store.put(tensors, scope=scope, kind=kind, base_model=BASE, hypernet=HYPER, rank_per_chunk=r,
                    chunk_spans=spans, tags=tags, metadata=meta, source_text=text)  # fmt: skip
    got, loaded = store.get(rec.id, scope=scope, expect_base_model=BASE, expect_hypernet=HYPER)
    assert_same_tensors(loaded, tensors)
    assert got == rec
    assert got.scope == scope and got.tags == tuple(sorted(set(tags))) and got.chunk_spans == tuple(spans)
    assert _json_equal(got.metadata, meta) and got.source_text == text
    assert rec.id in {x.id for x in store.list(scope, exact_scope=True, tags=tags, kind=kind, limit=1000)}
    if text is not None:
        found = store.find_by_source_hash(scope, got.source_hash, BASE, HYPER).id  # type: ignore[arg-type,union-attr]
        assert found == rec.id
    store.delete(rec.id, scope=scope)


@SETTINGS
@given(adapter=adapters(), pad=st.booleans())
def test_peft_export_import_round_trip(
    sqlite_store: AdapterStore, tmp_path_factory: Any, adapter: Any, pad: bool
) -> None:
    tensors, r, spans = adapter
    rec = sqlite_store.put(tensors, scope=Scope(tenant="t"), kind="document", base_model=BASE, hypernet=HYPER,
                           rank_per_chunk=r, chunk_spans=spans)  # fmt: skip
    out: Path = tmp_path_factory.mktemp("peft")
    sqlite_store.export_peft(rec.id, out, pad_rank_to_vllm=pad)
    back = sqlite_store.import_peft(out, scope=Scope(tenant="u"), kind="document", base_model=BASE, hypernet=HYPER)
    assert (back.rank_per_chunk, back.chunk_spans) == (rec.rank_per_chunk, rec.chunk_spans)
    assert_same_tensors(sqlite_store.get(back.id)[1], tensors)


@SETTINGS
@given(tenant=st.text(max_size=20), other=st.text(max_size=20))
def test_any_tenant_string_is_refused_or_isolated(sqlite_store: AdapterStore, tenant: str, other: str) -> None:
    try:
        mine, theirs = Scope(tenant=tenant), Scope(tenant=other)
    except InvalidIdentifierError:
        return
    assume(tenant != other)
    t = {"x.lora_A": torch.ones(1, 2), "x.lora_B": torch.ones(2, 1)}
    rec = sqlite_store.put(
        t, scope=mine, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=1, chunk_spans=[(0, 1)]
    )
    assert rec.id not in {x.id for x in sqlite_store.list(theirs, limit=1000)}
    assert rec.id in {x.id for x in sqlite_store.list(mine, limit=1000)}
    sqlite_store.delete_scope(theirs)
    assert sqlite_store.get_record(rec.id, scope=mine).id == rec.id
    sqlite_store.delete(rec.id)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality that also tells True from 1 and 1.0 from 1 (a JSON round trip keeps all three)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
