"""PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors`) to and from our convention.

PEFT applies ΔW = (lora_alpha / r) * B @ A. Our B already carries the scale, so an export sets
lora_alpha = r, whatever r is: padding the rank with zero rows of A and zero columns of B (for
vLLM's fixed set of ranks) then changes nothing, since the padded product is the same and the
scale stays 1. An import folds PEFT's scale into B.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2l_store import blobformat
from d2l_store.errors import InvalidAdapterError
from d2l_store.tensors import A_SUFFIX, B_SUFFIX, Tensors

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_CONFIG_BYTES = 1 << 20


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise InvalidAdapterError(f"rank {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}; export without padding")


def write_peft(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int,
    base_model_name_or_path: str | None,
    pad_to: int | None = None,
    header: Mapping[str, str] | None = None,
) -> Path:
    """Write a PEFT folder for `tensors` (our convention, total rank `rank`), padded to `pad_to`."""
    r_out = pad_to or rank
    if r_out < rank:
        raise InvalidAdapterError(f"cannot pad rank {rank} down to {r_out}")
    state: Tensors = {}
    modules = sorted(k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX))
    for m in modules:
        a, b = tensors[m + A_SUFFIX], tensors[m + B_SUFFIX]  # (R, d_in), (d_out, R)
        if r_out > rank:
            a = torch.cat([a, a.new_zeros(r_out - rank, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], r_out - rank)], dim=1)
        state[f"{PREFIX}{m}.lora_A.weight"] = a
        state[f"{PREFIX}{m}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r_out,
        "lora_alpha": r_out,  # scale alpha / r == 1: B already carries the scale
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(header or {})}
    _write_atomic(out / WEIGHTS_NAME, blobformat.encode(state, meta))
    _write_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    log.info("exported PEFT adapter (r=%d, %d modules) to %s", r_out, len(modules), out)
    return out


def _write_atomic(path: Path, data: bytes | bytearray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class PeftAdapter:
    """A PEFT folder read back into our convention (scale folded into B)."""

    tensors: Tensors
    rank: int
    config: dict[str, Any]
    header: dict[str, str]


def read_peft(in_dir: str | os.PathLike[str]) -> PeftAdapter:
    """Read a PEFT LoRA folder; reject what our convention cannot express (DoRA, embeddings, biases)."""
    d = Path(in_dir)
    cfg_bytes = (d / CONFIG_NAME).read_bytes()
    if len(cfg_bytes) > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(f"{CONFIG_NAME} is {len(cfg_bytes)} bytes; refusing to parse")
    config = json.loads(cfg_bytes)
    _check_config(config)
    state, header = blobformat.decode((d / WEIGHTS_NAME).read_bytes())
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors: Tensors = {}
    for key, t in state.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".lora_A.weight"):
            tensors[name.removesuffix(".lora_A.weight") + A_SUFFIX] = t
        elif name.endswith(".lora_B.weight"):
            b = t if scale == 1.0 else (t.float() * scale).to(t.dtype)
            tensors[name.removesuffix(".lora_B.weight") + B_SUFFIX] = b
        else:
            raise InvalidAdapterError(f"unsupported tensor {key!r}: only lora_A/lora_B weights of linear layers")
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(A_SUFFIX)}
    if len(ranks) != 1:
        raise InvalidAdapterError(f"modules have different ranks {sorted(ranks)}; one rank is needed")
    return PeftAdapter(tensors=tensors, rank=ranks.pop(), config=config, header=header)


def _check_config(config: Any) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidAdapterError("adapter_config.json is not a PEFT LoRA config (peft_type != LORA)")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise InvalidAdapterError(f"PEFT adapters with {flag}=true are not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise InvalidAdapterError(f"PEFT adapters with a non-empty {pattern} are not supported")
    if config.get("modules_to_save"):
        raise InvalidAdapterError("PEFT adapters with modules_to_save are not supported")
    rank_ok = isinstance(config.get("r"), int) and config["r"] >= 1
    if not rank_ok or not isinstance(config.get("lora_alpha"), (int, float)):
        raise InvalidAdapterError("adapter_config.json needs a positive int r and a numeric lora_alpha")


def trim_padding(tensors: Mapping[str, torch.Tensor], rank: int, true_rank: int) -> Tensors | None:
    """Drop the zero padding above `true_rank`, or None if the extra ranks are not all zero."""
    if true_rank == rank:
        return dict(tensors)
    if not 0 < true_rank < rank:
        return None
    out: Tensors = {}
    for k, t in tensors.items():
        keep, pad = (t[:true_rank], t[true_rank:]) if k.endswith(A_SUFFIX) else (t[:, :true_rank], t[:, true_rank:])
        if bool(pad.any()):
            return None
        out[k] = keep.contiguous()
    return out
