"""Context encoder: the frozen base model read over chunk tokens, returning what the hypernetwork sees.

Two kinds of activation come out of one pass:
- ``features``: the residual stream entering ``feature_layer`` (N, T, H), read by the aggregator;
- ``keys``: for every target module, its input at every layer (N, L, T, d_in). These live in exactly
  the space the adapter's A rows act on, so the head can build A from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from d2l_memory.base_model import decoder_layers
from d2l_memory.config import EncoderConfig


@dataclass(frozen=True)
class EncodedChunks:
    """A padded batch of encoded chunks."""

    features: torch.Tensor
    """(N, T, H) residual stream entering the feature layer."""
    keys: dict[str, torch.Tensor]
    """Target name → (N, L, T, d_in) inputs of that module at every layer; empty without target_keys."""
    input_ids: torch.Tensor
    """(N, T) token ids, padding filled with 0."""
    mask: torch.Tensor
    """(N, T) bool, True on real tokens."""


class _EarlyExit(Exception):
    """Raised by a hook to stop the forward pass once the wanted layer has run."""


def resolved_feature_layer(config: EncoderConfig, num_layers: int) -> int:
    layer = config.feature_layer if config.feature_layer is not None else (2 * num_layers) // 3
    if not 0 <= layer < num_layers:
        raise ValueError(f"feature_layer {layer} is outside 0..{num_layers - 1}")
    return layer


def pad_chunks(chunks: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, mask)."""
    longest = max(len(c) for c in chunks)
    ids = torch.zeros(len(chunks), longest, dtype=torch.long)
    mask = torch.zeros(len(chunks), longest, dtype=torch.bool)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        mask[row, : len(chunk)] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def encode_chunks(
    model: PreTrainedModel,
    chunks: Sequence[Sequence[int]],
    config: EncoderConfig,
    targets: Sequence[str],
    autocast_dtype: torch.dtype | None = None,
) -> EncodedChunks:
    """Run the frozen model over a batch of chunks in one pass and collect activations.

    Must be called outside any lora_scope: the encoder is the *base* model. With ``autocast_dtype``
    (e.g. ``torch.bfloat16``) the pass runs under autocast; activations come back in fp32 either way,
    so the hypernetwork's own arithmetic does not change.
    """
    device = model.get_input_embeddings().weight.device
    ids, mask = pad_chunks(chunks, device)
    layers = decoder_layers(model)
    feature_layer = resolved_feature_layer(config, len(layers))
    captured: dict[str, list[torch.Tensor]] = {t: [] for t in (targets if config.target_keys else ())}
    feature: list[torch.Tensor] = []

    def grab_feature(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        feature.append(hidden)
        if not config.target_keys:
            raise _EarlyExit

    def grab_key(target: str):  # noqa: ANN202 - hook factory
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured[target].append(inputs[0])
            # Nothing after the last layer's last target input is used (the rest of that layer,
            # the final norm): stop there.
            if feature and all(len(v) == len(layers) for v in captured.values()):
                raise _EarlyExit

        return hook

    handles = [layers[feature_layer].register_forward_pre_hook(grab_feature, with_kwargs=True)]
    for layer in layers:
        for target in captured:
            handles.append(layer.get_submodule(target).register_forward_pre_hook(grab_key(target)))
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            model.get_decoder()(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    except _EarlyExit:
        pass
    finally:
        for handle in handles:
            handle.remove()
    dtype = model.get_input_embeddings().weight.dtype
    keys = {t: torch.stack(v, dim=1).to(dtype) for t, v in captured.items()}  # (N, L, T, d_in)
    return EncodedChunks(features=feature[0].to(dtype), keys=keys, input_ids=ids, mask=mask)
