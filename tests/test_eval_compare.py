from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from d2l_memory.cli import main
from d2l_memory.errors import IncomparableEvaluationError
from d2l_memory.evaluation.compare import compare, sign_test_p


def _row(
    mode: str, doc: str, question: str, right: bool, domain: str = "facts", open_value: bool = True
) -> dict[str, Any]:
    return {"mode": mode, "doc": doc, "question": question, "tokens": 100, "domain": domain,
            "open_value": open_value, "contains": right, "exact": right}  # fmt: skip


def _result(hypernet: str, answers: dict[tuple[str, str], bool], base_model: str = "base") -> dict[str, Any]:
    rows = [_row("adapter", doc, q, right, open_value=q.startswith("open")) for (doc, q), right in answers.items()]
    rows += [_row("none", doc, q, False) for doc, q in answers]  # hypernetwork-free: never compared
    return {"base_model": base_model, "hypernet": hypernet, "rows": rows}


QUESTIONS = [("d1", "open 1"), ("d1", "open 2"), ("d2", "open 3"), ("d2", "closed 1"), ("d3", "closed 2")]


def test_sign_test_matches_the_binomial_tail() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(1, 5) == pytest.approx(2 * 7 / 64)  # C(6,0) + C(6,1) of 2^6, both tails
    assert sign_test_p(40, 10) < 1e-4


def test_flips_are_counted_per_slice() -> None:
    before = _result("old", dict(zip(QUESTIONS, [True, False, False, True, False], strict=True)))
    after = _result("new", dict(zip(QUESTIONS, [False, True, True, True, True], strict=True)))
    deltas = {d.slice: d for d in compare(before, after)}
    assert {d.mode for d in compare(before, after)} == {"adapter"}
    facts, unseen, closed = deltas["facts"], deltas["facts: unseen values"], deltas["facts: closed-set values"]
    assert (facts.n, facts.before, facts.after, facts.gained, facts.lost) == (5, 0.4, 0.8, 3, 1)
    assert (unseen.n, unseen.gained, unseen.lost) == (3, 2, 1)
    assert (closed.n, closed.gained, closed.lost, closed.points) == (2, 1, 0, pytest.approx(50.0))
    assert facts.p_value == pytest.approx(sign_test_p(3, 1))
    assert "conversations" not in deltas  # no such questions: no row


def test_recall_rows_pair_across_chunkings_with_the_adapter_rows_filling_in() -> None:
    # Before: only d3 had more chunks than the recall budget, so recall ran on it alone (elsewhere the
    # provider applies every chunk: the adapter answer). After: cut finer, recall also ran on d1.
    before = _result("old", dict.fromkeys(QUESTIONS[:3], False) | {("d3", "closed 2"): False})
    after = _result("new", dict.fromkeys(QUESTIONS[:3], True) | {("d3", "closed 2"): False})
    before["rows"] += [_row("adapter_recall", "d3", "closed 2", True, open_value=False)]
    after["rows"] += [_row("adapter_recall", "d3", "closed 2", True, open_value=False),
                      _row("adapter_recall", "d1", "open 1", True), _row("adapter_recall", "d1", "open 2", False)]
    (facts,) = [d for d in compare(before, after) if d.mode == "adapter_recall" and d.slice == "facts"]
    assert (facts.n, facts.gained, facts.lost) == (4, 2, 0)  # open 1 by recall, open 3 by the adapter row


def test_results_that_cannot_be_paired_are_refused() -> None:
    before = _result("old", dict.fromkeys(QUESTIONS, True))
    with pytest.raises(IncomparableEvaluationError, match="different questions"):
        compare(before, _result("new", dict.fromkeys(QUESTIONS[:-1], True)))
    with pytest.raises(IncomparableEvaluationError, match="base models"):
        compare(before, _result("new", dict.fromkeys(QUESTIONS, True), base_model="other"))
    with pytest.raises(ValueError, match="right/wrong"):
        compare(before, before, metric="f1")


def test_cli_prints_the_paired_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, junk = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "junk.json"
    a.write_text(json.dumps(_result("old", dict.fromkeys(QUESTIONS, False))))
    b.write_text(json.dumps(_result("new", dict.fromkeys(QUESTIONS, True))))
    junk.write_bytes(b"\x00\xff not json")
    assert main(["eval-compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "`old` → `new`" in out and "| adapter | facts | 5 | 0.0% | 100.0% | +100.0 pts | 5 | 0 | 0.062 |" in out
    assert main(["eval-compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gained"] == 5
    assert main(["eval-compare", str(a), str(junk)]) == 2
    assert "not a readable eval.json" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_result("old", dict.fromkeys(QUESTIONS, False))))
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited
    try:
        done = subprocess.run([sys.executable, "-m", "d2l_memory.cli", "eval-compare", str(a), str(a)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr
