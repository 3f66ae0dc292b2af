"""Short meta-training ablations, each scored on the same held-out documents with the own-vs-wrong control.

    python benchmarks/ablate.py configs/ablations.json --variant NAME   # train (or resume) one, then score it
    python benchmarks/ablate.py configs/ablations.json --report [--benchmarks]

The spec file holds a ``base`` training config, the ``steps`` every variant trains from scratch, the
held-out ``score`` set, and ``variants``: name → overrides of the base config. Variants train in
``runs/ablations/NAME`` (killed runs resume) and write ``score.json`` there; ``--report`` tabulates every
scored variant. The score set is fixed across variants (it does not follow a variant's domain mix), so
rows compare: teacher-forced answer-token accuracy and exact answers on held-out fact documents, split
into values drawn from closed sets seen in training and values never seen in training, with another
document's adapter as the control, and on held-out conversations.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2l_memory.base_model import LoadedBaseModel
from d2l_memory.training.config import TrainConfig
from d2l_memory.training.trainer import HeldOutRow, HeldOutScore, Trainer
from d2l_memory.training.synth import make_sample

logger = logging.getLogger("benchmarks.ablate")
ROOT = Path("runs/ablations")


def variant_config(spec: dict[str, Any], name: str, root: Path = ROOT) -> TrainConfig:
    if name not in spec["variants"]:
        raise SystemExit(f"unknown variant {name!r}; the spec has {sorted(spec['variants'])}")
    data = {**spec["base"], **spec["variants"][name], "steps": spec["steps"], "schedule_start": 0}
    data["out_dir"] = str(root / name)
    data["eval_every"] = spec["steps"]  # the run's own held-out check once, at the end
    return TrainConfig.from_dict(data)


def score_set(spec: dict[str, Any], seed: int) -> dict[str, list]:
    """The fixed held-out documents every variant is scored on, by domain."""
    return {domain: [make_sample(seed, "test", i, domain) for i in range(count)]
            for domain, count in spec["score"].items()}


def summarise(rows: Sequence[HeldOutRow]) -> dict[str, Any]:
    return {"n": len(rows), **HeldOutScore.of(rows).__dict__} if rows else {"n": 0}


def run_variant(spec: dict[str, Any], name: str, root: Path = ROOT,
                base: LoadedBaseModel | None = None) -> dict[str, Any]:
    cfg = variant_config(spec, name, root)
    trainer = Trainer(cfg, base=base)
    started = time.perf_counter()
    trainer.run(progress=sys.stderr.isatty())
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    groups: dict[str, Sequence[HeldOutRow]] = {}
    for domain, samples in score_set(spec, cfg.seed).items():
        rows = trainer.held_out_rows(samples)
        groups[domain] = rows
        if domain == "facts":
            groups["facts, closed-set values"] = [r for r in rows if not r.qa.open_value]
            groups["facts, unseen values"] = [r for r in rows if r.qa.open_value]
    result = {
        "variant": name,
        "overrides": spec["variants"][name],
        "steps": trainer.step,
        "median_step_seconds": statistics.median(r["seconds"] for r in log),
        "step_hours": sum(r["seconds"] for r in log) / 3600,
        "wall_seconds_this_call": time.perf_counter() - started,
        "scores": {group: summarise(rows) for group, rows in groups.items()},
    }
    (Path(cfg.out_dir) / "score.json").write_text(json.dumps(result, indent=2))
    return result


def report(spec: dict[str, Any], root: Path = ROOT) -> str:
    results = [json.loads((root / name / "score.json").read_text())
               for name in spec["variants"] if (root / name / "score.json").exists()]
    groups = sorted({g for r in results for g in r["scores"]}, key=lambda g: (g.split(",")[0], g))
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"{spec['steps']} steps from scratch each; scored teacher-forced on "
             + ", ".join(f"{n} held-out {d} documents" for d, n in spec["score"].items())
             + ". Cells: answer-token accuracy own / wrong adapter (exact answers own / wrong), %.", "",
             "| variant | overrides | s/step (median) | " + " | ".join(groups) + " |",
             "|---|---|---|" + "---|" * len(groups)]
    for r in results:
        cells = []
        for g in groups:
            s = r["scores"].get(g, {"n": 0})
            cells.append("–" if not s["n"] else
                         f"{pct(s['own_token_acc'])} / {pct(s['wrong_token_acc'])} "
                         f"({pct(s['own_exact'])} / {pct(s['wrong_exact'])})")
        overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items()) or "(base)"
        lines.append(f"| {r['variant']} | {overrides} | {r['median_step_seconds']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--variant", help="train (resuming if killed) and score this variant")
    what.add_argument("--report", action="store_true", help="tabulate every scored variant")
    parser.add_argument("--benchmarks", action="store_true", help="with --report: write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(args.spec.read_text())
    if args.variant:
        result = run_variant(spec, args.variant)
        print(json.dumps(result["scores"], indent=2))
        return 0
    table = report(spec)
    print(table)
    if args.benchmarks:
        from d2l_memory.reporting import replace_section

        command = f"python benchmarks/ablate.py {args.spec} --variant NAME (each), then --report --benchmarks"
        replace_section(Path("BENCHMARKS.md"), "ablations", f"## Recipe ablations\n\n`{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
