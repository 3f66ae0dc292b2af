from __future__ import annotations

import pytest

from d2l_memory import ChunkConfig, DocumentTooLargeError, InvalidDocumentError
from d2l_memory.chunking import as_text, chunk_text, render_messages, user_turn_affixes
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
