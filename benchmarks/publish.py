"""Render BENCHMARKS.md's result sections from a judged run, once its checkpoint has shipped.

``benchmarks/judge.py`` measures a training state; a person decides to ship it and exports it into the
package (``d2l-memory export-checkpoint RUN d2l_memory/checkpoints/...``). This then writes, from the
judged run's own output files and nothing else:

- ``benchmarks/results/eval.{json,md,png}`` and the "eval" section,
- ``benchmarks/results/eval-facts-wide.{json,md}`` and the "eval-wide" section (the wide fact set),
- ``benchmarks/results/eval-facts-seed2.{json,md}`` and the "eval-seed2" section (a fresh draw, seed 2),
- ``benchmarks/results/compaction.json`` and the "compaction" section,
- the "ablations" section (``ablate.py --report --benchmarks``; the judge already scored the row),

each naming the command that measured it and the judge run it came from. It refuses a run whose steps did
not all succeed, or whose checkpoint is not the one in the package (weights byte for byte, metadata but
for the export command): the sections must describe the shipped weights. The hand-written notes beside
them stay a person's job.

    python benchmarks/publish.py /tmp/judge-4600
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import compaction  # the script beside this one: Python puts a script's own folder first on sys.path
from d2l_memory.errors import D2LMemoryError
from d2l_memory.evaluation.report import TITLE as EVAL_TITLE
from d2l_memory.evaluation.report import markdown as eval_markdown
from d2l_memory.evaluation.report import plot as eval_plot
from d2l_memory.evaluation.rows import read_result
from d2l_memory.reporting import replace_section, with_artifacts

REPO = Path(__file__).resolve().parents[1]

SHIPPED = Path("d2l_memory/checkpoints/smollm2-135m-instruct")
JUDGED_STEPS = ("export", "eval", "compare", "wide-eval", "wide-compare", "seed2-eval", "seed2-compare",
                "ablation-row", "compaction")


class NotPublishable(D2LMemoryError):
    """The judged run cannot describe the shipped checkpoint."""


def read_record(judged: Path) -> tuple[str, dict[str, dict]]:
    """The judge's command and its steps by label; every step must have run and succeeded."""
    path = judged / "judge.json"
    if not path.is_file():
        raise NotPublishable(f"{path} is missing: {judged} is not the output folder of benchmarks/judge.py")
    try:
        record = json.loads(path.read_text())
        steps = {step["label"]: step for step in record["steps"]}
        judge_command = record["command"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NotPublishable(f"{path} is not a record written by benchmarks/judge.py ({exc!r})") from exc
    missing = [label for label in JUDGED_STEPS if label not in steps]
    failed = [label for label, step in steps.items() if step["status"] != 0]
    if missing or failed:
        raise NotPublishable(f"{judged}: the judge run is incomplete (missing {missing or 'none'}, failed "
                             f"{failed or 'none'}); run benchmarks/judge.py again")
    return judge_command, steps


def check_same_checkpoint(judged_checkpoint: Path, shipped: Path) -> None:
    """Refuse unless the weights are byte for byte the same and the metadata agrees in everything but the
    export command (which names the folder it exported into)."""
    def metadata(folder: Path) -> dict:
        meta = json.loads((folder / "hypernet.json").read_text())
        meta.get("training", {}).pop("command", None)
        return meta

    for folder in (judged_checkpoint, shipped):
        if not all((folder / name).is_file() for name in ("hypernet.json", "hypernet.safetensors")):
            raise NotPublishable(f"{folder} is not a checkpoint folder (hypernet.json and hypernet.safetensors)")
    same_weights = (judged_checkpoint / "hypernet.safetensors").read_bytes() == (
        shipped / "hypernet.safetensors").read_bytes()
    if not same_weights or metadata(judged_checkpoint) != metadata(shipped):
        raise NotPublishable(f"{judged_checkpoint} is not byte for byte the shipped checkpoint {shipped}: ship it "
                             f"first (d2l-memory export-checkpoint RUN {shipped}) or judge the shipped state")


def provenance(judge_command: str, judged: Path, written: str) -> str:
    return (f"(run by `{judge_command}`; `{judged.as_posix()}/hypernet`: the shipped checkpoint, byte for byte; "
            f"this section and {written} were written from that run's output)")


@dataclass(frozen=True)
class EvalSection:
    """Where one of the judge's evaluations goes: its output folder, result files' stem, section, title, plot."""

    folder: str
    stem: str
    section: str
    title: str
    plotted: bool


EVAL_SECTIONS = (
    EvalSection("eval", "eval", "eval", EVAL_TITLE, plotted=True),
    # Fact documents only: the plot's conversation and tool bars would be empty.
    EvalSection("wide-eval", "eval-facts-wide", "eval-wide",
                "Hypernetwork evaluation, wide fact set (held-out fact documents)", plotted=False),
    EvalSection("seed2-eval", "eval-facts-seed2", "eval-seed2",
                "Hypernetwork evaluation, fresh fact set (held-out fact documents of seed 2)", plotted=False),
)


def publish_eval(judged: Path, where: EvalSection, command: str, judge_command: str, repo: Path) -> None:
    written = f"`benchmarks/results/{where.stem}.*`"
    write_eval_section(judged / where.folder / "eval.json", where, command,
                       provenance(judge_command, judged, written), repo)


def write_eval_section(source: Path, where: EvalSection, command: str, origin: str, repo: Path) -> None:
    """Copy an ``eval.json`` into ``benchmarks/results/`` and render its markdown (and plot) there and into
    its BENCHMARKS.md section; ``origin`` says, after the command, where the run came from."""
    result = read_result(source)
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, results / f"{where.stem}.json")
    relative = Path("benchmarks/results")
    image = None
    if where.plotted:
        eval_plot(result, results / f"{where.stem}.png")
        image = ("evaluation", relative / f"{where.stem}.png")
    text = with_artifacts(eval_markdown(result, command, origin, where.title), relative / f"{where.stem}.json", image)
    (results / f"{where.stem}.md").write_text(text + "\n")
    replace_section(repo / "BENCHMARKS.md", where.section, text)


def publish_compaction(judged: Path, command: str, judge_command: str, repo: Path) -> None:
    source = judged / "compaction" / "compaction.json"
    result = json.loads(source.read_text())
    raw = Path("benchmarks/results/compaction.json")
    shutil.copyfile(source, repo / raw)
    text = compaction.markdown(result, command, provenance(judge_command, judged, f"`{raw.as_posix()}`"))
    replace_section(repo / "BENCHMARKS.md", "compaction", with_artifacts(text, raw))


def publish_ablations(repo: Path) -> int:
    command = [sys.executable, "benchmarks/ablate.py", "configs/ablations.json", "--report", "--benchmarks"]
    return subprocess.run(command, cwd=repo, stdout=subprocess.DEVNULL).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("judged", type=Path, help="the --out folder of a finished benchmarks/judge.py run")
    parser.add_argument("--shipped", type=Path, default=REPO / SHIPPED, help="the packaged checkpoint folder")
    parser.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)  # tests write elsewhere
    args = parser.parse_args(argv)
    try:
        judge_command, steps = read_record(args.judged)
        check_same_checkpoint(args.judged / "hypernet", args.shipped)
        for where in EVAL_SECTIONS:
            publish_eval(args.judged, where, steps[where.folder]["command"], judge_command, args.repo)
        publish_compaction(args.judged, steps["compaction"]["command"], judge_command, args.repo)
    except D2LMemoryError as exc:
        parser.error(str(exc))
    status = publish_ablations(args.repo)
    if status != 0:
        print(f"ablate.py --report failed with status {status}; the eval, eval-wide, eval-seed2 and compaction "
              "sections are written", file=sys.stderr)
        return status
    print("Wrote the eval, eval-wide, eval-seed2, compaction and ablations sections and benchmarks/results/. By "
          "hand: the notes sections (training, eval, ablation, compaction, perf), README's Status and "
          "training-runs/README.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
