"""Typed errors of the adapter store.

Every error the store raises on purpose is a `StoreError`, so a caller can catch the whole family
in one place and still tell a missing record from a corrupted blob from a caller mistake.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class RecordNotFound(StoreError, KeyError):
    """No visible record has this id in the caller's scope (absent, deleted, superseded or expired).

    Also raised when the record exists but belongs to another scope: telling the two apart would
    let one tenant probe for another tenant's ids.
    """

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "record not found"


class BlobIntegrityError(StoreError):
    """A blob is missing, truncated or does not hash to its name: it is never loaded."""


class IncompatibleAdapterError(StoreError):
    """The adapter was made for another base model or hypernetwork than the caller expects."""


class InvalidIdentifierError(StoreError, ValueError):
    """An id, scope field, tag, module path or hash is malformed (bad characters, empty, too long)."""


class InvalidAdapterError(StoreError, ValueError):
    """The tensors, chunk spans or metadata do not follow the adapter convention."""


class ConflictError(StoreError):
    """A concurrent writer changed the record first (it was superseded or deleted meanwhile)."""
