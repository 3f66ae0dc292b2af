"""What an evaluation row is keyed and grouped by, shared by the harness, its reuse check and
``eval-compare`` (which pairs two saved results without any model code)."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]
RowKey = tuple[str, str, int]

MODES = ("none", "in_context", "rag", "adapter", "adapter_recall", "hybrid", "wrong_adapter", "distill")
HYPERNET_FREE_MODES = ("none", "in_context", "rag", "distill")
"""Modes whose answers do not depend on the hypernetwork (greedy decoding of the base model, or a
LoRA trained by gradient descent): an evaluation of another checkpoint on the same documents may
reuse them instead of spending most of its time recomputing them."""
HYPERNET_MODES = tuple(m for m in MODES if m not in HYPERNET_FREE_MODES)


def row_key(row: Row) -> RowKey:
    """The same question about the same document cut to the same length."""
    return (str(row["doc"]), str(row["question"]), int(row["tokens"]))


def is_short_doc(row: Row) -> bool:
    """Fact, conversation and tool documents (not needle haystacks)."""
    return row["domain"] != "needle"


def value_set(row: Row) -> str:
    return "unseen values" if row["open_value"] else "closed-set values"
