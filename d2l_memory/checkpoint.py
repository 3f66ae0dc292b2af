"""Hypernetwork checkpoints: ``hypernet.safetensors`` + ``hypernet.json``, never pickle.

The JSON holds the schema version, the full HypernetConfig, the base model's name and fingerprint,
the sha256 of the weights file, and free-form training information. Loading verifies the hash and
refuses a checkpoint made for another base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2l_memory.adapter import tensor_digest
from d2l_memory.config import HypernetConfig
from d2l_memory.dtypes import float_dtype
from d2l_memory.errors import CheckpointError, IncompatibleCheckpointError
from d2l_memory.hypernet import HyperLoRA

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "d2l-memory-hypernet"
CHECKPOINT_SCHEMA_VERSION = 1
WEIGHTS_FILE = "hypernet.safetensors"
META_FILE = "hypernet.json"


@dataclass(frozen=True)
class HypernetMeta:
    config: HypernetConfig
    base_model_name: str
    base_model_fingerprint: str
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def hypernet_id(self) -> str:
        """Short identity recorded in every adapter this hypernetwork makes."""
        return f"hn-{self.weights_sha256[:16]}"

    @property
    def trained_encoder_autocast(self) -> torch.dtype | None:
        """The dtype its training ran the frozen encoder pass in (``None``: full precision, or not recorded)."""
        name = self.training.get("train_config", {}).get("encoder_autocast")
        if name is None:
            return None
        try:
            return float_dtype(name)
        except ValueError:
            raise CheckpointError(f"checkpoint records an unknown encoder dtype {name!r}") from None


def hypernet_id_of(module: HyperLoRA) -> str:
    """Identity of in-memory weights (e.g. an untrained network): hash of its state dict."""
    return f"hn-{tensor_digest(module.state_dict())[:16]}"


def save_hypernet(
    directory: str | Path,
    module: HyperLoRA,
    *,
    base_model_name: str,
    base_model_fingerprint: str,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> HypernetMeta:
    """Write weights (optionally cast, e.g. to fp16 for shipping) and metadata atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    tmp.replace(directory / WEIGHTS_FILE)
    meta = HypernetMeta(
        config=module.cfg,
        base_model_name=base_model_name,
        base_model_fingerprint=base_model_fingerprint,
        weights_sha256=_file_sha256(directory / WEIGHTS_FILE),
        training=dict(training or {}),
    )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "config": meta.config.to_dict(),
        "base_model": {"name": meta.base_model_name, "fingerprint": meta.base_model_fingerprint},
        "weights_sha256": meta.weights_sha256,
        "training": meta.training,
    }
    tmp_meta = directory / f".{META_FILE}.tmp"
    tmp_meta.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp_meta.replace(directory / META_FILE)
    return meta


def read_hypernet_meta(directory: str | Path) -> HypernetMeta:
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        payload = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable hypernetwork metadata ({exc})") from exc
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: not a d2l-memory hypernetwork (format={payload.get('format')!r})")
    if payload.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(
            f"{meta_path}: schema version {payload.get('schema_version')!r}; this d2l-memory reads "
            f"{CHECKPOINT_SCHEMA_VERSION}"
        )
    try:
        config = HypernetConfig.from_dict(payload["config"])
        return HypernetMeta(
            config=config,
            base_model_name=payload["base_model"]["name"],
            base_model_fingerprint=payload["base_model"]["fingerprint"],
            weights_sha256=payload["weights_sha256"],
            training=payload.get("training", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: malformed metadata ({exc})") from exc


def load_hypernet(
    directory: str | Path,
    *,
    expect_base_model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[HyperLoRA, HypernetMeta]:
    """Load and verify a checkpoint; the module comes back in eval mode."""
    directory = Path(directory)
    meta = read_hypernet_meta(directory)
    if expect_base_model is not None and meta.base_model_fingerprint != expect_base_model:
        raise IncompatibleCheckpointError(
            f"hypernetwork at {directory} was trained for base model {meta.base_model_name!r} "
            f"({meta.base_model_fingerprint}), not for the loaded model ({expect_base_model}). "
            "Train one for this model with `d2l-memory train` or pass the matching base_model."
        )
    weights_path = directory / WEIGHTS_FILE
    if _file_sha256(weights_path) != meta.weights_sha256:
        raise CheckpointError(f"{weights_path}: sha256 does not match {META_FILE} (modified or truncated)")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable ({exc})") from exc
    module = HyperLoRA(meta.config)
    missing, unexpected = module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return module.to(device).eval(), meta


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    return digest.hexdigest()
