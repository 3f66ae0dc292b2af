"""Growing a trained hypernetwork: new components that start at zero, everything learned kept.

Only config fields whose new parameters are zero-initialised may grow, so the grown network makes
exactly the adapters the old one made until training moves it. Every other field must match.
"""

from __future__ import annotations

import dataclasses

import torch

from d2l_memory.config import HypernetConfig
from d2l_memory.hypernet import HyperLoRA

GROWABLE_FIELDS = ("head_layer_rank", "key_gate", "key_copy")
"""HypernetConfig fields that may go from 0 (or False) to a positive value (or True) on a trained network.
Growing ``key_gate`` or ``key_copy`` also turns on the encoder's ``target_keys``, the keys they read."""
KEY_READERS = ("key_gate", "key_copy")
"""Growable fields that read the encoder's target keys (a network with neither reads none)."""


def grown_hypernet(trained: HyperLoRA, config: HypernetConfig, seed: int) -> HyperLoRA:
    """``trained`` with the components ``config`` adds; raises ValueError if ``config`` is not a pure growth."""
    before = trained.cfg
    kept = {name: getattr(before, name) for name in GROWABLE_FIELDS}
    grown_readers = [name for name in KEY_READERS if getattr(config, name) and not getattr(before, name)]
    if grown_readers:
        if before.encoder.target_keys and not any(getattr(before, name) for name in KEY_READERS):
            raise ValueError(f"the saved hypernetwork already mixes keys into A; {grown_readers[0]} would change "
                             f"what it learned (grow {grown_readers[0]} only into a network trained without keys)")
        kept["encoder"] = dataclasses.replace(config.encoder, target_keys=before.encoder.target_keys)
    if "key_gate" in grown_readers:
        kept["key_gate_scale"] = before.key_gate_scale  # the gate is new, so may its scale be
    as_before = dataclasses.replace(config, **kept)
    if as_before != before:
        changed = [f.name for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(config, f.name)]
        raise ValueError(
            f"the saved hypernetwork differs from the configured one in {changed}; only {list(GROWABLE_FIELDS)} "
            "can be added to a trained network (start a new run for other changes)"
        )
    for name in GROWABLE_FIELDS:
        if getattr(before, name) not in (0, getattr(config, name)):  # False == 0
            raise ValueError(
                f"{name} can only grow from 0 (saved {getattr(before, name)}, configured {getattr(config, name)})"
            )
    device = next(trained.parameters()).device
    # The new down-projections are random: seed them, without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = HyperLoRA(config).to(device)
    # The configs differ only in growable fields, so the only keys missing here are the new parameters.
    grown.load_state_dict(trained.state_dict(), strict=False)
    return grown.train(trained.training)
