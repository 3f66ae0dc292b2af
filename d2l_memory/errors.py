"""Typed errors. Every failure a caller can cause has its own class, all under D2LMemoryError."""

from __future__ import annotations


class D2LMemoryError(Exception):
    """Base class of every error d2l_memory raises on purpose."""


class InvalidDocumentError(D2LMemoryError, ValueError):
    """The text to internalize is empty, whitespace-only, binary or not text at all."""


class DocumentTooLargeError(InvalidDocumentError):
    """The text exceeds the configured size limit (see ChunkConfig.max_document_tokens)."""


class BaseModelUnavailableError(D2LMemoryError, RuntimeError):
    """The base model cannot be found or prepared (missing package, bad path, no network)."""


class CheckpointError(D2LMemoryError):
    """A hypernetwork checkpoint or adapter file is unreadable, tampered with or of an unknown schema."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint or adapter was made for another base model or another hypernetwork."""


class IncomparableEvaluationError(D2LMemoryError, ValueError):
    """An earlier evaluation's rows were offered for reuse, but it ran other documents or settings."""
