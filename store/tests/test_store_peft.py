"""PEFT export and import against stock `peft` and `transformers`, on a tiny random Llama built in
process: an exported memory loads with `PeftModel.from_pretrained` and gives the same logits as
adding ΔW = B @ A to the weights by hand (and as d2l_memory's own `lora_scope`, when installed),
with or without padding the rank up to one vLLM accepts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from store_testing import BASE, HYPER, assert_same_tensors

from d2l_store import VLLM_RANKS, AdapterStore, InvalidAdapterError, Scope
from d2l_store.peft_format import vllm_rank

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [
    # The adapter covers o_proj in layer 1 only; peft injects a no-op (B = 0) LoRA into layer 0's
    # o_proj too, since target_modules holds short names (what vLLM and SGLang expect), and says so.
    pytest.mark.filterwarnings("ignore:Found missing adapter keys"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
T = Scope(tenant="acme")
MODULES = {  # module path -> (d_in, d_out) in the tiny model below
    **{f"model.layers.{i}.self_attn.q_proj": (32, 32) for i in range(2)},
    **{f"model.layers.{i}.self_attn.v_proj": (32, 16) for i in range(2)},
    "model.layers.1.self_attn.o_proj": (32, 32),
    **{f"model.layers.{i}.mlp.down_proj": (64, 32) for i in range(2)},
}


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def _adapter(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (d_in, d_out) in MODULES.items():
        out[f"{path}.lora_A"] = torch.randn(rank, d_in, generator=g) * 0.3
        out[f"{path}.lora_B"] = torch.randn(d_out, rank, generator=g) * 0.3
    return out


@torch.no_grad()
def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


@torch.no_grad()
def _merged(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with W += B @ A for every module of the adapter."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    for key, a in tensors.items():
        if key.endswith(".lora_A"):
            path = key.removesuffix(".lora_A")
            modules[path].weight += tensors[path + ".lora_B"].float() @ a.float()
    return merged


@pytest.mark.parametrize("pad", [False, True], ids=["exact-rank", "vllm-padded"])
def test_export_loads_in_peft_with_the_same_logits(
    sqlite_store: AdapterStore, tiny_llama: torch.nn.Module, tokens: torch.Tensor, tmp_path: Path, pad: bool
) -> None:  # fmt: skip
    tensors = _adapter(rank=6)
    rec = sqlite_store.put(tensors, scope=T, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=2,
                           chunk_spans=[(0, 4), (4, 9), (9, 11)])  # fmt: skip
    out = sqlite_store.export_peft(
        rec.id, tmp_path / "peft", pad_rank_to_vllm=pad, base_model_name_or_path="tiny-llama"
    )

    config = json.loads((out / "adapter_config.json").read_text())
    r = 8 if pad else 6
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (r, r, "LORA")
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    state = load_file(out / "adapter_model.safetensors")  # stock safetensors reads our encoder's files
    assert len(state) == 2 * len(MODULES)
    for path, (d_in, d_out) in MODULES.items():
        assert state[f"base_model.model.{path}.lora_A.weight"].shape == (r, d_in)
        assert state[f"base_model.model.{path}.lora_B.weight"].shape == (d_out, r)

    base = _logits(tiny_llama, tokens)
    want = _logits(_merged(tiny_llama, tensors), tokens)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter does something
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(out)).eval()
    torch.testing.assert_close(_logits(peft_model, tokens), want, atol=1e-5, rtol=1e-5)

    try:
        from d2l_memory.lora import lora_scope
    except ImportError:
        return  # d2l-store alone: nothing more to compare with
    _, stored = sqlite_store.get(rec.id)
    pairs = {k.removesuffix(".lora_A"): (v, stored[k.removesuffix(".lora_A") + ".lora_B"])
             for k, v in stored.items() if k.endswith(".lora_A")}  # fmt: skip
    with lora_scope(tiny_llama, pairs):
        ours = _logits(tiny_llama, tokens)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(tiny_llama, tokens), base, atol=0, rtol=0)  # restored on exit


@pytest.mark.parametrize("rslora", [False, True])
def test_import_of_a_stock_peft_adapter(sqlite_store: AdapterStore, tiny_llama: torch.nn.Module, tokens: torch.Tensor,
                                        tmp_path: Path, rslora: bool) -> None:  # fmt: skip
    """A folder saved by peft itself (its scale alpha / r, or alpha / sqrt(r)) stores with the scale
    folded into B, so applying the stored tensors directly reproduces peft's logits."""
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                          use_rslora=rslora, lora_dropout=0.0)  # fmt: skip
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(tiny_llama), cfg).eval()
    model.save_pretrained(tmp_path / "stock")
    rec = sqlite_store.import_peft(tmp_path / "stock", scope=T, kind="tool_doc", base_model=BASE, hypernet=HYPER)
    assert (rec.rank, rec.n_chunks, rec.n_modules) == (4, 1, 4)
    _, stored = sqlite_store.get(rec.id)
    torch.testing.assert_close(
        _logits(_merged(tiny_llama, stored), tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5
    )


def test_import_restores_chunking_and_removes_padding(sqlite_store: AdapterStore, tmp_path: Path) -> None:
    tensors = _adapter(rank=6, seed=2)
    rec = sqlite_store.put(tensors, scope=T, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=3,
                           chunk_spans=[(0, 7), (7, 12)])  # fmt: skip
    out = sqlite_store.export_peft(rec.id, tmp_path / "padded", pad_rank_to_vllm=True)
    back = sqlite_store.import_peft(out, scope=Scope(tenant="other"), kind="document", base_model=BASE, hypernet=HYPER)
    assert (back.rank, back.rank_per_chunk, back.chunk_spans) == (6, 3, ((0, 7), (7, 12)))
    assert_same_tensors(sqlite_store.get(back.id)[1], tensors)


def test_vllm_ranks() -> None:
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 17, 64, 300, 320, 512)] == [1, 8, 8, 16, 32, 64, 320, 320, 512]
    assert all(vllm_rank(r) == r for r in VLLM_RANKS)
    with pytest.raises(InvalidAdapterError, match="512"):
        vllm_rank(513)


def test_padding_refuses_ranks_vllm_cannot_serve(sqlite_store: AdapterStore, tmp_path: Path) -> None:
    t = {"m.lora_A": torch.randn(520, 2), "m.lora_B": torch.randn(2, 520)}
    rec = sqlite_store.put(t, scope=T, kind="document", base_model=BASE, hypernet=HYPER, rank_per_chunk=8,
                           chunk_spans=[(i, i + 1) for i in range(65)])  # fmt: skip
    with pytest.raises(InvalidAdapterError, match="vLLM"):
        sqlite_store.export_peft(rec.id, tmp_path / "x", pad_rank_to_vllm=True)
    unpadded = sqlite_store.export_peft(rec.id, tmp_path / "y")
    assert json.loads((unpadded / "adapter_config.json").read_text())["r"] == 520


def test_unsupported_peft_folders_are_refused(sqlite_store: AdapterStore, tmp_path: Path) -> None:
    rec = sqlite_store.put(_adapter(rank=2), scope=T, kind="document", base_model=BASE, hypernet=HYPER,
                           rank_per_chunk=2, chunk_spans=[(0, 1)])  # fmt: skip
    out = sqlite_store.export_peft(rec.id, tmp_path / "p")
    config = json.loads((out / "adapter_config.json").read_text())
    for change in (
        {"use_dora": True}, {"peft_type": "IA3"}, {"modules_to_save": ["lm_head"]}, {"rank_pattern": {"q_proj": 4}}
    ):
        (out / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(InvalidAdapterError):
            sqlite_store.import_peft(out, scope=T, kind="document", base_model=BASE, hypernet=HYPER)
