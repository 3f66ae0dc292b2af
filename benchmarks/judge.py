"""Judge a training run's latest state against the shipped checkpoint, in one command.

After a training cycle the same measurements decide whether its checkpoint ships (see
``training-runs/README.md``): the evaluation on the documents of the previous ``eval.json`` (its
hypernetwork-free rows reused) and the paired comparison with that run; the same two on the wide fact
set of ``eval-facts-wide.json`` (478 fact questions, where the main set's 95 cannot tell a 3-point change
from noise) and on the fresh draw of ``eval-facts-seed2.json`` (478 more, of held-out seed 2: a change
that only fits the seed-0 documents shows there); the recipe-ablation score row and the compaction
benchmark. This runs them one after another (never two CPU jobs at once: on a small machine they only
slow each other), each logged to its own file in ``--out``, and stops at the first failure.
``--out``/judge.json records each step's command, status and time. Deciding to ship stays a person's
job; once the checkpoint has shipped, ``benchmarks/publish.py`` renders BENCHMARKS.md's result sections
from this run's output.

    python benchmarks/judge.py runs/smollm2-135m-nokeys --name nokeys-...-step4500 --out /tmp/judge-4500
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2l_memory.errors import D2LMemoryError
from d2l_memory.evaluation.rows import read_result

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "d2l_memory.cli"]
RECORD = "judge.json"
RESULTS = REPO / "benchmarks" / "results"
WIDE_RESULT = "eval-facts-wide.json"  # the shipped checkpoint on the wide fact set
SEED2_RESULT = "eval-facts-seed2.json"  # ... and on a fresh draw of documents (seed 2)


def _from_repo(path: Path) -> Path:
    """``path`` as the steps (run from the repository root) see it: relative inside the repository, so
    that the results name the run as ``runs/...``, not by this machine's absolute path."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved


def eval_settings(previous: dict) -> list[str]:
    """The ``d2l-memory eval`` flags that reproduce the previous run's documents, questions and modes."""
    config = previous["config"]
    docs = ",".join(f"{domain}={n}" for domain, n in config["docs"].items())
    # Results written before the modes were recorded ran them all, which is also the flag's default.
    modes = ["--modes", *config["modes"]] if config.get("modes") else []
    return ["--seed", str(config.get("seed", 0)), "--docs", docs,
            "--needle-tokens", *map(str, config["needle_tokens"]), "--distill-docs", str(config["distill_docs"]),
            "--recall-chunks", str(config["recall_chunks"]), *modes]


@dataclass(frozen=True)
class Reference:
    """An evaluation of the shipped checkpoint to repeat: its result, and the copy of it the steps read."""

    result: dict
    copy: Path


@dataclass(frozen=True)
class References:
    """The shipped checkpoint's evaluations this run is judged against, one per document set."""

    main: Reference
    """``eval.json``: facts, conversations, tool docs, needles (95 fact questions)."""
    wide: Reference
    """``eval-facts-wide.json``: 120 fact documents of seed 0."""
    seed2: Reference
    """``eval-facts-seed2.json``: 120 fact documents of seed 2."""


def eval_steps(prefix: str, hypernet: Path, reference: Reference, out: Path) -> list[tuple[str, list[str]]]:
    """Evaluate ``hypernet`` on ``reference``'s documents (its hypernetwork-free rows reused), then pair the
    two question by question."""
    folder = out / f"{prefix}eval"
    return [
        (f"{prefix}eval", [*CLI, "eval", "--hypernet", str(hypernet), *eval_settings(reference.result),
                           "--reuse-baselines", str(reference.copy), "--out", str(folder)]),
        (f"{prefix}compare", [*CLI, "eval-compare", str(reference.copy), str(folder / "eval.json")]),
    ]


def plan(run_dir: Path, references: References, name: str, out: Path, conversations: int,
         chunks: Sequence[int]) -> list[tuple[str, list[str]]]:
    """The steps, as (label, argv); every one writes only below ``out`` (and the ablation row's folder)."""
    hypernet = out / "hypernet"
    return [
        ("export", [*CLI, "export-checkpoint", str(run_dir), str(hypernet)]),
        *eval_steps("", hypernet, references.main, out),
        *eval_steps("wide-", hypernet, references.wide, out),
        *eval_steps("seed2-", hypernet, references.seed2, out),
        # Scripts are named relative to the repository, where every step runs.
        ("ablation-row", [sys.executable, "benchmarks/ablate.py", "configs/ablations.json",
                          "--score-run", str(run_dir), "--name", name]),
        ("compaction", [sys.executable, "benchmarks/compaction.py", "--conversations", str(conversations),
                        "--chunks", *map(str, chunks), "--hypernet", str(hypernet), "--out", str(out / "compaction")]),
    ]


def shown(command: Sequence[str]) -> str:
    """A step's command as a person would type it: ``d2l-memory ...`` or ``python benchmarks/...``."""
    if list(command[1:3]) == ["-m", "d2l_memory.cli"]:
        return "d2l-memory " + shlex.join(command[3:])
    return "python " + shlex.join(command[1:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run whose state/ is judged")
    parser.add_argument("--name", required=True, help="the ablation table's row name for this state")
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, results and logs")
    parser.add_argument("--previous", type=Path, default=RESULTS / "eval.json",
                        help="eval.json of the shipped checkpoint (default: the committed one)")
    parser.add_argument("--previous-wide", type=Path, default=RESULTS / WIDE_RESULT,
                        help="the shipped checkpoint's eval.json on the wide fact set (default: the committed one)")
    parser.add_argument("--previous-seed2", type=Path, default=RESULTS / SEED2_RESULT,
                        help="the shipped checkpoint's eval.json on the seed-2 fact set (default: the committed one)")
    # 15 conversations (90 questions): on the 30 questions of 5, a 3-question drop could not be told from
    # noise, and on 90 it was real (BENCHMARKS, compaction notes, sixth session of 2026-12-07).
    parser.add_argument("--conversations", type=int, default=15, help="compaction benchmark conversations")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4], help="compaction rank budgets")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    run_dir, out = _from_repo(args.run_dir), _from_repo(args.out)  # the steps run from the repository root
    if not (args.run_dir / "state").is_dir():
        parser.error(f"{args.run_dir} has no state/ folder")
    # The committed results are overwritten when a checkpoint ships; judge against copies of them.
    sources = {"main": (args.previous, "previous-eval.json"), "wide": (args.previous_wide, "previous-wide-eval.json"),
               "seed2": (args.previous_seed2, "previous-seed2-eval.json")}
    loaded: dict[str, Reference] = {}
    for set_name, (path, copy_name) in sources.items():
        try:
            result = read_result(path)
        except D2LMemoryError as exc:
            parser.error(str(exc))
        if not isinstance(result.get("config"), dict):
            parser.error(f"{path}: records no evaluation settings to repeat")
        loaded[set_name] = Reference(result, out / copy_name)
    references = References(**loaded)
    given = sys.argv[1:] if argv is None else argv
    record: dict[str, Any] = {"command": "python benchmarks/judge.py " + shlex.join(given), "steps": []}
    folder = REPO / out  # where this process writes: `out` as the steps see it, from the repository root
    if not args.dry_run:
        folder.mkdir(parents=True, exist_ok=True)
        for reference in loaded.values():
            (REPO / reference.copy).write_text(json.dumps(reference.result, indent=1))
    for label, command in plan(run_dir, references, args.name, out, args.conversations, args.chunks):
        print(f"[{label}] {shlex.join(command)}", flush=True)
        if args.dry_run:
            continue
        start = time.monotonic()
        log_path = folder / f"{label}.log"
        with open(log_path, "w") as log:
            status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - start
        record["steps"].append({"label": label, "command": shown(command), "status": status, "seconds": seconds})
        (folder / RECORD).write_text(json.dumps(record, indent=1))
        print(f"[{label}] status {status} after {seconds:.0f} s, log {log_path}", flush=True)
        if status != 0:
            return status
    if not args.dry_run:
        # The paired comparisons are what the shipping decision starts from: show them without a file to open.
        for label in ("compare", "wide-compare", "seed2-compare"):
            print(f"[{label}]\n" + (folder / f"{label}.log").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
