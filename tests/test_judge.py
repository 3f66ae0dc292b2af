"""benchmarks/judge.py: the evaluation it runs reproduces the previous run's documents, and --dry-run runs
and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import load_benchmark

judge = load_benchmark("judge")

PREVIOUS = {"config": {"docs": {"facts": 3, "conversation": 1, "tool": 2}, "needle_tokens": [512, 9000],
                       "distill_docs": 1, "recall_chunks": 3}, "rows": []}
WIDE = {"config": {"docs": {"facts": 30}, "needle_tokens": [512], "distill_docs": 2, "recall_chunks": 2,
                   "modes": ["none", "in_context", "adapter", "wrong_adapter"]}, "rows": []}
SEED2 = {"config": {"seed": 2, "docs": {"facts": 30}, "needle_tokens": [512], "distill_docs": 2, "recall_chunks": 2,
                    "modes": ["none", "in_context", "adapter", "wrong_adapter"]}, "rows": []}
STEPS = ["export", "eval", "compare", "wide-eval", "wide-compare", "seed2-eval", "seed2-compare", "ablation-row",
         "compaction"]


def _state_run(tmp_path: Path) -> Path:
    (tmp_path / "run" / "state").mkdir(parents=True)
    (tmp_path / "eval.json").write_text(json.dumps(PREVIOUS))
    (tmp_path / "wide.json").write_text(json.dumps(WIDE))
    (tmp_path / "seed2.json").write_text(json.dumps(SEED2))
    return tmp_path / "run"


def _references(tmp_path: Path) -> judge.References:
    return judge.References(judge.Reference(PREVIOUS, tmp_path / "prev.json"),
                            judge.Reference(WIDE, tmp_path / "prev-wide.json"),
                            judge.Reference(SEED2, tmp_path / "prev-seed2.json"))


def _previous_args(tmp_path: Path) -> list[str]:
    return ["--previous", str(tmp_path / "eval.json"), "--previous-wide", str(tmp_path / "wide.json"),
            "--previous-seed2", str(tmp_path / "seed2.json")]


def test_eval_step_repeats_the_previous_documents_and_reuses_its_baselines(tmp_path: Path) -> None:
    steps = dict(judge.plan(tmp_path / "run", _references(tmp_path), "row", tmp_path / "out", 2, [1, 3]))
    assert list(steps) == STEPS
    eval_args = steps["eval"]
    assert eval_args[eval_args.index("--seed") + 1] == "0"  # recorded before seeds were: the default
    assert eval_args[eval_args.index("--docs") + 1] == "facts=3,conversation=1,tool=2"
    assert eval_args[eval_args.index("--needle-tokens") + 1:][:2] == ["512", "9000"]
    assert eval_args[eval_args.index("--distill-docs") + 1] == "1"
    assert eval_args[eval_args.index("--recall-chunks") + 1] == "3"
    assert "--modes" not in eval_args  # recorded before modes were: all of them, the default
    assert eval_args[eval_args.index("--reuse-baselines") + 1] == str(tmp_path / "prev.json")
    assert steps["compare"][-2:] == [str(tmp_path / "prev.json"), str(tmp_path / "out" / "eval" / "eval.json")]
    assert str(tmp_path / "out" / "hypernet") in steps["compaction"]


def test_wide_step_repeats_the_wide_sets_documents_and_modes(tmp_path: Path) -> None:
    steps = dict(judge.plan(tmp_path / "run", _references(tmp_path), "row", tmp_path / "out", 2, [1, 3]))
    wide = steps["wide-eval"]
    assert wide[wide.index("--docs") + 1] == "facts=30"
    assert wide[wide.index("--modes") + 1:][:4] == ["none", "in_context", "adapter", "wrong_adapter"]
    assert wide[wide.index("--reuse-baselines") + 1] == str(tmp_path / "prev-wide.json")
    assert wide[wide.index("--out") + 1] == str(tmp_path / "out" / "wide-eval")
    assert steps["wide-compare"][-2:] == [str(tmp_path / "prev-wide.json"),
                                          str(tmp_path / "out" / "wide-eval" / "eval.json")]


def test_seed2_step_draws_the_documents_of_its_recorded_seed(tmp_path: Path) -> None:
    steps = dict(judge.plan(tmp_path / "run", _references(tmp_path), "row", tmp_path / "out", 2, [1, 3]))
    fresh = steps["seed2-eval"]
    assert fresh[fresh.index("--seed") + 1] == "2"
    assert fresh[fresh.index("--reuse-baselines") + 1] == str(tmp_path / "prev-seed2.json")
    assert fresh[fresh.index("--out") + 1] == str(tmp_path / "out" / "seed2-eval")
    assert steps["seed2-compare"][-2:] == [str(tmp_path / "prev-seed2.json"),
                                           str(tmp_path / "out" / "seed2-eval" / "eval.json")]


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _state_run(tmp_path)
    out = tmp_path / "judged"
    status = judge.main([str(run), "--name", "row", "--out", str(out), *_previous_args(tmp_path), "--dry-run"])
    assert status == 0
    assert not out.exists()
    printed = capsys.readouterr().out
    assert [line.split("]")[0] for line in printed.splitlines()] == [f"[{label}" for label in STEPS]


def test_a_run_without_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        judge.main([str(tmp_path), "--name", "row", "--out", str(tmp_path / "o"), "--dry-run"])


def test_a_previous_file_that_is_not_an_evaluation_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _state_run(tmp_path)
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(SystemExit):
        judge.main([str(run), "--name", "row", "--out", str(tmp_path / "o"), "--previous", str(junk), "--dry-run"])
    assert "not an eval.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        judge.main([str(run), "--name", "row", "--out", str(tmp_path / "o"), "--previous", str(tmp_path / "eval.json"),
                    "--previous-wide", str(tmp_path / "missing.json"), "--dry-run"])
    assert "missing.json: not a readable eval.json" in capsys.readouterr().err


class _FakeRun:
    """Stands in for subprocess.run: records each step and writes its output into the step's log."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing = failing
        self.seen: list[str] = []

    def __call__(self, command: list[str], cwd: Path, stdout, stderr) -> object:  # noqa: ANN001 - a log file
        step = command[3] if command[1:3] == ["-m", "d2l_memory.cli"] else Path(command[1]).stem
        self.seen.append(step)
        stdout.write(f"output of {step}\n")
        return type("Done", (), {"returncode": 3 if step == self.failing else 0})()


def test_steps_run_in_order_with_a_log_each_and_the_comparison_is_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _state_run(tmp_path)
    fake = _FakeRun()
    monkeypatch.setattr(judge.subprocess, "run", fake)
    out = tmp_path / "judged"
    assert judge.main([str(run), "--name", "row", "--out", str(out), *_previous_args(tmp_path)]) == 0
    assert fake.seen == ["export-checkpoint", *["eval", "eval-compare"] * 3, "ablate", "compaction"]
    assert (out / "eval.log").read_text() == "output of eval\n"
    record = json.loads((out / "judge.json").read_text())  # what benchmarks/publish.py renders from
    assert record["command"].startswith("python benchmarks/judge.py ") and str(out) in record["command"]
    shown = {step["label"]: step["command"] for step in record["steps"]}
    assert shown["export"] == f"d2l-memory export-checkpoint {run} {out / 'hypernet'}"
    assert shown["ablation-row"].startswith("python benchmarks/ablate.py configs/ablations.json --score-run ")
    assert [step["status"] for step in record["steps"]] == [0] * len(STEPS)
    assert json.loads((out / "previous-eval.json").read_text()) == PREVIOUS
    assert json.loads((out / "previous-wide-eval.json").read_text()) == WIDE
    assert json.loads((out / "previous-seed2-eval.json").read_text()) == SEED2
    printed = capsys.readouterr().out
    for label in ("compare", "wide-compare", "seed2-compare"):
        assert f"[{label}]\noutput of eval-compare" in printed


def test_a_failing_step_stops_the_judgement_with_its_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _state_run(tmp_path)
    fake = _FakeRun(failing="eval")
    monkeypatch.setattr(judge.subprocess, "run", fake)
    status = judge.main([str(run), "--name", "row", "--out", str(tmp_path / "o"), *_previous_args(tmp_path)])
    assert status == 3
    assert fake.seen == ["export-checkpoint", "eval"]
    record = json.loads((tmp_path / "o" / "judge.json").read_text())
    assert [(step["label"], step["status"]) for step in record["steps"]] == [("export", 0), ("eval", 3)]
