"""Evaluation results → markdown tables, a plot, and a verdict against the issue's targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from d2l_memory.reporting import command_line, save_figure

SHORT_MODES = ("none", "in_context", "rag", "adapter", "adapter_recall", "hybrid", "wrong_adapter")
NEEDLE_MODES = ("none", "in_context", "rag", "adapter", "adapter_recall", "hybrid")
TITLE = "Hypernetwork evaluation (held-out documents)"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _get(summary: dict[str, Any], mode: str, table: str, key: str, metric: str = "contains") -> float | None:
    cell = summary.get(mode, {}).get(table, {}).get(key)
    return None if cell is None else cell[metric]


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def _reaches(value: float, floor: float) -> bool:
    """``value >= floor`` for accuracies that are ratios of counts: 40/95 - 2/95 is 0.39999999999999997
    in floats, and an exact 40-point margin must meet a 40-point floor."""
    return value >= floor - 1e-9


def chunking_words(chunking: dict[str, int] | None) -> str:
    """How the result's documents were cut into chunks, as a phrase."""
    if chunking is None:  # results written before the chunking was recorded: consecutive 512-token cuts
        return "fixed 512-token chunks"
    cap, low, pieces = chunking["chunk_tokens"], chunking["min_chunk_tokens"], chunking["short_document_chunks"]
    if low >= cap:  # as few chunks as fit, evened out (not consecutive cuts with a short remainder)
        return f"documents cut into as few even chunks of at most {cap} tokens as hold them"
    return (f"documents cut into even chunks of at most {low} tokens, up to {pieces} of them, longer documents "
            f"into {pieces} or more chunks of at most {cap} tokens")


def markdown(result: dict[str, Any], command: str, provenance: str = "", title: str = TITLE) -> str:
    s = result["summary"]
    lines = [
        f"## {title}",
        "",
        command_line(command, provenance),
        f"Hypernetwork `{result['hypernet']}` (trained: {result['hypernet_trained']}), "
        f"base model `{result['base_model']}`; {chunking_words(result.get('chunking'))}; "
        f"{result['n_docs']} documents, {result['n_questions']} questions, {result['total_seconds'] / 60:.1f} min. "
        "Greedy answers scored by normalised contains-match (exact match and token F1 in the JSON).",
        "",
    ]
    if result.get("reused"):
        lines += [
            f"Rows {', '.join(result['reused']['modes'])} are reused from an earlier run on the same documents, "
            f"questions and settings (hypernetwork `{result['reused']['hypernet']}`): they do not depend on the "
            "hypernetwork; "
            "the minutes above are this run's alone.",
            "",
        ]
    lines += [
        "| mode | short docs | facts | facts: closed-set values | facts: unseen values | conversations | tool docs |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in SHORT_MODES:
        if mode not in s:
            continue
        lines.append(
            f"| {mode} | {_pct(_get(s, mode, 'short_docs', 'all'))} | {_pct(_get(s, mode, 'by_domain', 'facts'))} "
            f"| {_pct(_get(s, mode, 'facts_by_value', 'closed-set values'))} "
            f"| {_pct(_get(s, mode, 'facts_by_value', 'unseen values'))} "
            f"| {_pct(_get(s, mode, 'by_domain', 'conversation'))} "
            f"| {_pct(_get(s, mode, 'by_domain', 'tool'))} |"
        )
    lines += _wrong_answer_table(s)
    lengths = sorted({k for m in NEEDLE_MODES for k in s.get(m, {}).get("needle_by_length", {})}, key=int)
    if lengths:
        lines += ["", "Needle in a haystack (essays; contains-match by the length in tokens each document was cut to, "
                  "three depths each):", "",
                  "| mode | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        for mode in NEEDLE_MODES:
            if mode in s:
                cells = [_pct(_get(s, mode, "needle_by_length", n)) for n in lengths]
                lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if "distill" in s:
        sub = {m: _get(s, m, "distill_subset", "subset") for m in ("none", "in_context", "adapter", "distill")}
        n_subset = s["distill"]["distill_subset"].get("subset", {}).get("n", 0)
        lines += ["", f"Context-distillation subset ({n_subset} questions): "
                  + ", ".join(f"{m} {_pct(v)}" for m, v in sub.items())]
    if "adapter_recall" in s:
        lines += ["", f"adapter_recall: the {result['config'].get('recall_chunks')} chunk adapters recall picks "
                  "for the question (BM25 on chunk text), only on documents cut into more chunks than that; "
                  "n/a elsewhere, where it would be the adapter row."]
    lines += ["", *verdict(s)]
    return "\n".join(lines)


def _wrong_answer_table(s: dict[str, Any]) -> list[str]:
    domains = ("facts", "conversation", "tool")
    modes = [m for m in SHORT_MODES if s.get(m, {}).get("wrong_answers")]
    if not modes:
        return []
    lines = ["", "Wrong answers that state another fact of the same document (the answer to another question "
             "about it) / all wrong answers, short documents: the rest hold a value the document does not.", "",
             "| mode | facts | conversations | tool docs |", "|---|---|---|---|"]
    for mode in modes:
        cells = [s[mode]["wrong_answers"].get(d) for d in domains]
        lines.append(f"| {mode} | " + " | ".join("n/a" if c is None else f"{c['other_fact']} / {c['wrong']}"
                                                   for c in cells) + " |")
    return lines


def verdict(s: dict[str, Any]) -> list[str]:
    # The floor is stated on held-out fact documents; conversations and tools are reported above.
    adapter, icl = _get(s, "adapter", "by_domain", "facts"), _get(s, "in_context", "by_domain", "facts")
    unseen_a = _get(s, "adapter", "facts_by_value", "unseen values")
    unseen_i = _get(s, "in_context", "facts_by_value", "unseen values")
    none, wrong = _get(s, "none", "by_domain", "facts"), _get(s, "wrong_adapter", "by_domain", "facts")
    window = 8192
    beyond = [k for k in s.get("adapter", {}).get("needle_by_length", {}) if int(k) > window]
    needle_n = [_get(s, "none", "needle_by_length", k) or 0.0 for k in beyond]
    checks = [
        ("adapter ≥ 75% of in-context (fact documents)", _ratio(adapter, icl),
         adapter is not None and icl and _reaches(adapter / icl, 0.75)),
        ("adapter ≥ 60% of in-context on unseen fact values", _ratio(unseen_a, unseen_i),
         unseen_a is not None and unseen_i and _reaches(unseen_a / unseen_i, 0.60)),
        ("adapter beats no context by ≥ 40 points", f"{100 * ((adapter or 0) - (none or 0)):+.1f} pts",
         adapter is not None and none is not None and _reaches(adapter - none, 0.40)),
        ("adapter beats the wrong-document control by ≥ 40 points", f"{100 * ((adapter or 0) - (wrong or 0)):+.1f} pts",
         adapter is not None and wrong is not None and _reaches(adapter - wrong, 0.40)),
    ]
    n = sum(needle_n) / len(needle_n) if beyond else 0.0
    for mode, label in (("adapter", "all chunk adapters"), ("adapter_recall", "recall-picked chunk adapters")):
        found = [_get(s, mode, "needle_by_length", k) for k in beyond]
        if found and all(v is not None for v in found):
            a = sum(found) / len(found)  # type: ignore[arg-type]
            checks.append((f"needle found ≥ 50% beyond the {window // 1024}K window (in-context cannot run), {label}",
                           f"{mode} {100 * a:.0f}% vs none {100 * n:.0f}%", _reaches(a, 0.5) and a > n))
    out = ["| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {name} | {value} | {'met' if ok else 'MISSED'} |" for name, value, ok in checks]
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    groups = [("short docs", "short_docs", "all"), ("facts closed", "facts_by_value", "closed-set values"),
              ("facts unseen", "facts_by_value", "unseen values"), ("conversation", "by_domain", "conversation"),
              ("tool", "by_domain", "tool")]
    modes = [m for m in SHORT_MODES if m in s]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        values = [100 * (_get(s, mode, t, k) or 0) for _, t, k in groups]
        left.bar([i + j * width for i in range(len(groups))], values, width, label=mode)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [g[0] for g in groups])
    left.set_ylabel("contains-match accuracy (%)")
    left.set_title("Held-out documents")
    left.legend(fontsize=8)
    for mode in NEEDLE_MODES:
        table = s.get(mode, {}).get("needle_by_length", {})
        if table:
            xs = sorted(table, key=int)
            right.plot([int(x) for x in xs], [100 * table[x]["contains"] for x in xs], marker="o", label=mode)
    right.axvline(8192, color="grey", linestyle="--", linewidth=1)
    right.text(8192, 2, " 8K window", color="grey")
    right.set_xscale("log", base=2)
    right.set_xlabel("needle document length (tokens)")
    right.set_title("Needle in a haystack")
    right.legend(fontsize=8)
    return save_figure(fig, path)
