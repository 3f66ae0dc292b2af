"""Text and chat messages → validated token chunks wrapped in the model's user-turn affixes.

The affixes come from the tokenizer's own chat template (rendered around a sentinel), so no
per-model token lists are written by hand. Chunks never see each other: each is encoded alone.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from d2l_memory.config import ChunkConfig
from d2l_memory.errors import DocumentTooLargeError, InvalidDocumentError

Message = Mapping[str, str]
_SENTINEL = "\u2063D2L_SENTINEL\u2063"


@dataclass(frozen=True)
class TurnAffixes:
    """Token ids that open and close a user turn in this tokenizer's chat format."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """One encoder input: affix + content tokens + affix, and where the content sits in the document."""

    input_ids: tuple[int, ...]
    span: tuple[int, int]
    """Content token range [start, end) within the whole document's tokens."""


def user_turn_affixes(tokenizer: PreTrainedTokenizerBase) -> TurnAffixes:
    """Split the rendered template of one user turn around a sentinel text."""
    if tokenizer.chat_template is None:
        return TurnAffixes(prefix=(), suffix=())
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    before, found, after = str(rendered).partition(_SENTINEL)
    if not found:
        raise InvalidDocumentError("the chat template does not echo user content; cannot derive affixes")
    encode = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)) if s else ()  # noqa: E731
    return TurnAffixes(prefix=encode(before), suffix=encode(after))


def render_messages(messages: Sequence[Message]) -> str:
    """A conversation as a plain transcript, the format the hypernetwork is trained on.

    One line block per message, ``Role: content``. Keeping the transcript plain (not the chat
    template) means a conversation and a document go through exactly the same path.
    """
    lines = []
    for i, message in enumerate(messages):
        if "content" not in message or "role" not in message:
            raise InvalidDocumentError(f"message {i} needs 'role' and 'content' keys")
        content = message["content"]
        if not isinstance(content, str):
            raise InvalidDocumentError(f"message {i} content must be text, got {type(content).__name__}")
        lines.append(f"{str(message['role']).capitalize()}: {content.strip()}")
    return "\n".join(lines)


def as_text(source: str | bytes | Sequence[Message]) -> str:
    """Accept text, UTF-8 bytes or chat messages; refuse anything that is not real text."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidDocumentError(f"bytes are not UTF-8 text (first bad byte at {exc.start})") from exc
    if isinstance(source, str):
        text = source
    elif isinstance(source, Sequence) and all(isinstance(m, Mapping) for m in source):
        text = render_messages(source)
    else:
        raise InvalidDocumentError(f"expected text or a list of chat messages, got {type(source).__name__}")
    validate_text(text)
    return text


def validate_text(text: str) -> None:
    if not text.strip():
        raise InvalidDocumentError("the document is empty or whitespace-only")
    if "\x00" in text:
        raise InvalidDocumentError("the document contains NUL bytes: binary data, not text")
    sample = text[:65536]
    controls = sum(1 for ch in sample if unicodedata.category(ch) == "Cc" and ch not in "\n\r\t\f\v")
    bad = controls + sample.count("\ufffd")
    if bad > max(8, len(sample) // 100):
        raise InvalidDocumentError(
            f"the document looks binary ({bad} control or replacement characters in the first {len(sample)})"
        )


def chunk_text(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    config: ChunkConfig,
    affixes: TurnAffixes,
) -> list[Chunk]:
    """Tokenise validated text and cut it into contiguous, near-even chunks (how many: ``chunk_count``)."""
    if len(text) > config.max_document_chars:
        raise DocumentTooLargeError(
            f"document has {len(text):,} characters; the limit is {config.max_document_chars:,} "
            "(ChunkConfig.max_document_chars)"
        )
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidDocumentError("the document tokenises to nothing")
    if len(ids) > config.max_document_tokens:
        raise DocumentTooLargeError(
            f"document has {len(ids):,} tokens; the limit is {config.max_document_tokens:,} "
            "(ChunkConfig.max_document_tokens)"
        )
    return [
        Chunk(input_ids=affixes.prefix + tuple(ids[start:end]) + affixes.suffix, span=(start, end))
        for start, end in chunk_spans(len(ids), config)
    ]


def chunk_count(n_tokens: int, config: ChunkConfig) -> int:
    """How many chunks a document of ``n_tokens`` content tokens is cut into (see ChunkConfig)."""
    if n_tokens <= 0:
        return 0
    capped = math.ceil(n_tokens / config.chunk_tokens)
    finest = min(config.min_chunk_tokens, config.chunk_tokens)
    fine = min(config.short_document_chunks, math.ceil(n_tokens / finest))
    return max(capped, fine)


def even_spans(n_tokens: int, n_pieces: int) -> list[tuple[int, int]]:
    """``n_pieces`` contiguous (start, end) token spans covering ``n_tokens``, lengths differing by at most 1."""
    n_pieces = max(1, min(n_pieces, n_tokens))
    bounds = [round(i * n_tokens / n_pieces) for i in range(n_pieces + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_pieces)]


def chunk_spans(n_tokens: int, config: ChunkConfig) -> list[tuple[int, int]]:
    """The token spans ``chunk_text`` cuts a document of ``n_tokens`` content tokens into."""
    return even_spans(n_tokens, chunk_count(n_tokens, config))


def span_texts(text: str, tokenizer: PreTrainedTokenizerBase, spans: Sequence[tuple[int, int]]) -> list[str]:
    """The source text of each chunk, from its token span (as ``chunk_text`` cut it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.decode(ids[s:e]) for s, e in spans]
