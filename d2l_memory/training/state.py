"""Training state on disk: hypernetwork + optimizer as safetensors, counters as JSON; atomic swaps.

Data is a pure function of (seed, step), and the hypernetwork has no dropout, so weights, optimizer
moments and the step counter are the whole state: resuming reproduces an uninterrupted run.

A *weights-only* state is the same folder without ``optimizer.safetensors`` (a third of the bytes,
for committing a finished run where the full state would not fit). It cannot resume exactly: AdamW's
moments start again from zero, so the trainer accepts it only at the start of a new warm-up cycle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2l_memory.checkpoint import load_hypernet, save_hypernet
from d2l_memory.hypernet import HyperLoRA

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_training_state(
    run_dir: Path,
    hypernet: HyperLoRA,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    base_model_name: str,
    base_model_fingerprint: str,
    extra: dict[str, Any],
) -> Path:
    """Write ``run_dir/state`` atomically (new folder, then swap), so a kill never leaves half a state."""
    staging = run_dir / "state.new"
    shutil.rmtree(staging, ignore_errors=True)
    save_hypernet(staging, hypernet, base_model_name=base_model_name, base_model_fingerprint=base_model_fingerprint,
                  training={"step": step, **extra})
    tensors, plain = optimizer_tensors(optimizer)
    save_file(tensors, str(staging / OPTIMIZER_FILE))
    (staging / TRAINER_FILE).write_text(json.dumps({"step": step, "optimizer": plain, **extra}, indent=2))
    final, old = run_dir / "state", run_dir / "state.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state_dir(run_dir: Path) -> Path | None:
    for name in ("state", "state.old"):  # state.old survives only a kill between the two renames
        if (run_dir / name / TRAINER_FILE).is_file():
            return run_dir / name
    return None


def is_weights_only(state_dir: Path) -> bool:
    return not (state_dir / OPTIMIZER_FILE).is_file()


def load_training_state(
    state_dir: Path, optimizer_factory, expect_base_model: str, device: str  # noqa: ANN001 - callable(params)
) -> tuple[HyperLoRA, torch.optim.Optimizer, dict[str, Any]]:
    """Weights, optimizer and counters of ``state_dir``; a weights-only state gets a fresh optimizer."""
    hypernet, _ = load_hypernet(state_dir, expect_base_model=expect_base_model, device=device)
    hypernet.train()
    optimizer = optimizer_factory(hypernet.parameters())
    info = json.loads((state_dir / TRAINER_FILE).read_text())
    if not is_weights_only(state_dir):
        restore_optimizer(optimizer, load_file(str(state_dir / OPTIMIZER_FILE)), info["optimizer"])
    return hypernet, optimizer, info
