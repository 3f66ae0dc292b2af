"""benchmarks/judge.py: the evaluation it runs reproduces the previous run's documents, and --dry-run runs
and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import load_benchmark

judge = load_benchmark("judge")

PREVIOUS = {"config": {"docs": {"facts": 3, "conversation": 1, "tool": 2}, "needle_tokens": [512, 9000],
                       "distill_docs": 1, "recall_chunks": 3}}


def _state_run(tmp_path: Path) -> Path:
    (tmp_path / "run" / "state").mkdir(parents=True)
    previous = tmp_path / "eval.json"
    previous.write_text(json.dumps(PREVIOUS))
    return tmp_path / "run"


def test_eval_step_repeats_the_previous_documents_and_reuses_its_baselines(tmp_path: Path) -> None:
    steps = dict(judge.plan(tmp_path / "run", PREVIOUS, tmp_path / "prev.json", "row", tmp_path / "out", 2, [1, 3]))
    assert list(steps) == ["export", "eval", "compare", "ablation-row", "compaction"]
    eval_args = steps["eval"]
    assert eval_args[eval_args.index("--docs") + 1] == "facts=3,conversation=1,tool=2"
    assert eval_args[eval_args.index("--needle-tokens") + 1:][:2] == ["512", "9000"]
    assert eval_args[eval_args.index("--distill-docs") + 1] == "1"
    assert eval_args[eval_args.index("--recall-chunks") + 1] == "3"
    assert eval_args[eval_args.index("--reuse-baselines") + 1] == str(tmp_path / "prev.json")
    assert steps["compare"][-2:] == [str(tmp_path / "prev.json"), str(tmp_path / "out" / "eval" / "eval.json")]
    assert str(tmp_path / "out" / "hypernet") in steps["compaction"]


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _state_run(tmp_path)
    out = tmp_path / "judged"
    status = judge.main([str(run), "--name", "row", "--out", str(out), "--previous", str(tmp_path / "eval.json"),
                         "--dry-run"])
    assert status == 0
    assert not out.exists()
    printed = capsys.readouterr().out
    assert [line.split("]")[0] for line in printed.splitlines()] == [
        "[export", "[eval", "[compare", "[ablation-row", "[compaction"]


def test_a_run_without_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        judge.main([str(tmp_path), "--name", "row", "--out", str(tmp_path / "o"), "--dry-run"])
