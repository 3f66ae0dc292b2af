"""Short meta-training ablations, each scored on the same held-out documents with the own-vs-wrong control.

    python benchmarks/ablate.py configs/ablations.json --variant NAME   # train (or resume) one, then score it
    python benchmarks/ablate.py configs/ablations.json --score-run RUN_DIR [--name N] [--encoder-autocast bfloat16]
    python benchmarks/ablate.py configs/ablations.json --report [--benchmarks]

The spec file holds a ``base`` training config, the ``steps`` every variant trains from scratch, the
held-out ``score`` set, and ``variants``: name → overrides of the base config. Variants train in
``runs/ablations/NAME`` (killed runs resume) and write ``score.json`` there; ``--report`` tabulates every
scored variant. The score set is fixed across variants (it does not follow a variant's domain mix), so
rows compare: teacher-forced answer-token accuracy and exact answers on held-out fact documents, split
into values drawn from closed sets seen in training and values never seen in training, with another
document's adapter as the control, and on held-out conversations. With ``"combined": [k, ...]`` in the
spec, the fact documents are scored again with k documents' adapters concatenated (own memory: the
question's document among k - 1 others; wrong: k other documents), the way a long document's chunks
are combined. ``--score-run`` adds a saved run (e.g. the shipped one) as a reference row, with its
encoder pass in fp32 or bf16.

A variant with ``"warm_start": STATE_DIR`` (a committed training state) instead continues that state
for ``"warm_steps"`` steps as a warm restart, on the training config ``"config"`` (a JSON file, e.g. the
shipped run's) plus the variant's other overrides: a recipe change measured on the trained network,
against a control variant that continues the same state unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from d2l_memory.base_model import LoadedBaseModel
from d2l_memory.training.config import TrainConfig
from d2l_memory.training.state import TRAINER_FILE, latest_state_dir
from d2l_memory.training.trainer import HeldOutRow, HeldOutScore, Trainer
from d2l_memory.training.synth import make_sample

logger = logging.getLogger("benchmarks.ablate")
ROOT = Path("runs/ablations")


WARM_KEYS = ("warm_start", "warm_steps", "config")
"""Variant keys that say where a warm-start variant starts, not how it trains."""


def state_step(state_dir: Path) -> int:
    return int(json.loads((state_dir / TRAINER_FILE).read_text())["step"])


def variant_config(spec: dict[str, Any], name: str, root: Path = ROOT) -> TrainConfig:
    if name not in spec["variants"]:
        raise SystemExit(f"unknown variant {name!r}; the spec has {sorted(spec['variants'])}")
    variant = spec["variants"][name]
    overrides = {k: v for k, v in variant.items() if k not in WARM_KEYS}
    if "warm_start" in variant:
        start = state_step(Path(variant["warm_start"]) / "state")
        data = {**json.loads(Path(variant["config"]).read_text()), **overrides,
                "steps": start + variant["warm_steps"], "schedule_start": start}
        data["eval_every"] = variant["warm_steps"]
    else:
        data = {**spec["base"], **overrides, "steps": spec["steps"], "schedule_start": 0}
        data["eval_every"] = spec["steps"]  # the run's own held-out check once, at the end
    data["out_dir"] = str(root / name)
    return TrainConfig.from_dict(data)


def copy_warm_state(spec: dict[str, Any], name: str, cfg: TrainConfig) -> None:
    """Copy a warm-start variant's committed state into its run folder (once: a killed run resumes)."""
    source = spec["variants"][name].get("warm_start")
    if source is not None and latest_state_dir(Path(cfg.out_dir)) is None:
        shutil.copytree(source, cfg.out_dir, dirs_exist_ok=True)


def score_set(spec: dict[str, Any], seed: int) -> dict[str, list]:
    """The fixed held-out documents every variant is scored on, by domain."""
    return {domain: [make_sample(seed, "test", i, domain) for i in range(count)]
            for domain, count in spec["score"].items()}


def summarise(rows: Sequence[HeldOutRow]) -> dict[str, Any]:
    return {"n": len(rows), **HeldOutScore.of(rows).__dict__} if rows else {"n": 0}


POSITIONS = {"first": "first token", "later": "later tokens", "end": "end of answer"}
"""Answer-token positions: the value's first token, its other tokens, the end-of-turn token."""


def by_position(rows: Sequence[HeldOutRow]) -> dict[str, dict[str, float]]:
    """Teacher-forced token accuracy at each answer position, own / wrong adapter. Tells a value that
    is never started apart from one that is started and then lost."""
    counts = {p: [0, 0, 0] for p in POSITIONS}  # own hits, wrong hits, tokens
    for row in rows:
        for index, (own, wrong) in enumerate(zip(row.own_hits, row.wrong_hits)):
            position = "end" if index == len(row.own_hits) - 1 else "first" if index == 0 else "later"
            tally = counts[position]
            tally[0] += own
            tally[1] += wrong
            tally[2] += 1
    return {p: {"own": o / n, "wrong": w / n, "n": n} for p, (o, w, n) in counts.items() if n}


def score(trainer: Trainer, spec: dict[str, Any], encoder_autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Scores of the trainer's current hypernetwork on the spec's fixed held-out set, by group, and
    the unseen fact values' token accuracy by position (under the key ``positions``)."""
    groups: dict[str, Sequence[HeldOutRow]] = {}
    for domain, samples in score_set(spec, trainer.cfg.seed).items():
        rows = trainer.held_out_rows(samples, encoder_autocast)
        groups[domain] = rows
        if domain == "facts":
            groups["facts, closed-set values"] = [r for r in rows if not r.qa.open_value]
            groups["facts, unseen values"] = [r for r in rows if r.qa.open_value]
    for k in spec.get("combined", []) if "facts" in groups else []:
        # Memories of k documents concatenated, as a long document's chunk adapters are at inference.
        groups[f"facts, 1 of {k} memories"] = trainer.held_out_rows(score_set(spec, trainer.cfg.seed)["facts"],
                                                                    encoder_autocast, combined=k)
    result: dict[str, Any] = {group: summarise(rows) for group, rows in groups.items()}
    if "facts, unseen values" in groups:
        result["positions"] = by_position(groups["facts, unseen values"])
    return result


def step_times(run_dir: Path, after_step: int = 0) -> dict[str, float]:
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    log = [r for r in log if r["step"] > after_step]  # a warm start's copied log is not this run's
    return {"median_step_seconds": statistics.median(r["seconds"] for r in log),
            "step_hours": sum(r["seconds"] for r in log) / 3600}


def run_variant(spec: dict[str, Any], name: str, root: Path = ROOT,
                base: LoadedBaseModel | None = None) -> dict[str, Any]:
    cfg = variant_config(spec, name, root)
    copy_warm_state(spec, name, cfg)
    trainer = Trainer(cfg, base=base)
    trainer.run(progress=sys.stderr.isatty())
    result = {"variant": name, "overrides": spec["variants"][name], "steps": trainer.step,
              **step_times(Path(cfg.out_dir), after_step=cfg.schedule_start), "scores": score(trainer, spec)}
    (Path(cfg.out_dir) / "score.json").write_text(json.dumps(result, indent=2))
    return result


def score_saved_run(spec: dict[str, Any], run_dir: Path, name: str, encoder_autocast: str | None,
                    root: Path = ROOT, base: LoadedBaseModel | None = None) -> dict[str, Any]:
    """Score an existing run's latest state (e.g. the shipped one) on the same set, as a reference row."""
    saved = TrainConfig.from_file(run_dir / "train_config.json")
    # Scoring takes no step, so the schedule is irrelevant; pinning it at the state's step lets a
    # weights-only state load (the trainer accepts one only as a warm restart at its step).
    state_dir = latest_state_dir(run_dir)
    if state_dir is None:
        raise SystemExit(f"{run_dir} holds no training state to score")
    step = state_step(state_dir)
    cfg = dataclasses.replace(saved, out_dir=str(run_dir), threads=spec["base"].get("threads"),
                              schedule_start=step, steps=max(saved.steps, step + 1))
    trainer = Trainer(cfg, base=base)
    dtype = dataclasses.replace(saved, encoder_autocast=encoder_autocast).encoder_dtype()
    note = f"saved run {run_dir}, encoder {encoder_autocast or 'float32'}"
    result = {"variant": name, "overrides": {"reference": note}, "steps": trainer.step, **step_times(run_dir),
              "scores": score(trainer, spec, dtype)}
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "score.json").write_text(json.dumps(result, indent=2))
    return result


def scored(spec: dict[str, Any], root: Path = ROOT, committed: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every result: ``committed`` rows (the raw file in the repository) updated by the score.json
    files under ``root`` (this machine's runs), so a new machine's report keeps earlier sessions' rows.
    Order: the spec's variants in its order, then reference rows (--score-run) by name."""
    by_name = {r["variant"]: r for r in committed}
    by_name |= {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/score.json")}
    names = [n for n in spec["variants"] if n in by_name] + sorted(n for n in by_name if n not in spec["variants"])
    return [by_name[name] for name in names]


def report(spec: dict[str, Any], root: Path = ROOT, committed: Sequence[dict[str, Any]] = ()) -> str:
    results = scored(spec, root, committed)
    groups = sorted({g for r in results for g in r["scores"] if g != "positions"}, key=lambda g: (g.split(",")[0], g))
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"Variants: {spec['steps']} steps from scratch each, except those with a warm_start (its steps "
             "continue that state). Every row is scored teacher-forced on the same "
             + ", ".join(f"{n} held-out {d} documents" for d, n in spec["score"].items())
             + ". Cells: answer-token accuracy own / wrong adapter (exact answers own / wrong), %.", "",
             "| variant | overrides | steps | s/step (median) | " + " | ".join(groups) + " |",
             "|---|---|---|---|" + "---|" * len(groups)]
    for r in results:
        cells = []
        for g in groups:
            s = r["scores"].get(g, {"n": 0})
            cells.append("–" if not s["n"] else
                         f"{pct(s['own_token_acc'])} / {pct(s['wrong_token_acc'])} "
                         f"({pct(s['own_exact'])} / {pct(s['wrong_exact'])})")
        overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items()) or "(base)"
        lines.append(f"| {r['variant']} | {overrides} | {r['steps']} | {r['median_step_seconds']:.2f} | "
                     + " | ".join(cells) + " |")
    with_positions = [r for r in results if "positions" in r["scores"]]
    if with_positions:
        lines += ["", "Unseen fact values, teacher-forced token accuracy by position in the answer, own / wrong "
                  "adapter, % (only rows scored since this table was added):", "",
                  "| variant | " + " | ".join(POSITIONS.values()) + " |",
                  "|---|" + "---|" * len(POSITIONS)]
        for r in with_positions:
            at = r["scores"]["positions"]
            lines.append(f"| {r['variant']} | " + " | ".join(
                f"{pct(at[p]['own'])} / {pct(at[p]['wrong'])}" if p in at else "–" for p in POSITIONS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--variant", help="train (resuming if killed) and score this variant")
    what.add_argument("--report", action="store_true", help="tabulate every scored variant")
    what.add_argument("--score-run", type=Path, metavar="RUN_DIR",
                      help="score a saved run's latest state on the same set (a reference row)")
    parser.add_argument("--name", help="with --score-run: the row's name (default: the run folder's name)")
    parser.add_argument("--encoder-autocast", default=None, help="with --score-run: e.g. bfloat16 (default fp32)")
    parser.add_argument("--benchmarks", action="store_true", help="with --report: write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(args.spec.read_text())
    if args.variant or args.score_run:
        result = (run_variant(spec, args.variant) if args.variant else
                  score_saved_run(spec, args.score_run, args.name or args.score_run.name, args.encoder_autocast))
        print(json.dumps(result["scores"], indent=2))
        return 0
    raw = Path("benchmarks/results/ablations.json")
    committed = json.loads(raw.read_text()) if raw.is_file() else []
    table = report(spec, committed=committed)
    print(table)
    if args.benchmarks:
        from d2l_memory.reporting import replace_section

        raw.write_text(json.dumps(scored(spec, committed=committed), indent=1))
        command = f"python benchmarks/ablate.py {args.spec} --variant NAME (each), then --report --benchmarks"
        replace_section(Path("BENCHMARKS.md"), "ablations",
                        f"## Recipe ablations\n\n`{command}`\n\n{table}\n\nRaw results: `{raw.as_posix()}`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
