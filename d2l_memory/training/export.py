"""Training state → shippable inference checkpoint (cast weights, no optimizer, compute recorded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from d2l_memory.checkpoint import HypernetMeta, load_hypernet, save_hypernet
from d2l_memory.errors import CheckpointError
from d2l_memory.training.state import latest_state_dir

logger = logging.getLogger(__name__)


def training_compute(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps and wall-clock seconds summed from a run's log records (pauses excluded)."""
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    return {"logged_steps": len(records), "train_step_hours": round(seconds / 3600, 3)}


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """A run's log records, one per step: steps redone after a resume replace the killed run's lines."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in log_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                      command: str | None = None) -> HypernetMeta:
    """Write the latest state of ``run_dir`` as an inference checkpoint in ``out_dir``."""
    run_dir = Path(run_dir)
    state_dir = latest_state_dir(run_dir) or (run_dir if (run_dir / "hypernet.json").is_file() else None)
    if state_dir is None:
        raise CheckpointError(f"{run_dir}: no training state (expected {run_dir}/state)")
    module, meta = load_hypernet(state_dir)
    training = dict(meta.training)
    log_path = run_dir / "log.jsonl"
    training["compute"] = training_compute(read_log(log_path) if log_path.is_file() else [])
    if command:
        training["command"] = command
    saved = save_hypernet(out_dir, module, base_model_name=meta.base_model_name,
                          base_model_fingerprint=meta.base_model_fingerprint, training=training, dtype=dtype)
    logger.info("exported step %s of %s to %s (%s)", training.get("step"), run_dir, out_dir, dtype)
    return saved
