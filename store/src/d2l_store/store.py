"""`AdapterStore`: LoRA adapters as safetensors blobs, indexed in SQL.

Write order is what makes crashes harmless: (1) lease the blob's row, (2) write the blob (atomic),
(3) insert the adapter row in one transaction. A process killed before (3) commits leaves no
visible memory, only a leased, unreferenced blob that `gc_blobs` removes once its lease is old; an
adapter row is never committed before its blob exists, and the foreign key from adapters to blobs
means a blob the collector took in between makes step (3) fail, and the put retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import torch
from sqlalchemy import Engine, delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, selectinload, sessionmaker

from d2l_store import blobformat, migrate, peft_format, queries
from d2l_store.blobs import BlobStore, digest_of, open_blob_store
from d2l_store.collect import GcReport, collect_garbage
from d2l_store.db import WRITE_OPTION, create_index_engine
from d2l_store.errors import (
    BlobIntegrityError,
    ConflictError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidIdentifierError,
    RecordNotFound,
    StoreError,
)
from d2l_store.models import AdapterRow, TagRow
from d2l_store.records import AdapterRecord, new_record_id
from d2l_store.scope import MemoryKind, Scope, check_fingerprint, check_record_id, check_source_hash, check_tags
from d2l_store.spec import RecordSpec, build_spec, check_kind
from d2l_store.tensors import Tensors, check_adapter, check_spans, concat_chunks, keep_chunks, to_cpu

log = logging.getLogger(__name__)

FORMAT_NAME = "d2l-store/lora-adapter"
FORMAT_VERSION = "1"
DEFAULT_GC_GRACE_S = 600.0
MAX_LIST_LIMIT = 1000
PUT_ATTEMPTS = 3

P = ParamSpec("P")
R = TypeVar("R")


def _in_thread(fn: Callable[Concatenate[AdapterStore, P], R]) -> Callable[Concatenate[AdapterStore, P], Awaitable[R]]:
    """Async twin of a blocking method: runs it in a worker thread so I/O never blocks the loop."""

    async def run(self: AdapterStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, self, *args, **kwargs)

    run.__name__ = "a" + fn.__name__
    run.__doc__ = f"Async `{fn.__name__}` (runs in a worker thread).\n\n{fn.__doc__ or ''}"
    return run


def _now() -> datetime:
    return datetime.now(UTC)


class AdapterStore:
    """Put, get, list, version and delete LoRA adapters. Thread-safe; many processes may share one
    store (SQLite in WAL mode, or PostgreSQL). Use `AdapterStore.open(...)`."""

    def __init__(self, engine: Engine, blobs: BlobStore, *, gc_grace_s: float = DEFAULT_GC_GRACE_S) -> None:
        self.engine = engine
        self.blobs = blobs
        self.gc_grace_s = gc_grace_s
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False)

    @classmethod
    def open(
        cls,
        index_url: str,
        blob_root: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        migrate_schema: bool = True,
        gc_grace_s: float = DEFAULT_GC_GRACE_S,
        echo_sql: bool = False,
    ) -> AdapterStore:
        """Open (creating if needed) a store: `index_url` is any SQLAlchemy URL (`sqlite:////abs/index.db`,
        `postgresql://user:pw@host/db`); `blob_root` a directory or an fsspec URL (`s3://bucket/prefix`,
        `memory://name`) with `storage_options` passed to fsspec. Runs schema migrations first."""
        engine = create_index_engine(index_url, echo=echo_sql)
        try:
            if migrate_schema:
                migrate.upgrade(engine)
            blobs = open_blob_store(blob_root, storage_options)
        except BaseException:
            engine.dispose()
            raise
        log.info("opened adapter store index=%s blobs=%s", engine.url.render_as_string(hide_password=True), blobs.url)
        return cls(engine, blobs, gc_grace_s=gc_grace_s)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------------

    def put(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        scope: Scope,
        kind: MemoryKind | str,
        base_model: str,
        hypernet: str,
        rank_per_chunk: int,
        chunk_spans: Sequence[Sequence[int]],
        source_text: str | None = None,
        source_hash: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
        supersedes: str | None = None,
    ) -> AdapterRecord:
        """Store an adapter; with `supersedes`, as the next version of that record (same tenant),
        whose row is replaced in the same transaction (ConflictError if someone replaced it first)."""
        spec = build_spec(
            scope=scope, kind=kind, base_model=base_model, hypernet=hypernet, rank_per_chunk=rank_per_chunk,
            chunk_spans=chunk_spans, source_text=source_text, source_hash=source_hash, tags=tags,
            metadata=metadata, expires_at=expires_at,
        )  # fmt: skip
        if supersedes is not None:
            check_record_id(supersedes)
        return self._put_spec(to_cpu(tensors), spec, supersedes)

    def _put_spec(self, tensors: Tensors, spec: RecordSpec, supersedes: str | None) -> AdapterRecord:
        layout = check_adapter(tensors, spec.rank_per_chunk, spec.n_chunks)
        header = _blob_header(spec.base_model, spec.hypernet, spec.rank_per_chunk, spec.chunk_spans)
        data = blobformat.encode(tensors, header)
        digest = digest_of(data)
        for attempt in range(1, PUT_ATTEMPTS + 1):
            with self._write() as s, s.begin():
                queries.lease_blob(s, digest, len(data), _now())
            self.blobs.write(digest, data)
            try:
                rec = self._insert(spec, digest, len(data), len(layout.modules), layout.dtype, supersedes)
            except IntegrityError as e:
                if attempt == PUT_ATTEMPTS:
                    raise StoreError(f"could not index blob {digest} after {attempt} attempts: {e}") from e
                log.warning("blob %s was collected while being stored; retrying (%s)", digest, e.orig)
                continue
            log.debug("put %s (%d chunks, %d bytes, blob %s)", rec.id, rec.n_chunks, rec.nbytes, digest[:12])
            return rec
        raise AssertionError("unreachable")

    def _insert(self, spec: RecordSpec, digest: str, nbytes: int, n_modules: int, dtype: torch.dtype,
                supersedes: str | None) -> AdapterRecord:  # fmt: skip
        now = _now()
        version, created_at = 1, now
        with self._write() as s, s.begin():
            if supersedes is not None:
                old = s.scalars(
                    select(AdapterRow).where(
                        AdapterRow.id == supersedes, AdapterRow.tenant == spec.scope.tenant, queries.visible(now)
                    )
                ).one_or_none()
                if old is None:
                    _raise_missing_predecessor(s, supersedes, spec.scope.tenant)
                version, created_at = old.version + 1, old.created_at
                gone = s.execute(delete(AdapterRow).where(AdapterRow.id == old.id, AdapterRow.version == old.version))
                if gone.rowcount != 1:  # type: ignore[attr-defined]
                    raise ConflictError(f"record {supersedes} was superseded or deleted by another writer")
            row = queries.new_row(
                new_record_id(), spec, blob_digest=digest, nbytes=nbytes, n_modules=n_modules,
                dtype=blobformat.DTYPE_NAMES[dtype], created_at=created_at, updated_at=now, version=version,
                supersedes=supersedes,
            )  # fmt: skip
            s.add(row)
            s.flush()  # the adapter row must exist before its tags reference it
            s.add_all(TagRow(adapter_id=row.id, tag=t) for t in spec.tags)
        return queries.to_record(row, spec.tags, with_text=True)

    def append_chunks(
        self,
        id: str,
        tensors: Mapping[str, torch.Tensor],
        chunk_spans: Sequence[Sequence[int]],
        *,
        scope: Scope | None = None,
        source_text: str | None = None,
        source_hash: str | None = None,
    ) -> AdapterRecord:
        """New version of `id` with these chunks after its own (concatenated along rank). The old
        source hash no longer describes the content, so it is replaced by the one given (or none)."""
        rec, old = self.get(id, scope=scope)
        spans = check_spans(chunk_spans)
        check_adapter(tensors, rec.rank_per_chunk, len(spans))
        merged = concat_chunks(old, to_cpu(tensors))
        spec = _respec(rec, chunk_spans=rec.chunk_spans + spans, source_text=source_text, source_hash=source_hash)
        return self._put_spec(merged, spec, supersedes=rec.id)

    def drop_chunks(self, id: str, chunk_indices: Sequence[int], *, scope: Scope | None = None) -> AdapterRecord:
        """New version of `id` without the given chunks (by index); at least one chunk must remain."""
        rec, old = self.get(id, scope=scope)
        drop = set()
        for i in chunk_indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < rec.n_chunks:
                raise InvalidAdapterError(f"chunk index {i!r} is out of range for {rec.n_chunks} chunks")
            drop.add(i)
        keep = [i for i in range(rec.n_chunks) if i not in drop]
        if not keep:
            raise InvalidAdapterError(
                f"dropping all {rec.n_chunks} chunks would leave an empty adapter; delete it instead"
            )
        spec = _respec(rec, chunk_spans=tuple(rec.chunk_spans[i] for i in keep), source_text=None, source_hash=None)
        return self._put_spec(keep_chunks(old, keep, rec.rank_per_chunk), spec, supersedes=rec.id)

    # ---- reading -------------------------------------------------------------------------------

    def get_record(self, id: str, scope: Scope | None = None) -> AdapterRecord:
        """The record only (no blob read). RecordNotFound if absent, expired or outside `scope`."""
        check_record_id(id)
        q = select(AdapterRow).where(AdapterRow.id == id, queries.visible(_now()))
        if scope is not None:
            q = q.where(*queries.scope_filter(_check_scope(scope)))
        with self._read() as s:
            row = s.scalars(q.options(selectinload(AdapterRow.tags))).one_or_none()
            if row is None:
                raise RecordNotFound(f"no record {id}" + (f" in tenant {scope.tenant!r}" if scope is not None else ""))
            return queries.to_record(row, tuple(t.tag for t in row.tags), with_text=True)

    def get(
        self,
        id: str,
        scope: Scope | None = None,
        expect_base_model: str | None = None,
        expect_hypernet: str | None = None,
    ) -> tuple[AdapterRecord, Tensors]:
        """Record and tensors. The blob is re-hashed (BlobIntegrityError if damaged) and the
        compatibility asked for is checked before any tensor is loaded (IncompatibleAdapterError)."""
        rec = self.get_record(id, scope=scope)
        if expect_base_model is not None and rec.base_model != expect_base_model:
            raise IncompatibleAdapterError(
                f"record {id} was made for base model {rec.base_model!r}, not {expect_base_model!r}"
            )
        if expect_hypernet is not None and rec.hypernet != expect_hypernet:
            raise IncompatibleAdapterError(
                f"record {id} was made by hypernetwork {rec.hypernet!r}, not {expect_hypernet!r}"
            )
        tensors, header = blobformat.decode(self.blobs.read(rec.blob_digest))
        expected = _blob_header(rec.base_model, rec.hypernet, rec.rank_per_chunk, rec.chunk_spans)
        if any(header.get(k) != v for k, v in expected.items()):
            raise BlobIntegrityError(f"blob {rec.blob_digest} header does not describe record {id}")
        return rec, tensors

    def list(
        self,
        scope: Scope,
        *,
        kind: MemoryKind | str | None = None,
        tags: Sequence[str] = (),
        base_model: str | None = None,
        hypernet: str | None = None,
        limit: int = 50,
        offset: int = 0,
        cursor: str | None = None,
        exact_scope: bool = False,
        include_source_text: bool = False,
    ) -> list[AdapterRecord]:
        """Visible records in `scope` (see `Scope`), newest first, having all `tags`.

        Page with `offset`, or with `cursor=<id of the last record of the previous page>`, which
        stays correct while others write. `exact_scope` matches empty fields exactly too."""
        scope = _check_scope(scope)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidAdapterError(f"limit must be an int in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidAdapterError(f"offset must be a non-negative int, got {offset!r}")
        q = select(AdapterRow).where(*queries.scope_filter(scope, exact=exact_scope), queries.visible(_now()))
        if kind is not None:
            q = q.where(AdapterRow.kind == check_kind(kind).value)
        if base_model is not None:
            q = q.where(AdapterRow.base_model == check_fingerprint("base_model", base_model))
        if hypernet is not None:
            q = q.where(AdapterRow.hypernet == check_fingerprint("hypernet", hypernet))
        for tag in check_tags(tags):
            q = q.where(exists().where(TagRow.adapter_id == AdapterRow.id, TagRow.tag == tag))
        if cursor is not None:
            q = q.where(AdapterRow.id < check_record_id(cursor))
        q = q.order_by(AdapterRow.id.desc()).limit(limit).offset(offset).options(selectinload(AdapterRow.tags))
        if not include_source_text:
            q = q.options(defer(AdapterRow.source_text))
        with self._read() as s:
            rows = s.scalars(q).all()
            return [queries.to_record(r, tuple(t.tag for t in r.tags), with_text=include_source_text) for r in rows]

    def find_by_source_hash(
        self, scope: Scope, source_hash: str, base_model: str, hypernet: str
    ) -> AdapterRecord | None:
        """The newest visible record made from this source, in exactly this scope, by this
        base model and hypernetwork: an identical source need not be turned into an adapter twice."""
        q = (
            select(AdapterRow)
            .where(
                *queries.scope_filter(_check_scope(scope), exact=True),
                AdapterRow.source_hash == check_source_hash(source_hash),
                AdapterRow.base_model == check_fingerprint("base_model", base_model),
                AdapterRow.hypernet == check_fingerprint("hypernet", hypernet),
                queries.visible(_now()),
            )
            .order_by(AdapterRow.id.desc())
            .limit(1)
            .options(selectinload(AdapterRow.tags))
        )
        with self._read() as s:
            row = s.scalars(q).one_or_none()
            return None if row is None else queries.to_record(row, tuple(t.tag for t in row.tags), with_text=True)

    # ---- deleting ------------------------------------------------------------------------------

    def delete(self, id: str, scope: Scope | None = None) -> None:
        """Delete one record (its blob is left for `gc_blobs`). RecordNotFound if not in `scope`."""
        check_record_id(id)
        q = delete(AdapterRow).where(AdapterRow.id == id)
        if scope is not None:
            q = q.where(*queries.scope_filter(_check_scope(scope)))
        with self._write() as s, s.begin():
            if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                raise RecordNotFound(f"no record {id}" + (f" in tenant {scope.tenant!r}" if scope is not None else ""))

    def delete_scope(self, scope: Scope) -> int:
        """Delete every record matching `scope` (tenant exact, other fields if non-empty); returns how many."""
        q = delete(AdapterRow).where(*queries.scope_filter(_check_scope(scope)))
        with self._write() as s, s.begin():
            n = int(s.execute(q).rowcount)  # type: ignore[attr-defined]
        log.info("deleted %d records in scope %s", n, scope)
        return n

    def expire(self, now: datetime | None = None) -> int:
        """Delete records whose expiry has passed (at `now`, default the current time)."""
        now = now or _now()
        with self._write() as s, s.begin():
            result = s.execute(delete(AdapterRow).where(AdapterRow.expires_at <= now))
            n = int(result.rowcount)  # type: ignore[attr-defined]
        if n:
            log.info("expired %d records", n)
        return n

    def gc_blobs(self, grace_s: float | None = None) -> GcReport:
        """Remove blobs no record references, sparing those leased (being written) within `grace_s`
        seconds (default: the store's `gc_grace_s`), and stale temp files of interrupted writes."""
        return collect_garbage(self._read, self._write, self.blobs, self.gc_grace_s if grace_s is None else grace_s)

    # ---- PEFT ----------------------------------------------------------------------------------

    def export_peft(
        self,
        id: str,
        out_dir: str | os.PathLike[str],
        pad_rank_to_vllm: bool = False,
        *,
        scope: Scope | None = None,
        base_model_name_or_path: str | None = None,
    ) -> Path:
        """Write the adapter as a PEFT LoRA folder loadable by stock peft, vLLM, LoRAX and SGLang.

        `pad_rank_to_vllm` zero-pads the rank up to the next rank vLLM accepts; the adapter's effect
        is unchanged. `base_model_name_or_path` defaults to the record's base-model fingerprint."""
        rec, tensors = self.get(id, scope=scope)
        header = {
            "d2l.format": "d2l-store/peft-export",
            "d2l.record_id": rec.id,
            "d2l.rank": str(rec.rank),
            "d2l.rank_per_chunk": str(rec.rank_per_chunk),
            "d2l.chunk_spans": json.dumps([list(s) for s in rec.chunk_spans]),
            "d2l.base_model": rec.base_model,
            "d2l.hypernet": rec.hypernet,
        }
        return peft_format.write_peft(
            out_dir, tensors, rank=rec.rank, pad_to=peft_format.vllm_rank(rec.rank) if pad_rank_to_vllm else None,
            base_model_name_or_path=base_model_name_or_path or rec.base_model, header=header,
        )  # fmt: skip

    def import_peft(
        self,
        in_dir: str | os.PathLike[str],
        *,
        scope: Scope,
        kind: MemoryKind | str,
        base_model: str,
        hypernet: str,
        rank_per_chunk: int | None = None,
        chunk_spans: Sequence[Sequence[int]] | None = None,
        source_text: str | None = None,
        source_hash: str | None = None,
        tags: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> AdapterRecord:
        """Store a PEFT LoRA folder (scale folded into B). Folders written by `export_peft` get their
        chunking back and their padding removed; others become one chunk of their full rank unless
        `rank_per_chunk` / `chunk_spans` say otherwise."""
        peft = peft_format.read_peft(in_dir)
        tensors, rank = peft.tensors, peft.rank
        if peft.header.get("d2l.format") == "d2l-store/peft-export":
            true_rank = int(peft.header.get("d2l.rank", rank))
            trimmed = peft_format.trim_padding(tensors, rank, true_rank)
            if trimmed is not None:
                tensors, rank = trimmed, true_rank
                rank_per_chunk = rank_per_chunk or int(peft.header["d2l.rank_per_chunk"])
                if chunk_spans is None:
                    chunk_spans = [tuple(s) for s in json.loads(peft.header["d2l.chunk_spans"])]
        rank_per_chunk = rank_per_chunk or rank
        if chunk_spans is None:
            chunk_spans = [(0, 0)] * max(1, rank // rank_per_chunk)
        return self.put(
            tensors, scope=scope, kind=kind, base_model=base_model, hypernet=hypernet, rank_per_chunk=rank_per_chunk,
            chunk_spans=chunk_spans, source_text=source_text, source_hash=source_hash, tags=tags, metadata=metadata,
            expires_at=expires_at,
        )  # fmt: skip

    # ---- async twins ---------------------------------------------------------------------------

    aput = _in_thread(put)
    aget = _in_thread(get)
    aget_record = _in_thread(get_record)
    alist = _in_thread(list)
    adelete = _in_thread(delete)
    adelete_scope = _in_thread(delete_scope)
    aexpire = _in_thread(expire)
    agc_blobs = _in_thread(gc_blobs)
    aappend_chunks = _in_thread(append_chunks)
    adrop_chunks = _in_thread(drop_chunks)
    afind_by_source_hash = _in_thread(find_by_source_hash)
    aexport_peft = _in_thread(export_peft)
    aimport_peft = _in_thread(import_peft)


def _check_scope(scope: object) -> Scope:
    if not isinstance(scope, Scope):
        raise InvalidIdentifierError(f"scope must be a Scope, got {type(scope).__name__}")
    return scope


def _raise_missing_predecessor(s: Session, id: str, tenant: str) -> NoReturn:
    """ConflictError if another writer already replaced `id` (a newer version names it), so callers
    can re-read and retry; RecordNotFound if it never existed here, was deleted or expired."""
    newer = s.scalar(select(AdapterRow.id).where(AdapterRow.supersedes == id, AdapterRow.tenant == tenant).limit(1))
    if newer is not None:
        raise ConflictError(f"record {id} was already superseded by {newer}; re-read it and retry")
    raise RecordNotFound(f"cannot supersede {id}: no such record in tenant {tenant!r}")


def _blob_header(
    base_model: str, hypernet: str, rank_per_chunk: int, chunk_spans: Sequence[Sequence[int]]
) -> dict[str, str]:
    """The str -> str safetensors metadata that makes a blob self-describing."""
    return {
        "format": "pt",
        "d2l.format": FORMAT_NAME,
        "d2l.format_version": FORMAT_VERSION,
        "d2l.base_model": base_model,
        "d2l.hypernet": hypernet,
        "d2l.rank_per_chunk": str(rank_per_chunk),
        "d2l.n_chunks": str(len(chunk_spans)),
        "d2l.chunk_spans": json.dumps([list(s) for s in chunk_spans], separators=(",", ":")),
    }


def _respec(rec: AdapterRecord, **changes: Any) -> RecordSpec:
    """The spec of a new version of `rec`: its fields with `changes` applied, validated again."""
    fields: dict[str, Any] = dict(
        scope=rec.scope, kind=rec.kind, base_model=rec.base_model, hypernet=rec.hypernet,
        rank_per_chunk=rec.rank_per_chunk, chunk_spans=rec.chunk_spans, source_text=rec.source_text,
        source_hash=rec.source_hash, tags=rec.tags, metadata=rec.metadata, expires_at=rec.expires_at,
    )  # fmt: skip
    return build_spec(**(fields | changes))
