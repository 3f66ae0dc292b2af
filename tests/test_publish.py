"""benchmarks/publish.py: BENCHMARKS.md's result sections come only from a complete judge run whose checkpoint
is byte for byte the shipped one, and name the commands that measured them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bench_modules import BENCHMARKS, load_benchmark

publish = load_benchmark("publish")

COMMITTED = BENCHMARKS / "results"  # real result files serve as the judged run's output
EVAL_COMMAND = "d2l-memory eval --hypernet /tmp/j/hypernet --out /tmp/j/eval"
WIDE_COMMAND = "d2l-memory eval --hypernet /tmp/j/hypernet --docs facts=120 --out /tmp/j/wide-eval"
SEED2_COMMAND = "d2l-memory eval --hypernet /tmp/j/hypernet --seed 2 --docs facts=120 --out /tmp/j/seed2-eval"
COMPACTION_COMMAND = "python benchmarks/compaction.py --hypernet /tmp/j/hypernet --out /tmp/j/compaction"
JUDGE_COMMAND = "python benchmarks/judge.py runs/r --name row --out /tmp/j"


def _judged(tmp_path: Path, failing: str | None = None) -> tuple[Path, Path, Path]:
    """A judged-run folder, a shipped checkpoint equal to its hypernet/, and a repository to write into."""
    judged = tmp_path / "judged"
    for sub in ("hypernet", "eval", "wide-eval", "seed2-eval", "compaction"):
        (judged / sub).mkdir(parents=True)
    meta = {"weights_sha256": "ab", "config": {"width": 8}, "training": {"step": 9, "command": "export to judged"}}
    (judged / "hypernet" / "hypernet.json").write_text(json.dumps(meta))
    (judged / "hypernet" / "hypernet.safetensors").write_bytes(bytes(range(256)))
    shutil.copyfile(COMMITTED / "eval.json", judged / "eval" / "eval.json")
    shutil.copyfile(COMMITTED / "eval-facts-wide.json", judged / "wide-eval" / "eval.json")
    shutil.copyfile(COMMITTED / "eval-facts-seed2.json", judged / "seed2-eval" / "eval.json")
    shutil.copyfile(COMMITTED / "compaction.json", judged / "compaction" / "compaction.json")
    commands = {"eval": EVAL_COMMAND, "wide-eval": WIDE_COMMAND, "seed2-eval": SEED2_COMMAND,
                "compaction": COMPACTION_COMMAND}
    steps = [{"label": label, "command": commands.get(label, f"d2l-memory {label}"), "seconds": 1.0,
              "status": 2 if label == failing else 0} for label in publish.JUDGED_STEPS]
    (judged / "judge.json").write_text(json.dumps({"command": JUDGE_COMMAND, "steps": steps}))
    shipped = tmp_path / "shipped"  # exported again, into the package, with its training plot
    shutil.copytree(judged / "hypernet", shipped)
    meta["training"]["command"] = "export to the package --plot"
    (shipped / "hypernet.json").write_text(json.dumps(meta))
    (shipped / "training.png").write_bytes(b"png")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "BENCHMARKS.md").write_text(
        "# Benchmarks\n\n<!-- BEGIN eval -->\nold eval\n<!-- END eval -->\n\nnotes by hand\n\n"
        "<!-- BEGIN eval-wide -->\nold wide\n<!-- END eval-wide -->\n\n"
        "<!-- BEGIN eval-seed2 -->\nold seed2\n<!-- END eval-seed2 -->\n\n"
        "<!-- BEGIN compaction -->\nold compaction\n<!-- END compaction -->\n")
    return judged, shipped, repo


@pytest.fixture
def ablations(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stands in for `ablate.py --report --benchmarks` (it needs the real repository's spec and results)."""
    calls: list[Path] = []
    monkeypatch.setattr(publish, "publish_ablations", lambda repo: calls.append(repo) or 0)
    return calls


def _args(judged: Path, shipped: Path, repo: Path) -> list[str]:
    return [str(judged), "--shipped", str(shipped), "--repo", str(repo)]


def test_sections_and_result_files_come_from_the_judged_run(tmp_path: Path, ablations: list[Path]) -> None:
    judged, shipped, repo = _judged(tmp_path)
    assert publish.main(_args(judged, shipped, repo)) == 0
    text = (repo / "BENCHMARKS.md").read_text()
    assert not any(old in text for old in ("old eval", "old compaction", "old wide", "old seed2"))
    assert "notes by hand" in text
    assert f"Command: `{EVAL_COMMAND}` (run by `{JUDGE_COMMAND}`; `{judged.as_posix()}/hypernet`: the shipped" in text
    assert f"Command: `{WIDE_COMMAND}` (run by `{JUDGE_COMMAND}`;" in text
    assert text.index(WIDE_COMMAND) < text.index("<!-- END eval-wide -->")
    assert text.index("<!-- BEGIN eval-seed2 -->") < text.index(SEED2_COMMAND) < text.index("<!-- END eval-seed2 -->")
    assert f"Command: `{COMPACTION_COMMAND}` (run by `{JUDGE_COMMAND}`;" in text
    eval_json = json.loads((COMMITTED / "eval.json").read_text())
    assert f"Hypernetwork `{eval_json['hypernet']}`" in text
    results = repo / "benchmarks" / "results"
    assert (results / "eval.json").read_bytes() == (judged / "eval" / "eval.json").read_bytes()
    assert (results / "compaction.json").read_bytes() == (judged / "compaction" / "compaction.json").read_bytes()
    assert (results / "eval-facts-wide.json").read_bytes() == (judged / "wide-eval" / "eval.json").read_bytes()
    assert (results / "eval-facts-wide.md").read_text().startswith("## Hypernetwork evaluation, wide fact set")
    assert (results / "eval-facts-seed2.json").read_bytes() == (judged / "seed2-eval" / "eval.json").read_bytes()
    assert (results / "eval-facts-seed2.md").read_text().startswith("## Hypernetwork evaluation, fresh fact set")
    assert not (results / "eval-facts-wide.png").exists()
    assert (results / "eval.png").stat().st_size > 0
    assert (results / "eval.md").read_text().startswith("## Hypernetwork evaluation")
    assert ablations == [repo]


@pytest.mark.parametrize("change", ["weights", "metadata"])
def test_a_checkpoint_that_is_not_the_shipped_one_is_refused(
    tmp_path: Path, ablations: list[Path], capsys: pytest.CaptureFixture[str], change: str
) -> None:
    judged, shipped, repo = _judged(tmp_path)
    if change == "weights":
        weights = shipped / "hypernet.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    else:
        meta = json.loads((shipped / "hypernet.json").read_text())
        meta["training"]["step"] = 10
        (shipped / "hypernet.json").write_text(json.dumps(meta))
    before = (repo / "BENCHMARKS.md").read_text()
    with pytest.raises(SystemExit):
        publish.main(_args(judged, shipped, repo))
    assert "not byte for byte the shipped checkpoint" in capsys.readouterr().err
    assert (repo / "BENCHMARKS.md").read_text() == before
    assert not list((repo / "benchmarks" / "results").iterdir()) and ablations == []


def test_an_incomplete_judge_run_is_refused(
    tmp_path: Path, ablations: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    judged, shipped, repo = _judged(tmp_path, failing="compaction")
    with pytest.raises(SystemExit):
        publish.main(_args(judged, shipped, repo))
    assert "failed ['compaction']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        publish.main(_args(tmp_path / "repo", shipped, repo))  # not a judge output folder at all
    assert "judge.json is missing" in capsys.readouterr().err
    (judged / "judge.json").write_text('{"steps": [{"status": 0}]}')  # no labels, no command
    with pytest.raises(SystemExit):
        publish.main(_args(judged, shipped, repo))
    assert "is not a record written by benchmarks/judge.py" in capsys.readouterr().err
