"""Reuse the KV cache of a prompt prefix that repeats across calls.

Agents send the same long system prompt (tool descriptions, instructions) and the same chat history
with every question; computing their keys and values again each time is most of a call's prefill.
``PrefixCache`` keeps those KV caches in an LRU bounded by bytes.

An adapter changes every layer's hidden states, so the KV of a prefix differs per adapter: an entry
is keyed by the content digest of the adapter that was active over the prefix (not its identity: the
provider combines a scope's memories into a new object for every call) and the prefix's token ids.

Only plain ``DynamicCache`` objects (full attention in every layer) are cached; models whose cache has
sliding-window or other layer kinds run without prefix reuse.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from d2l_memory.adapter import tensor_digest
from d2l_memory.lora import AdapterLike, lora_scope, weights_of

logger = logging.getLogger(__name__)

LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PrefixCacheConfig:
    enabled: bool = True
    min_tokens: int = 32
    """Shorter prefixes are recomputed: too little prefill to save to be worth an entry."""
    max_bytes: int = 256 * 2**20
    """Least recently used entries are dropped past this many bytes of keys and values."""


@dataclass(frozen=True)
class _Entry:
    layers: tuple[LayerKV, ...]
    """(keys, values) per layer, each (1, kv_heads, prefix_len, head_dim)."""

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


_Key = tuple[str, tuple[int, ...]]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _layers_of(cache: object) -> tuple[LayerKV, ...] | None:
    """The per-layer (keys, values) of a plain full-attention DynamicCache, else None."""
    if type(cache) is not DynamicCache:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return tuple((layer.keys, layer.values) for layer in layers)


class PrefixCache:
    """An LRU of prefix KV caches for one model. Not thread-safe: the engine's lock serialises use."""

    def __init__(self, cfg: PrefixCacheConfig = PrefixCacheConfig()) -> None:
        self.cfg = cfg
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.extended = 0
        """Misses computed from a shorter stored prefix rather than from scratch."""
        self.unsupported: str | None = None
        """Why this model's cache cannot be reused, once a prefill has shown it."""

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def usable(self) -> bool:
        return self.cfg.enabled and self.unsupported is None

    def states(
        self, model: PreTrainedModel, prefixes: Sequence[Sequence[int]], adapters: Sequence[AdapterLike | None]
    ) -> DynamicCache | None:
        """A fresh cache holding row i's prefix computed under adapters[i] (all prefixes equally long).

        A missing entry is computed and stored, starting from the longest stored prefix of it under the
        same adapter when there is one (a chat history that grew by a turn computes only that turn).
        The returned cache is a copy: decoding appends to it without touching the stored entries.
        None if this model's cache kind cannot be reused.
        """
        if len({len(p) for p in prefixes}) != 1:
            raise ValueError("prefixes of one batch must have the same length")
        rows = []
        for prefix, adapter in zip(prefixes, adapters, strict=True):
            key = (_key_of(adapter), tuple(prefix))
            entry = self._lookup(key) or self._build(model, key, adapter)
            if entry is None:
                return None
            rows.append(entry)
        return _as_cache(rows)

    def _lookup(self, key: _Key) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def _longest_stored_prefix(self, key: _Key) -> tuple[int, _Entry] | None:
        digest, tokens = key
        found = [(len(t), e) for (d, t), e in self._entries.items()
                 if d == digest and len(t) < len(tokens) and tokens[: len(t)] == t]
        return max(found, key=lambda item: item[0], default=None)

    def _build(self, model: PreTrainedModel, key: _Key, adapter: AdapterLike | None) -> _Entry | None:
        self.misses += 1
        tokens = key[1]
        start = self._longest_stored_prefix(key)
        done, past = (0, None) if start is None else (start[0], _as_cache([start[1]]))
        if start is not None:
            self.extended += 1
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([list(tokens[done:])], dtype=torch.long, device=device)
        # With a cache of `done` tokens and no mask, the model places the new tokens at positions
        # done, done+1, ...: exactly where a prefill of the whole prefix puts them.
        with torch.inference_mode(), lora_scope(model, adapter):
            out = model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1)
        layers = _layers_of(out.cache)
        if layers is None:
            self.unsupported = f"{type(out.cache).__name__} with non-full-attention layers"
            logger.info("Prefix KV reuse disabled for this model: its cache is a %s", self.unsupported)
            return None
        entry = _Entry(layers)
        self._store(key, entry)
        return entry

    def _store(self, key: _Key, entry: _Entry) -> None:
        if entry.nbytes > self.cfg.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.cfg.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes


def _as_cache(rows: Sequence[_Entry]) -> DynamicCache:
    """A new cache with the rows' prefixes stacked along the batch axis (a copy of the stored tensors)."""
    cache = DynamicCache()
    for index in range(len(rows[0].layers)):
        keys = torch.cat([row.layers[index][0] for row in rows])
        values = torch.cat([row.layers[index][1] for row in rows])
        cache.update(keys, values, index)
    return cache


def _key_of(adapter: AdapterLike | None) -> str:
    """The adapter part of an entry key: a digest of its weights ("" for the plain base model)."""
    if adapter is None:
        return ""
    digest = getattr(adapter, "content_digest", None)
    if isinstance(digest, str):
        return digest
    weights = weights_of(adapter)
    return tensor_digest({f"{n}.{part}": t for n, pair in weights.items() for part, t in zip("AB", pair)})
