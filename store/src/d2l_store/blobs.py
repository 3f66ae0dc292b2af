"""Content-addressed blob storage: a local directory, or any fsspec filesystem (s3://, gs://, memory://).

A blob's name is the sha256 of its bytes, so a reader can always tell a good blob from a damaged
one, equal adapters share one file, and no caller-given string ever becomes part of a path.
Layout under the root: `sha256/<first two hex digits>/<digest>.safetensors`, plus `tmp/` for
local writes in flight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import fsspec

from d2l_store.errors import BlobIntegrityError
from d2l_store.scope import check_blob_hash

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


def digest_of(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _relpath(digest: str) -> str:
    check_blob_hash(digest)  # the only place a name turns into a path: it must be 64 hex digits
    return f"sha256/{digest[:2]}/{digest}{SUFFIX}"


def _verify(digest: str, data: bytes, where: str) -> bytes:
    actual = digest_of(data)
    if actual != digest:
        raise BlobIntegrityError(
            f"blob {digest} at {where} hashes to {actual} ({len(data)} bytes): tampered or truncated"
        )
    return data


class BlobStore(Protocol):
    """What the store needs from a blob backend."""

    url: str

    def write(self, digest: str, data: bytes | bytearray) -> None:
        """Make the blob `digest` hold `data`, all or nothing; a no-op when an intact copy exists.
        The caller has just hashed `data` to get `digest` (hashing is the slow part of a large put,
        so it is done once); reads verify every blob anyway."""

    def read(self, digest: str) -> bytes:
        """The blob's bytes, verified against its name; BlobIntegrityError if missing or damaged."""

    def delete(self, digest: str) -> None:
        """Remove the blob; missing is fine."""

    def size(self, digest: str) -> int:
        """The blob's size in bytes (0 if it vanished meanwhile)."""

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest."""

    def clean_temp(self, older_than_s: float) -> int:
        """Remove leftovers of interrupted writes older than this; returns how many."""


class LocalBlobStore:
    """Blobs in a local directory, written temp file -> fsync -> rename -> fsync(dir).

    A writer killed at any point leaves either no blob or a complete one under its final name; at
    worst a stray file in `tmp/`, which `clean_temp` removes once it is old.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / _relpath(digest)

    def write(self, digest: str, data: bytes | bytearray) -> None:
        final = self.path(digest)
        if final.exists():
            try:
                _verify(digest, final.read_bytes(), str(final))
                return
            except (BlobIntegrityError, OSError):
                log.warning("blob %s exists but is damaged; rewriting it", digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{digest}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def read(self, digest: str) -> bytes:
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise BlobIntegrityError(f"blob {digest} is missing from {self.root}") from None
        return _verify(digest, data, str(p))

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def digests(self) -> Iterator[str]:
        for p in (self.root / "sha256").glob(f"*/*{SUFFIX}"):
            name = p.name[: -len(SUFFIX)]
            if len(name) == 64 and p.parent.name == name[:2]:
                yield name

    def clean_temp(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        n = 0
        for p in (self.root / "tmp").glob("*.tmp"):
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass  # another process cleaned it first
        return n


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecBlobStore:
    """Blobs on any fsspec filesystem. Object stores publish a PUT whole or not at all, so a blob is
    written straight to its final key, then read back and verified before it is referenced."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")

    def path(self, digest: str) -> str:
        return f"{self.root}/{_relpath(digest)}"

    def _read_raw(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)  # listings may be cached per process; another one may have written
        data = self.fs.cat_file(path)
        assert isinstance(data, bytes)
        return data

    def write(self, digest: str, data: bytes | bytearray) -> None:
        path = self.path(digest)
        try:
            _verify(digest, self._read_raw(path), path)
            return
        except FileNotFoundError:
            pass
        except BlobIntegrityError:
            log.warning("blob %s exists but is damaged; rewriting it", digest)
        self.fs.pipe_file(path, bytes(data))
        _verify(digest, self._read_raw(path), path)

    def read(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = self._read_raw(path)
        except FileNotFoundError:
            raise BlobIntegrityError(f"blob {digest} is missing from {self.url}") from None
        return _verify(digest, data, path)

    def delete(self, digest: str) -> None:
        try:
            self.fs.rm_file(self.path(digest))
        except FileNotFoundError:
            pass

    def size(self, digest: str) -> int:
        try:
            return int(self.fs.size(self.path(digest)))
        except FileNotFoundError:
            return 0

    def digests(self) -> Iterator[str]:
        base = f"{self.root}/sha256"
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return
        for p in found:
            name = p.rsplit("/", 1)[-1]
            if name.endswith(SUFFIX) and len(name) == 64 + len(SUFFIX):
                yield name[: -len(SUFFIX)]

    def clean_temp(self, older_than_s: float) -> int:
        return 0  # nothing is staged on object stores


def open_blob_store(root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> BlobStore:
    """A local directory for plain paths and file:// URLs, fsspec for any other protocol."""
    s = os.fspath(root)
    if "://" not in s:
        return LocalBlobStore(s)
    if s.startswith("file://"):
        return LocalBlobStore(s[len("file://") :])
    return FsspecBlobStore(s, storage_options)
