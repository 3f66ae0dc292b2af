"""Judge a training run's latest state against the shipped checkpoint, in one command.

After a training cycle the same four measurements decide whether its checkpoint ships (see
``training-runs/README.md``): the evaluation on the documents of the previous ``eval.json`` (its
hypernetwork-free rows reused), the paired comparison with that run, the recipe-ablation score row and
the compaction benchmark. This runs them one after another (never two CPU jobs at once: on a small
machine they only slow each other), each logged to its own file in ``--out``, and stops at the first
failure. ``--out``/judge.json records each step's command, status and time. Deciding to ship stays a
person's job; once the checkpoint has shipped, ``benchmarks/publish.py`` renders BENCHMARKS.md's result
sections from this run's output.

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
from pathlib import Path
from typing import Any

from d2l_memory.errors import D2LMemoryError
from d2l_memory.evaluation.rows import read_result

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "d2l_memory.cli"]
RECORD = "judge.json"


def _from_repo(path: Path) -> Path:
    """``path`` as the steps (run from the repository root) see it: relative inside the repository, so
    that the results name the run as ``runs/...``, not by this machine's absolute path."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved


def eval_settings(previous: dict) -> list[str]:
    """The ``d2l-memory eval`` flags that reproduce the previous run's documents and questions."""
    config = previous["config"]
    docs = ",".join(f"{domain}={n}" for domain, n in config["docs"].items())
    return ["--docs", docs, "--needle-tokens", *map(str, config["needle_tokens"]),
            "--distill-docs", str(config["distill_docs"]), "--recall-chunks", str(config["recall_chunks"])]


def plan(run_dir: Path, previous: dict, previous_eval: Path, name: str, out: Path, conversations: int,
         chunks: Sequence[int]) -> list[tuple[str, list[str]]]:
    """The steps, as (label, argv); every one writes only below ``out`` (and the ablation row's folder)."""
    hypernet = out / "hypernet"
    return [
        ("export", [*CLI, "export-checkpoint", str(run_dir), str(hypernet)]),
        ("eval", [*CLI, "eval", "--hypernet", str(hypernet), *eval_settings(previous),
                  "--reuse-baselines", str(previous_eval), "--out", str(out / "eval")]),
        ("compare", [*CLI, "eval-compare", str(previous_eval), str(out / "eval" / "eval.json")]),
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
    parser.add_argument("--previous", type=Path, default=REPO / "benchmarks" / "results" / "eval.json",
                        help="eval.json of the shipped checkpoint (default: the committed one)")
    parser.add_argument("--conversations", type=int, default=5, help="compaction benchmark conversations")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4], help="compaction rank budgets")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    run_dir, out = _from_repo(args.run_dir), _from_repo(args.out)  # the steps run from the repository root
    if not (args.run_dir / "state").is_dir():
        parser.error(f"{args.run_dir} has no state/ folder")
    try:
        previous = read_result(args.previous)
    except D2LMemoryError as exc:
        parser.error(str(exc))
    if not isinstance(previous.get("config"), dict):
        parser.error(f"{args.previous}: records no evaluation settings to repeat")
    # The committed eval.json is overwritten when a checkpoint ships; judge against a copy of it.
    previous_eval = out / "previous-eval.json"
    given = sys.argv[1:] if argv is None else argv
    record: dict[str, Any] = {"command": "python benchmarks/judge.py " + shlex.join(given), "steps": []}
    folder = REPO / out  # where this process writes: `out` as the steps see it, from the repository root
    if not args.dry_run:
        folder.mkdir(parents=True, exist_ok=True)
        (REPO / previous_eval).write_text(json.dumps(previous, indent=1))
    for label, command in plan(run_dir, previous, previous_eval, args.name, out, args.conversations, args.chunks):
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
        # The paired comparison is what the shipping decision starts from: show it without a file to open.
        print((folder / "compare.log").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
