"""Chunks → encoder → hypernetwork → per-chunk LoRA factors, concatenated along rank."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from d2l_memory.base_model import ties_embeddings
from d2l_memory.encoder import encode_chunks
from d2l_memory.hypernet import HyperLoRA, HyperOutput
from d2l_memory.lora import LoraPair


def run_hypernet(
    model: PreTrainedModel,
    hypernet: HyperLoRA,
    chunks: Sequence[Sequence[int]],
    encoder_autocast: torch.dtype | None = None,
) -> HyperOutput:
    """One encoder pass and one hypernetwork pass over a batch of chunks (gradients flow to the hypernet).

    ``encoder_autocast`` runs only the frozen encoder pass in that dtype (see ``encode_chunks``).
    """
    targets = [t.name for t in hypernet.cfg.targets]
    encoded = encode_chunks(model, chunks, hypernet.cfg.encoder, targets, encoder_autocast)
    embeddings = model.get_input_embeddings().weight if ties_embeddings(model) else None
    return hypernet(encoded.features, encoded.input_ids, encoded.mask, encoded.keys or None, embeddings)


def gather_weights(out: HyperOutput, layers_prefix: str, rows: Sequence[int]) -> dict[str, LoraPair]:
    """Factors of the chunks at ``rows`` of a hypernet output, concatenated along rank in that order.

    Returns ``{"<layers_prefix>.<l>.<target>": (A (k·r, d_in), B (d_out, k·r))}``.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long)
    weights: dict[str, LoraPair] = {}
    for target, (a_all, b_all) in out.items():
        a = a_all.index_select(0, index.to(a_all.device))  # (k, L, r, d_in)
        b = b_all.index_select(0, index.to(b_all.device))  # (k, L, d_out, r)
        k, n_layers, r, d_in = a.shape
        d_out = b.shape[2]
        a_layers = a.transpose(0, 1).reshape(n_layers, k * r, d_in)
        b_layers = b.permute(1, 2, 0, 3).reshape(n_layers, d_out, k * r)
        for layer in range(n_layers):
            weights[f"{layers_prefix}.{layer}.{target}"] = (a_layers[layer], b_layers[layer])
    return weights
