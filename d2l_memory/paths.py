"""The d2l-memory home directory (model cache, default store), kept free of heavy imports."""

from __future__ import annotations

import os
from pathlib import Path


def d2l_home() -> Path:
    """Cache and data directory: $D2L_MEMORY_HOME, else ~/.cache/d2l-memory."""
    env = os.environ.get("D2L_MEMORY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2l-memory"
