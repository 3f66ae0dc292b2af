from __future__ import annotations

import pytest

from d2l_memory import ChunkConfig, DocumentTooLargeError, InvalidDocumentError
from d2l_memory.chunking import as_text, chunk_count, chunk_spans, chunk_text, render_messages, user_turn_affixes
from tiny import tiny_tokenizer


def test_affixes_come_from_the_chat_template() -> None:
    tok = tiny_tokenizer()
    affixes = user_turn_affixes(tok)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert tok.decode(affixes.prefix) + "hello" + tok.decode(affixes.suffix) == rendered
    assert tok.decode(affixes.prefix) == "<|im_start|>user\n"


def test_chunks_cover_the_document_in_order() -> None:
    tok = tiny_tokenizer()
    affixes = user_turn_affixes(tok)
    text = "Alice lives in Paris and works as a baker since 1999. " * 40
    ids = tok.encode(text, add_special_tokens=False)
    chunks = chunk_text(text, tok, ChunkConfig(chunk_tokens=50), affixes)
    assert len(chunks) == -(-len(ids) // 50)
    content: list[int] = []
    for chunk in chunks:
        start, end = chunk.span
        assert chunk.input_ids[: len(affixes.prefix)] == affixes.prefix
        assert chunk.input_ids[len(chunk.input_ids) - len(affixes.suffix) :] == affixes.suffix
        body = chunk.input_ids[len(affixes.prefix) : len(chunk.input_ids) - len(affixes.suffix)]
        assert list(body) == ids[start:end]
        content += body
    assert content == ids


@pytest.mark.parametrize(
    ("n_tokens", "expected"),
    [
        (1, 1),
        (32, 1),  # one minimum-size piece
        (33, 2),
        (200, 7),  # short: pieces of at most min_chunk_tokens
        (256, 8),
        (300, 8),  # at short_document_chunks: pieces grow past min_chunk_tokens instead
        (4096, 8),  # pieces have reached chunk_tokens
        (4097, 9),  # longer: chunk_tokens caps every piece
        (10_000, 20),
    ],
)
def test_short_documents_are_cut_finer_and_long_ones_at_the_cap(n_tokens: int, expected: int) -> None:
    config = ChunkConfig(chunk_tokens=512, min_chunk_tokens=32, short_document_chunks=8)
    assert chunk_count(n_tokens, config) == expected
    spans = chunk_spans(n_tokens, config)
    lengths = [end - start for start, end in spans]
    assert len(spans) == expected and spans[0][0] == 0 and spans[-1][1] == n_tokens
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
    assert max(lengths) - min(lengths) <= 1 and max(lengths) <= 512


def test_min_chunk_tokens_equal_to_chunk_tokens_gives_fixed_size_chunks() -> None:
    config = ChunkConfig(chunk_tokens=128, min_chunk_tokens=128)
    assert [chunk_count(n, config) for n in (1, 128, 129, 300, 1000)] == [1, 1, 2, 3, 8]


@pytest.mark.parametrize("field", ["chunk_tokens", "min_chunk_tokens", "short_document_chunks"])
def test_chunk_config_refuses_non_positive_sizes(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ChunkConfig(**{field: 0})


def test_documents_longer_than_the_window_are_chunked() -> None:
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 400  # far beyond the tiny 512-token window
    chunks = chunk_text(text, tok, ChunkConfig(chunk_tokens=128), user_turn_affixes(tok))
    assert len(chunks) > 10 and all(len(c.input_ids) <= 128 + 10 for c in chunks)


@pytest.mark.parametrize(
    "bad",
    ["", "   \n\t ", "text with a \x00 NUL", "\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x10" * 3, b"\xff\xfe\x00binary"],
)
def test_bad_documents_raise_typed_errors(bad: str | bytes) -> None:
    with pytest.raises(InvalidDocumentError):
        as_text(bad)


def test_non_text_sources_are_refused() -> None:
    with pytest.raises(InvalidDocumentError):
        as_text(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidDocumentError):
        as_text([{"role": "user"}])
    with pytest.raises(InvalidDocumentError):
        as_text([{"role": "user", "content": b"bytes"}])  # type: ignore[list-item]


def test_oversize_documents_fail_fast() -> None:
    tok = tiny_tokenizer()
    affixes = user_turn_affixes(tok)
    with pytest.raises(DocumentTooLargeError, match="max_document_chars"):
        chunk_text("a" * 101, tok, ChunkConfig(max_document_chars=100), affixes)
    with pytest.raises(DocumentTooLargeError, match="max_document_tokens"):
        chunk_text("the dog " * 100, tok, ChunkConfig(max_document_tokens=50), affixes)


def test_messages_render_as_a_transcript() -> None:
    messages = [{"role": "user", "content": "My dog is Rex."}, {"role": "assistant", "content": " Noted! "}]
    assert render_messages(messages) == "User: My dog is Rex.\nAssistant: Noted!"
    assert as_text(messages) == render_messages(messages)
    assert as_text("caf\u00e9".encode()) == "caf\u00e9"
