"""Average the weights of two or more saved hypernetworks of one run (a "soup" of checkpoints).

    python benchmarks/average_states.py STATE_A STATE_B [...] --out DIR [--weights 0.5 0.5]

Each STATE is a training-state folder (``runs/X/state``, ``training-runs/X/state``) or an exported
checkpoint folder: anything holding ``hypernet.json`` and ``hypernet.safetensors``. The average is
written in fp32 as a checkpoint folder that ``d2l-memory eval --hypernet DIR`` accepts. With
``--run-like RUN_DIR``, OUT becomes a run folder that ``benchmarks/judge.py OUT`` accepts: the average
in ``OUT/state/``, beside copies of RUN_DIR's ``train_config.json``, ``log.jsonl`` and
``state/trainer_state.json`` (not its optimizer moments, so it loads as a weights-only state); the
judge's step and hours columns are then RUN_DIR's. Why: two ends of warm-restart cycles from one run
differ by a few hundred steps of noise around the same basin; their mean may score above both, and
costs no training.

Refused with the reason: fewer than two inputs, different base models, different network shapes
(configs), weights that do not sum to 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from d2l_memory.checkpoint import HypernetMeta, load_hypernet, save_hypernet
from d2l_memory.errors import CheckpointError
from d2l_memory.hypernet import HyperLoRA
from d2l_memory.training.state import TRAINER_FILE, latest_state_dir

logger = logging.getLogger("benchmarks.average_states")


def average_hypernets(states: Sequence[str | Path], weights: Sequence[float] | None = None
                      ) -> tuple[HyperLoRA, list[HypernetMeta], list[float]]:
    """The weighted mean of ``states`` (fp32), every state's metadata and the weights used.

    All states must be for the first one's base model (``load_hypernet`` checks the fingerprint) and
    have its network shape."""
    if len(states) < 2:
        raise ValueError("averaging needs at least two states")
    weights = [1.0 / len(states)] * len(states) if weights is None else list(weights)
    if len(weights) != len(states) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"need one weight per state, summing to 1: got {weights}")
    first, first_meta = load_hypernet(states[0])
    metas = [first_meta]
    total = {k: v.detach().clone() * weights[0] for k, v in first.state_dict().items()}
    for state, weight in zip(states[1:], weights[1:]):
        module, meta = load_hypernet(state, expect_base_model=first_meta.base_model_fingerprint)
        if meta.config != first_meta.config:
            raise CheckpointError(f"{state} has another network shape than {states[0]}")
        metas.append(meta)
        for key, value in module.state_dict().items():
            total[key] += value * weight
    first.load_state_dict(total)
    return first, metas, weights


def judgeable_run_folder(out: Path, run_like: Path) -> Path:
    """Make ``out`` a run folder of ``run_like``'s run (config, log, step) and return its state folder."""
    state = latest_state_dir(run_like)
    if state is None:
        raise CheckpointError(f"{run_like} holds no training state")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: refusing to write a run folder over it")
    (out / "state").mkdir(parents=True, exist_ok=True)
    for name in ("train_config.json", "log.jsonl"):
        shutil.copyfile(run_like / name, out / name)
    shutil.copyfile(state / TRAINER_FILE, out / "state" / TRAINER_FILE)
    return out / "state"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("states", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", nargs="+", type=float, default=None)
    parser.add_argument("--run-like", type=Path, metavar="RUN_DIR",
                        help="write OUT as a run folder of RUN_DIR's run, for benchmarks/judge.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    module, metas, weights = average_hypernets(args.states, args.weights)
    meta = metas[0]
    sources = [{"path": str(state), "step": m.training.get("step"), "weight": w}
               for state, m, w in zip(args.states, metas, weights)]
    # No single step produced these weights: the sources' steps replace the first one's "step".
    inherited = {k: v for k, v in meta.training.items() if k != "step"}
    training = {**inherited, "averaged_from": sources}
    target = judgeable_run_folder(args.out, args.run_like) if args.run_like else args.out
    saved = save_hypernet(target, module, base_model_name=meta.base_model_name,
                          base_model_fingerprint=meta.base_model_fingerprint, training=training, dtype=torch.float32)
    logger.info("wrote %s (%s) from %s", target, saved.hypernet_id, [s["path"] for s in sources])


if __name__ == "__main__":
    main()
