"""MemoryEngine: wires base model, chunker, encoder, hypernetwork and LoRA application together.

Thread-safety: adapters are applied by hooks on the shared model, so one engine runs one model
call at a time (an internal lock serialises them). For parallel serving, batch requests with one
adapter per row (``generate_batch``) instead of running threads.

There is no ``torch.compile`` option: a compiled model does not see adapter hooks added after its
compilation and silently answers without the memory (measured in BENCHMARKS.md, with no decode
speed-up on CPU to pay for a different LoRA mechanism).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from d2l_memory.adapter import MemoryAdapter
from d2l_memory.base_model import (
    DEFAULT_BASE_MODEL,
    LoadedBaseModel,
    decoder_layers,
    decoder_layers_prefix,
    load_base_model,
    target_specs,
)
from d2l_memory.checkpoint import HypernetMeta, hypernet_id_of, load_hypernet
from d2l_memory.chunking import Message, as_text, chunk_text, user_turn_affixes
from d2l_memory.config import ChunkConfig, EncoderConfig, GenerationConfig, HypernetConfig, TargetSpec
from d2l_memory.dtypes import computes_natively
from d2l_memory.generation import generate_batch, prompt_ids, stream_tokens
from d2l_memory.hypernet import HyperLoRA
from d2l_memory.internalize import gather_weights, run_hypernet
from d2l_memory.prefix_cache import PrefixCache, PrefixCacheConfig, common_prefix_length

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int

SHIPPED_CHECKPOINTS = Path(__file__).parent / "checkpoints"
Source = str | bytes | Sequence[Message]


def default_hypernet_config(
    model: PreTrainedModel,
    targets: tuple[str, ...] = ("mlp.down_proj",),
    rank: int = 8,
    encoder: EncoderConfig | None = None,
    **overrides: object,
) -> HypernetConfig:
    """A hypernetwork shaped for ``model``; bigger base models need nothing but this call."""
    return HypernetConfig(
        base_hidden_size=model.config.hidden_size,
        num_layers=len(decoder_layers(model)),
        targets=target_specs(model, targets),
        rank=rank,
        encoder=encoder or EncoderConfig(),
        **overrides,  # type: ignore[arg-type]
    )


def shipped_checkpoint(base_model: str) -> Path | None:
    """The checkpoint that ships in the package for a built-in base model, if any."""
    path = SHIPPED_CHECKPOINTS / base_model
    return path if (path / "hypernet.json").is_file() else None


class MemoryEngine:
    """Turns text into MemoryAdapters and answers questions with or without them."""

    def __init__(
        self,
        base: LoadedBaseModel,
        hypernet: HyperLoRA,
        *,
        hypernet_id: str,
        chunking: ChunkConfig = ChunkConfig(),
        generation: GenerationConfig = GenerationConfig(),
        chunk_batch_size: int = 8,
        hypernet_trained: bool = True,
        encoder_autocast: torch.dtype | None = None,
        prefix_cache: PrefixCacheConfig = PrefixCacheConfig(),
    ) -> None:
        self.base = base
        self.hypernet_trained = hypernet_trained
        """False only for the untrained stand-in used when no checkpoint exists (adapters are zero)."""
        self.hypernet = hypernet.eval()
        self.hypernet_id = hypernet_id
        self.chunking = chunking
        self.generation = generation
        self.chunk_batch_size = chunk_batch_size
        self.encoder_autocast = encoder_autocast
        """Run the frozen encoder pass under autocast to this dtype (e.g. ``torch.bfloat16``), ``None``
        for full precision. ``from_pretrained`` uses the dtype the checkpoint was trained with."""
        self.prefix_cache = PrefixCache(prefix_cache)
        """KV caches of prompt prefixes that repeat across calls (system prompt, history, a document
        in the prompt), per adapter; ``PrefixCacheConfig(enabled=False)`` turns reuse off."""
        self.layers_prefix = decoder_layers_prefix(base.model)
        self.affixes = user_turn_affixes(base.tokenizer)
        self._lock = threading.RLock()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        hypernet: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunking: ChunkConfig = ChunkConfig(),
        generation: GenerationConfig = GenerationConfig(),
        home: Path | None = None,
        encoder_autocast: torch.dtype | None | Literal["as-trained"] = "as-trained",
        prefix_cache: PrefixCacheConfig = PrefixCacheConfig(),
    ) -> MemoryEngine:
        """Load a base model and a hypernetwork checkpoint (the shipped one by default), offline.

        ``encoder_autocast="as-trained"`` (the default) uses the encoder dtype recorded in the
        checkpoint's training config when the device computes it natively, so adapters come from the
        kind of activations the hypernetwork learned from at no cost in speed (bf16 wrote memories
        1.5–2× faster on a CPU with AMX); on a CPU that would emulate it (no AVX512-BF16 / AMX) it
        falls back to full precision, which is faster there and differs by about 1% (see BENCHMARKS).
        Pass a dtype or ``None`` (full precision) to decide explicitly.

        With no checkpoint for this base model, an untrained hypernetwork is used and a warning is
        logged: its adapters are exactly zero, so answers equal the base model's.
        """
        base = load_base_model(base_model, dtype=dtype, device=device, home=home)
        path = Path(hypernet) if hypernet is not None else shipped_checkpoint(base_model)
        if path is not None:
            module, meta = load_hypernet(path, expect_base_model=base.fingerprint, device=device)
            autocast = encoder_autocast
            if encoder_autocast == "as-trained":
                autocast = meta.trained_encoder_autocast
                if autocast is not None and not computes_natively(autocast, device):
                    logger.info("%s has no native %s arithmetic: encoder pass in full precision instead",
                                device, autocast)
                    autocast = None
            logger.info("Loaded hypernetwork %s from %s (encoder pass in %s)", meta.hypernet_id, path,
                        autocast or "full precision")
            return cls(base, module, hypernet_id=meta.hypernet_id, chunking=chunking, generation=generation,
                       encoder_autocast=autocast, prefix_cache=prefix_cache)
        logger.warning(
            "No trained hypernetwork for %r: using an UNTRAINED one (adapters are zero, answers equal the "
            "base model's). Train one with `d2l-memory train` or pass hypernet=PATH.",
            base_model,
        )
        torch.manual_seed(0)
        module = HyperLoRA(default_hypernet_config(base.model)).to(device)
        return cls(base, module, hypernet_id=hypernet_id_of(module), chunking=chunking, generation=generation,
                   hypernet_trained=False, prefix_cache=prefix_cache)

    def with_chunking(self, chunking: ChunkConfig) -> MemoryEngine:
        """An engine on the same model and hypernetwork (shared, not copied) that cuts documents by
        ``chunking``; its prefix cache starts empty."""
        return MemoryEngine(self.base, self.hypernet, hypernet_id=self.hypernet_id, chunking=chunking,
                            generation=self.generation, chunk_batch_size=self.chunk_batch_size,
                            hypernet_trained=self.hypernet_trained, encoder_autocast=self.encoder_autocast,
                            prefix_cache=self.prefix_cache.cfg)

    @classmethod
    def from_checkpoint_meta(cls, base: LoadedBaseModel, module: HyperLoRA, meta: HypernetMeta) -> MemoryEngine:
        return cls(base, module, hypernet_id=meta.hypernet_id)

    # ---- the public objects -----------------------------------------------------------------

    @property
    def model(self) -> PreTrainedModel:
        return self.base.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.base.tokenizer

    def adapter_targets(self) -> list[tuple[str, TargetSpec]]:
        """Full module path and shape of every module this engine's adapters write to."""
        return [(f"{self.layers_prefix}.{layer}.{t.name}", t)
                for layer in range(self.hypernet.cfg.num_layers) for t in self.hypernet.cfg.targets]

    @property
    def base_model_id(self) -> str:
        """Fingerprint every adapter of this engine records."""
        return self.base.fingerprint

    # ---- write: text → adapter ---------------------------------------------------------------

    def internalize(self, source: Source, *, progress: bool | None = None) -> MemoryAdapter:
        """Turn a document (text, UTF-8 bytes) or chat messages into a MemoryAdapter.

        Raises InvalidDocumentError for empty, whitespace-only or binary input and
        DocumentTooLargeError past ChunkConfig limits. Progress is shown for long documents.
        """
        text = as_text(source)
        chunks = chunk_text(text, self.tokenizer, self.chunking, self.affixes)
        return self.internalize_token_chunks([c.input_ids for c in chunks], [c.span for c in chunks], progress=progress)

    def internalize_token_chunks(
        self,
        chunks: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        *,
        progress: bool | None = None,
    ) -> MemoryAdapter:
        """Lower-level write: already-wrapped token chunks (the provider appends chunks with this)."""
        size = self.chunk_batch_size
        batches = [range(i, min(i + size, len(chunks))) for i in range(0, len(chunks), size)]
        show = progress if progress is not None else len(batches) > 2
        parts = []
        with self._lock, torch.inference_mode():
            for batch in tqdm(batches, desc="internalizing", unit="batch", disable=not show):
                out = run_hypernet(self.model, self.hypernet, [chunks[i] for i in batch], self.encoder_autocast)
                weights = gather_weights(out, self.layers_prefix, range(len(batch)))
                parts.append(self._adapter(weights, [spans[i] for i in batch]))
        return MemoryAdapter.concat(parts)

    def _adapter(self, weights: dict, spans: Sequence[tuple[int, int]]) -> MemoryAdapter:
        return MemoryAdapter(
            weights={k: (a.clone(), b.clone()) for k, (a, b) in weights.items()},
            rank_per_chunk=self.hypernet.cfg.rank_per_chunk,
            chunk_spans=tuple(spans),
            base_model=self.base_model_id,
            hypernet=self.hypernet_id,
        )

    # ---- read: answers ------------------------------------------------------------------------

    def generate(
        self,
        question: str,
        *,
        memory: MemoryAdapter | None = None,
        context: str | None = None,
        history: Sequence[Message] = (),
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
    ) -> str:
        """Answer with the memory's adapter (no document in the prompt), the document in the prompt, or neither.

        ``history`` holds earlier chat turns ({"role", "content"}) placed before the question.
        """
        return self.complete(question, memory=memory, context=context, history=history,
                             max_new_tokens=max_new_tokens, generation=generation).text

    def complete(
        self,
        question: str,
        *,
        memory: MemoryAdapter | None = None,
        context: str | None = None,
        history: Sequence[Message] = (),
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
    ) -> Completion:
        """Like ``generate``, with token counts."""
        cfg = self._generation(generation, max_new_tokens)
        return self.complete_batch([question], memories=[memory], contexts=[context], histories=[history],
                                   generation=cfg)[0]

    def generate_batch(
        self,
        questions: Sequence[str],
        *,
        memories: Sequence[MemoryAdapter | None] | None = None,
        contexts: Sequence[str | None] | None = None,
        histories: Sequence[Sequence[Message]] | None = None,
        generation: GenerationConfig | None = None,
    ) -> list[str]:
        """One batched decode; row i uses memories[i] (its own adapter), contexts[i] and histories[i]."""
        done = self.complete_batch(questions, memories=memories, contexts=contexts, histories=histories,
                                   generation=generation)
        return [c.text for c in done]

    def complete_batch(
        self,
        questions: Sequence[str],
        *,
        memories: Sequence[MemoryAdapter | None] | None = None,
        contexts: Sequence[str | None] | None = None,
        histories: Sequence[Sequence[Message]] | None = None,
        generation: GenerationConfig | None = None,
    ) -> list[Completion]:
        cfg = generation or self.generation
        n = len(questions)
        memories = list(memories) if memories is not None else [None] * n
        contexts = list(contexts) if contexts is not None else [None] * n
        histories = list(histories) if histories is not None else [()] * n
        if not (len(memories) == len(contexts) == len(histories) == n):
            raise ValueError("questions, memories, contexts and histories must have the same length")
        for memory in memories:
            if memory is not None:
                self.check_compatible(memory)
        rows = list(zip(questions, contexts, histories, strict=True))
        prompts = [self._prompt(q, c, h) for q, c, h in rows]
        adapters = None if all(m is None for m in memories) else memories
        reuse = min(self._reusable_prefix(p, q, c, h) for p, (q, c, h) in zip(prompts, rows, strict=True))
        with self._lock:
            answers, counts = generate_batch(self.model, self.tokenizer, prompts, cfg, adapters,
                                             prefix_cache=self.prefix_cache, prefix_length=reuse)
        return [Completion(a, len(p), c) for a, p, c in zip(answers, prompts, counts, strict=True)]

    def stream(
        self,
        question: str,
        *,
        memory: MemoryAdapter | None = None,
        context: str | None = None,
        history: Sequence[Message] = (),
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
    ) -> Iterator[str]:
        """Yield the answer piece by piece; the engine is busy until the iterator is exhausted or closed."""
        if memory is not None:
            self.check_compatible(memory)
        prompt = self._prompt(question, context, history)
        cfg = self._generation(generation, max_new_tokens)
        reuse = self._reusable_prefix(prompt, question, context, history)
        with self._lock:
            yield from stream_tokens(self.model, self.tokenizer, prompt, cfg, memory,
                                     prefix_cache=self.prefix_cache, prefix_length=reuse)

    def _reusable_prefix(
        self, prompt: list[int], question: str, context: str | None, history: Sequence[Message]
    ) -> int:
        """How many leading tokens of ``prompt`` do not depend on the question: everything up to where
        a prompt for a different question diverges (system prompt, history, a document in the prompt).
        0 when that part is too short to be worth caching or reuse is off."""
        if not self.prefix_cache.usable or len(prompt) <= self.prefix_cache.cfg.min_tokens:
            return 0  # nothing to reuse: skip tokenizing the probe prompt
        probe = "!" if question.startswith("?") else "?"
        stable = common_prefix_length(prompt, self._prompt(probe, context, history))
        stable = min(stable, len(prompt) - 1)  # generate needs at least one new input token
        return stable if stable >= self.prefix_cache.cfg.min_tokens else 0

    def count_prompt_tokens(self, question: str, *, context: str | None = None, history: Sequence[Message] = ()) -> int:
        return len(self._prompt(question, context, history))

    def _prompt(self, question: str, context: str | None, history: Sequence[Message]) -> list[int]:
        return prompt_ids(self.tokenizer, question, context, [dict(m) for m in history])

    def check_compatible(self, memory: MemoryAdapter) -> None:
        from d2l_memory.adapter import check_identity

        check_identity(memory.base_model, memory.hypernet, self.base_model_id, self.hypernet_id, "memory")

    def _generation(self, generation: GenerationConfig | None, max_new_tokens: int | None) -> GenerationConfig:
        cfg = generation or self.generation
        return cfg if max_new_tokens is None else replace(cfg, max_new_tokens=max_new_tokens)
