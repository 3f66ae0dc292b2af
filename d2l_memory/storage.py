"""Where memories live by default: an embedded SQLite index and a blob folder in the d2l-memory home.

``D2L_MEMORY_STORE`` (an SQLAlchemy URL, e.g. ``postgresql://user:pw@host/db``) and
``D2L_MEMORY_BLOBS`` (a folder or an fsspec URL such as ``s3://bucket/prefix``) override them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from d2l_memory.paths import d2l_home

if TYPE_CHECKING:
    from d2l_store import AdapterStore


def default_store_location(home: Path | None = None) -> tuple[str, str]:
    root = (home or d2l_home()) / "store"
    index = os.environ.get("D2L_MEMORY_STORE") or f"sqlite:///{root / 'index.db'}"
    blobs = os.environ.get("D2L_MEMORY_BLOBS") or str(root / "blobs")
    return index, blobs


def open_store(index_url: str | None = None, blob_root: str | None = None, home: Path | None = None) -> AdapterStore:
    """Open the given store, or the default one (created on first use)."""
    from d2l_store import AdapterStore  # here, not at the top: the store imports torch

    default_index, default_blobs = default_store_location(home)
    return AdapterStore.open(index_url or default_index, blob_root or default_blobs)
