"""Saved evaluation results: how one is read and what its rows are keyed and grouped by, shared by the
harness, its reuse check, ``eval-compare`` and ``benchmarks/judge.py`` (none of which needs model code)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d2l_memory.errors import D2LMemoryError

Row = dict[str, Any]
RowKey = tuple[str, str, int]

MODES = ("none", "in_context", "rag", "adapter", "adapter_recall", "hybrid", "wrong_adapter", "distill")
HYPERNET_FREE_MODES = ("none", "in_context", "rag", "distill")
"""Modes whose answers do not depend on the hypernetwork (greedy decoding of the base model, or a
LoRA trained by gradient descent): an evaluation of another checkpoint on the same documents may
reuse them instead of spending most of its time recomputing them."""
HYPERNET_MODES = tuple(m for m in MODES if m not in HYPERNET_FREE_MODES)


def read_result(path: str | Path) -> dict[str, Any]:
    """A saved ``eval.json``; a typed error names the file when it is missing, unreadable or not one."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise D2LMemoryError(f"{path}: not a readable eval.json ({exc})") from exc
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise D2LMemoryError(f"{path}: not an eval.json (no rows)")
    return result


def row_key(row: Row) -> RowKey:
    """The same question about the same document cut to the same length."""
    return (str(row["doc"]), str(row["question"]), int(row["tokens"]))


def provider_recall_rows(adapter: Mapping[RowKey, Row], recall: Mapping[RowKey, Row]) -> dict[RowKey, Row]:
    """The memory provider's answer to every question under a recall budget. The harness asks recall only
    of documents cut into more chunks than the budget; on the others the provider applies every chunk,
    which is the adapter row. Filled in this way, two runs that cut documents differently (so recall ran
    on different documents) answer the same questions."""
    return {**adapter, **recall}


def is_short_doc(row: Row) -> bool:
    """Fact, conversation and tool documents (not needle haystacks)."""
    return row["domain"] != "needle"


def value_set(row: Row) -> str:
    """Which of the two answer-value groups a fact row belongs to (reported separately)."""
    return "unseen values" if row["open_value"] else "closed-set values"
