"""Frozen configs, passed whole. They hold names and numbers only, so they serialise to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any



@dataclass(frozen=True)
class TargetSpec:
    """One kind of module that receives a LoRA in every decoder layer."""

    name: str
    """Module path relative to a decoder layer, e.g. ``mlp.down_proj``."""
    d_in: int
    """Input features of that linear layer."""
    d_out: int
    """Output features of that linear layer."""


@dataclass(frozen=True)
class EncoderConfig:
    """Which activations of the frozen base model the hypernetwork reads."""

    feature_layer: int | None = None
    """The residual stream entering this layer feeds the aggregator; ``None`` means 2/3 of the depth."""
    target_keys: bool = True
    """Also record every target module's *input* at every layer over the chunk (per-layer keys the
    head turns into rows of A). This needs the full forward pass; with ``False`` the encoder exits
    early, after ``feature_layer`` layers, which is cheaper but loses per-layer information."""


@dataclass(frozen=True)
class HypernetConfig:
    """Shape of the hypernetwork. Base-model sizes are recorded so a checkpoint knows what it fits."""

    base_hidden_size: int
    """Width of the base model's residual stream."""
    num_layers: int
    """Decoder layers of the base model (each gets its own adapter slots)."""
    targets: tuple[TargetSpec, ...]
    """Target modules inside every decoder layer."""
    rank: int = 8
    """LoRA rank emitted per chunk and per target module."""
    width: int = 256
    """Width of the Perceiver aggregator."""
    n_heads: int = 4
    """Attention heads in the aggregator."""
    n_blocks: int = 4
    """Cross-attention blocks (each: slot self-attention, cross-attention to the chunk, MLP)."""
    proj_hidden: int = 1024
    """Hidden width of the SwiGLU input projection."""
    copy_path: bool = True
    """Let each rank slot point at a chunk token and write that token's embedding into B.
    Only used for targets whose output is the residual stream (d_out == base_hidden_size) and
    whose base model ties input and output embeddings, so the written vector names a token."""
    head_layer_rank: int = 0
    """Rank of a per-layer correction to the heads' shared A and B projections (0: none). A target's
    input space differs from layer to layer, and a head shared by all layers can only shift its output
    by a layer-dependent offset. The correction starts at zero, so a trained hypernetwork can grow it
    (``d2l_memory.training.grow``) and continue from the same function."""
    key_gate: bool = False
    """How keys enter A. ``False``: a learned sigmoid mix that starts mostly on the keys. ``True``: A
    plus a per-layer gate times the key, the gate starting at zero, so that a network trained without
    keys can grow the key path (``d2l_memory.training.grow``) and continue from the same function.
    Needs ``encoder.target_keys``."""
    key_gate_scale: float = 1.0
    """The gate is this times its parameter. AdamW moves a parameter by about the learning rate per
    step, so a gate that must reach ~1 from 0 opens within a short warm restart only when scaled."""
    key_copy: bool = False
    """Give every copy slot a second rank-1 component: A is the pointed key (the target's own input at
    the pointed chunk token), B the embedding of the token after it, "in the state the document was in
    here, say what came next". Its per-(layer, slot) scale starts at zero, so a network trained
    without keys can grow it (``d2l_memory.training.grow``). With it, keys reach the shared A only
    through ``key_gate``. The adapter's rank per chunk doubles, so a rank budget
    (``ProviderConfig.rank_budget``) holds half as many chunks. Needs ``encoder.target_keys``.
    Grown into the shipped run for 100 steps it did not help (BENCHMARKS.md, ablation notes)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Where the activations come from; the trained weights only fit this choice."""

    def __post_init__(self) -> None:
        for name in ("key_gate", "key_copy"):
            if getattr(self, name) and not self.encoder.target_keys:
                raise ValueError(f"{name} needs keys: set the encoder's target_keys (TrainConfig.target_keys)")
        if self.key_copy and not self.copy_path:
            raise ValueError("key_copy writes token embeddings: it needs copy_path")

    @property
    def rank_per_chunk(self) -> int:
        """Rank of the adapter one chunk makes, per target module."""
        return 2 * self.rank if self.key_copy else self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HypernetConfig:
        data = dict(data)
        data["targets"] = tuple(TargetSpec(**t) for t in data["targets"])
        data["encoder"] = EncoderConfig(**data.get("encoder", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HypernetConfig fields {sorted(unknown)}: checkpoint from a newer version?")
        return cls(**data)


@dataclass(frozen=True)
class ChunkConfig:
    """How text is cut before encoding."""

    chunk_tokens: int = 512
    """Most content tokens in one chunk (the chat-template affixes come on top)."""
    min_chunk_tokens: int = 32
    """The smallest chunk size the engine uses. Short documents are cut finer than ``chunk_tokens``:
    into ``ceil(tokens / min_chunk_tokens)`` even pieces, at most ``short_document_chunks`` of them, so a
    piece holds at most this many tokens and may hold as few as half (capped at ``chunk_tokens``). Every
    chunk gets an adapter of the same rank, so a short document cut finer is stored with more rank per
    fact: with unchanged weights this lifted greedy answers to 478 held-out fact questions from 38.5% to
    47.5% (BENCHMARKS, evaluation notes; ``benchmarks/chunking.py`` compares policies). Set it to
    ``chunk_tokens`` for one chunk per ``chunk_tokens`` tokens (even pieces of at most that size)."""
    short_document_chunks: int = 8
    """Most pieces a document is cut into before chunks grow past ``min_chunk_tokens``; 8 is the most
    chunks per document the hypernetwork saw in training before its thirteenth cycle. Documents longer
    than ``short_document_chunks × chunk_tokens`` get even chunks of at most ``chunk_tokens``."""
    max_document_tokens: int = 262_144
    """Refuse larger inputs with DocumentTooLargeError instead of working for hours."""
    max_document_chars: int = 4_000_000
    """Checked before tokenising, so a huge input fails fast."""

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "min_chunk_tokens", "short_document_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"ChunkConfig.{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for MemoryEngine.generate."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Strings that end the answer early (not included in it)."""
