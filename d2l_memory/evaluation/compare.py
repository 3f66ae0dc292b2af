"""Two evaluations of the same questions, paired: which answers changed, and could the change be chance?

Checkpoints are compared on a few dozen held-out documents, where one question moves a rate by about one
point. Reading two summary tables side by side hides how many answers actually flipped; pairing the rows
question by question and applying an exact two-sided sign test to the flips says whether a difference is
more than noise. The decision to ship a checkpoint uses this (``d2l-memory eval-compare``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from d2l_memory.errors import IncomparableEvaluationError
from d2l_memory.evaluation.rows import (
    HYPERNET_MODES,
    Row,
    RowKey,
    is_short_doc,
    provider_recall_rows,
    row_key,
    value_set,
)

SCORED_METRICS = ("contains", "exact")

SLICES: tuple[tuple[str, Callable[[Row], bool]], ...] = (
    ("short docs", is_short_doc),
    ("facts", lambda r: r["domain"] == "facts"),
    ("facts: closed-set values", lambda r: r["domain"] == "facts" and value_set(r) == "closed-set values"),
    ("facts: unseen values", lambda r: r["domain"] == "facts" and value_set(r) == "unseen values"),
    ("conversations", lambda r: r["domain"] == "conversation"),
    ("tool docs", lambda r: r["domain"] == "tool"),
    ("needles", lambda r: not is_short_doc(r)),
)


@dataclass(frozen=True)
class PairedDelta:
    """One mode on one slice of questions, before and after."""

    mode: str
    slice: str
    n: int
    before: float
    after: float
    gained: int  # wrong before, right after
    lost: int  # right before, wrong after
    p_value: float  # exact two-sided sign test on the gained/lost flips

    @property
    def points(self) -> float:
        return 100 * (self.after - self.before)


def sign_test_p(gained: int, lost: int) -> float:
    """P(a split of the flips at least this uneven | each flip is a fair coin), two-sided and exact."""
    flips = gained + lost
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, i) for i in range(min(gained, lost) + 1)) / 2**flips
    return min(1.0, 2 * tail)


def _rows_by_mode(result: dict[str, Any], metric: str) -> dict[str, dict[RowKey, Row]]:
    out: dict[str, dict[RowKey, Row]] = {}
    for row in result.get("rows", []):
        if metric not in row:
            raise IncomparableEvaluationError(f"an evaluation row has no {metric!r} score")
        out.setdefault(row["mode"], {})[row_key(row)] = row
    if "adapter_recall" in out and "adapter" in out:
        out["adapter_recall"] = provider_recall_rows(out["adapter"], out["adapter_recall"])
    return out


def compare(
    before: dict[str, Any], after: dict[str, Any], metric: str = "contains", modes: Sequence[str] = HYPERNET_MODES
) -> list[PairedDelta]:
    """Pair two ``eval.json`` results question by question for each mode both ran; the error says why
    two results cannot be paired (another base model, other documents or questions)."""
    if metric not in SCORED_METRICS:
        raise ValueError(f"metric {metric!r} is not a right/wrong score; choose from {', '.join(SCORED_METRICS)}")
    if before.get("base_model") != after.get("base_model"):
        raise IncomparableEvaluationError(
            f"the evaluations ran on different base models ({before.get('base_model')} vs {after.get('base_model')})")
    old, new = _rows_by_mode(before, metric), _rows_by_mode(after, metric)
    shared = [m for m in modes if m in old and m in new]
    if not shared:
        raise IncomparableEvaluationError(f"the evaluations share none of the modes {', '.join(modes)}")
    deltas: list[PairedDelta] = []
    for mode in shared:
        if old[mode].keys() != new[mode].keys():
            only_old, only_new = len(old[mode].keys() - new[mode].keys()), len(new[mode].keys() - old[mode].keys())
            raise IncomparableEvaluationError(
                f"mode {mode}: the evaluations asked different questions ({only_old} only in the first, "
                f"{only_new} only in the second); run both with the same --docs and --needle-tokens")
        for name, keep in SLICES:
            keys = [k for k, r in old[mode].items() if keep(r)]
            if not keys:
                continue
            was = [bool(old[mode][k][metric]) for k in keys]
            now = [bool(new[mode][k][metric]) for k in keys]
            gained = sum(1 for a, b in zip(was, now, strict=True) if b and not a)
            lost = sum(1 for a, b in zip(was, now, strict=True) if a and not b)
            deltas.append(PairedDelta(mode, name, len(keys), sum(was) / len(keys), sum(now) / len(keys),
                                      gained, lost, sign_test_p(gained, lost)))
    return deltas


def markdown(deltas: Sequence[PairedDelta], before_name: str, after_name: str, metric: str) -> str:
    lines = [
        f"Paired comparison ({metric}-match), `{before_name}` → `{after_name}`: each question answered by both; "
        "gained = wrong before and right after, lost = the reverse; p = exact two-sided sign test on those flips "
        "(small p: unlikely to be noise).",
        "",
        "| mode | slice | questions | before | after | change | gained | lost | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in deltas:
        lines.append(f"| {d.mode} | {d.slice} | {d.n} | {100 * d.before:.1f}% | {100 * d.after:.1f}% "
                     f"| {d.points:+.1f} pts | {d.gained} | {d.lost} | {d.p_value:.2g} |")
    return "\n".join(lines)
