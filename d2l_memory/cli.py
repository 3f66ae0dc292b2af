"""The ``d2l-memory`` command line: parses arguments and dispatches to one module per command group."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from d2l_store import RecordNotFound, StoreError

from d2l_memory.cli_memory import add_memory_commands, load_engine
from d2l_memory.config import ChunkConfig
from d2l_memory.errors import D2LMemoryError

logger = logging.getLogger(__name__)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="meta-train a hypernetwork (resumes from OUT_DIR/state if present)")
    p.add_argument("config", help="JSON file with TrainConfig fields (see d2l_memory/training/config.py)")
    p.add_argument("--steps", type=int, help="override the config's total optimizer steps")
    p.add_argument("--out-dir", help="override the config's output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from d2l_memory.training.config import TrainConfig
    from d2l_memory.training.trainer import Trainer

    cfg = TrainConfig.from_file(args.config)
    overrides = {k: v for k, v in {"steps": args.steps, "out_dir": args.out_dir}.items() if v is not None}
    if overrides:
        cfg = TrainConfig.from_dict({**cfg.__dict__, **overrides})
    trainer = Trainer(cfg)
    try:
        trainer.run(progress=not args.no_progress)
    finally:
        trainer.workers.close()
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-checkpoint", help="write a run's latest training state as a shippable fp16 checkpoint")
    p.add_argument("run_dir", help="the training run (its state/ folder is read)")
    p.add_argument("out_dir", help="checkpoint folder to write (hypernet.safetensors + hypernet.json)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--plot", action="store_true", help="also plot the run's log next to the checkpoint")
    p.add_argument("--benchmarks", action="store_true", help="write the training record into BENCHMARKS.md")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import shlex

    from d2l_memory.dtypes import float_dtype
    from d2l_memory.training.export import export_checkpoint
    from d2l_memory.training.plot import plot_training_log

    command = "d2l-memory " + shlex.join(args.argv)
    meta = export_checkpoint(args.run_dir, args.out_dir, float_dtype(args.dtype), command=command)
    print(f"exported step {meta.training.get('step')} of {args.run_dir} to {args.out_dir}")
    image = plot_training_log(args.run_dir, Path(args.out_dir) / "training.png") if args.plot else None
    if image:
        print(f"plotted {image}")
    if args.benchmarks:
        from d2l_memory.reporting import replace_section
        from d2l_memory.training.report import training_markdown

        text = training_markdown(args.run_dir, args.out_dir, command, image.as_posix() if image else None)
        replace_section(Path("BENCHMARKS.md"), "training", text)
    return 0


def _add_prepare_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare-model", help="convert the packaged default base model into the cache (offline, once)")
    p.set_defaults(handler=_run_prepare_model)


def _run_prepare_model(args: argparse.Namespace) -> int:
    from d2l_memory.base_model import prepare_default_model
    from d2l_memory.paths import d2l_home

    print(prepare_default_model(d2l_home()))
    return 0


def _domain_counts(text: str) -> dict[str, int]:
    from d2l_memory.training.synth import DOMAINS

    try:
        counts = {domain: int(n) for domain, n in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DOMAIN=N[,DOMAIN=N...]") from None
    unknown = sorted(set(counts) - set(DOMAINS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown domains {unknown}; known: {', '.join(DOMAINS)}")
    return counts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _eval_mode(text: str) -> str:
    from d2l_memory.evaluation.rows import MODES

    if text not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}; choose from {', '.join(MODES)}")
    return text


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a hypernetwork on held-out documents (all modes, with controls)")
    p.add_argument("--base-model", default=None, help="base model (default: the built-in one)")
    p.add_argument("--hypernet", default=None, help="checkpoint folder (default: the shipped one)")
    p.add_argument("--out", default="benchmarks/results", help="folder for eval.json, eval.md and eval.png")
    p.add_argument("--quick", action="store_true", help="a few documents per domain (minutes, for smoke checks)")
    p.add_argument("--no-distill", action="store_true", help="skip the context-distillation reference")
    p.add_argument("--distill-docs", type=int, default=None, help="fact documents that get a context-distilled LoRA")
    p.add_argument("--docs", type=_domain_counts, default=None,
                   help="documents per domain, e.g. facts=24,conversation=8,tool=8")
    p.add_argument("--needle-tokens", type=int, nargs="+", default=None, help="needle document lengths in tokens")
    p.add_argument("--seed", type=int, default=None,
                   help="which held-out documents are drawn (default 0; another seed gives a fresh set)")
    p.add_argument("--recall-chunks", type=_positive_int, default=None,
                   help="chunk adapters the adapter_recall mode applies per question (default 2)")
    p.add_argument("--modes", type=_eval_mode, nargs="+", default=None, metavar="MODE",
                   help="only these modes (default: all; none, in_context, rag, adapter, adapter_recall, hybrid, "
                        "wrong_adapter, distill)")
    p.add_argument("--reuse-baselines", metavar="EVAL_JSON",
                   help="copy the none / in_context / rag / distill rows from an earlier eval.json of the same "
                        "settings and base model instead of recomputing them (they do not depend on the hypernetwork)")
    defaults = ChunkConfig()
    p.add_argument("--chunk-tokens", type=_positive_int, default=defaults.chunk_tokens,
                   help=f"most tokens per chunk (default {defaults.chunk_tokens})")
    p.add_argument("--min-chunk-tokens", type=_positive_int, default=defaults.min_chunk_tokens,
                   help="short documents are cut into even pieces of at most this many tokens "
                        f"(default {defaults.min_chunk_tokens}; equal to --chunk-tokens for fixed-size chunks)")
    p.add_argument("--short-document-chunks", type=_positive_int, default=defaults.short_document_chunks,
                   help=f"most pieces a short document is cut into (default {defaults.short_document_chunks})")
    p.add_argument("--benchmarks", action="store_true", help="write the results into BENCHMARKS.md")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import shlex

    from d2l_memory.evaluation.distill import DistillConfig
    from d2l_memory.evaluation.harness import MODES, EvalConfig, run_eval
    from d2l_memory.evaluation.rows import read_result
    from d2l_memory.evaluation.report import markdown, plot
    from d2l_memory.reporting import replace_section, with_artifacts

    cfg = EvalConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, docs={"facts": 8, "conversation": 4, "tool": 4}, needle_tokens=(1024,),
                                  needle_depths=(0.5,), distill_docs=1, distill=DistillConfig(steps=30))
    if args.docs:
        cfg = dataclasses.replace(cfg, docs=args.docs)
    if args.needle_tokens:
        cfg = dataclasses.replace(cfg, needle_tokens=tuple(args.needle_tokens))
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.distill_docs is not None:
        cfg = dataclasses.replace(cfg, distill_docs=args.distill_docs)
    if args.recall_chunks is not None:
        cfg = dataclasses.replace(cfg, recall_chunks=args.recall_chunks)
    if args.modes:
        cfg = dataclasses.replace(cfg, modes=tuple(m for m in MODES if m in args.modes))
    if args.no_distill:
        cfg = dataclasses.replace(cfg, modes=tuple(m for m in cfg.modes if m != "distill"))
    reuse = read_result(args.reuse_baselines) if args.reuse_baselines else None  # fail before the model loads
    chunking = ChunkConfig(chunk_tokens=args.chunk_tokens, min_chunk_tokens=args.min_chunk_tokens,
                           short_document_chunks=args.short_document_chunks)
    result = run_eval(load_engine(args, chunking), cfg, reuse=reuse)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    image = plot(result, out / "eval.png")
    text = with_artifacts(markdown(result, "d2l-memory " + shlex.join(args.argv)), out / "eval.json",
                          ("evaluation", image))
    (out / "eval.md").write_text(text + "\n")
    print(text)
    if args.benchmarks:
        replace_section(Path("BENCHMARKS.md"), "eval", text)
    return 0


def _add_eval_compare(sub: argparse._SubParsersAction) -> None:
    from d2l_memory.evaluation.compare import SCORED_METRICS

    p = sub.add_parser("eval-compare", help="pair two eval.json results question by question (flips and sign test)")
    p.add_argument("before", help="eval.json of the reference hypernetwork")
    p.add_argument("after", help="eval.json of the candidate, run with the same documents and settings")
    p.add_argument("--metric", choices=SCORED_METRICS, default="contains", help="right/wrong score to pair")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a markdown table")
    p.set_defaults(handler=_run_eval_compare)


def _run_eval_compare(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from d2l_memory.evaluation.compare import compare, markdown
    from d2l_memory.evaluation.rows import read_result

    before, after = read_result(args.before), read_result(args.after)
    deltas = compare(before, after, metric=args.metric)
    if args.json:
        print(json.dumps([dataclasses.asdict(d) | {"points": d.points} for d in deltas], indent=1))
    else:
        print(markdown(deltas, str(before.get("hypernet")), str(after.get("hypernet")), args.metric))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure write/read costs (runs benchmarks/perf.py of a source checkout)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/perf.py (--help lists them)")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "perf.py"
    if not script.is_file():
        raise D2LMemoryError(f"{script} not found: `d2l-memory bench` needs a source checkout of d2l-memory")
    module = runpy.run_path(str(script), run_name="d2l_memory_bench")
    logging.getLogger("benchmarks.perf").setLevel(logging.INFO)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return int(module["main"](rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2l-memory", description="Agent memory as Doc-to-LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logging, -vv: debug")
    sub = parser.add_subparsers(dest="command", required=True)
    add_memory_commands(sub)
    _add_prepare_model(sub)
    _add_train(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_eval_compare(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] == "bench" and argv[command_at + 1 : command_at + 2] != ["--"]:
        # Everything after `bench` belongs to benchmarks/perf.py.
        argv = [*argv[: command_at + 1], "--", *argv[command_at + 1 :]]
    args = build_parser().parse_args(argv)
    args.argv = argv  # reports quote the exact command that produced them
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":  # long runs: their progress lines are the point
        logging.getLogger("d2l_memory").setLevel(min(level, logging.INFO))
    try:
        return int(args.handler(args))
    except RecordNotFound as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 3
    except (D2LMemoryError, StoreError) as exc:
        logger.debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours; keep the interpreter's final flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
