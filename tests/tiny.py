"""Tiny, seeded, in-process models and tokenizers for fast unit tests (no downloads, no weights)."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from d2l_memory.base_model import LoadedBaseModel, wrap_base_model
from d2l_memory.checkpoint import hypernet_id_of
from d2l_memory.config import ChunkConfig, GenerationConfig, HypernetConfig
from d2l_memory.engine import MemoryEngine, default_hypernet_config
from d2l_memory.hypernet import HyperLoRA
from d2l_memory.prefix_cache import PrefixCacheConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice lives in Paris and works as a baker since 1999.",
    "What is the favourite colour of Bob? It is teal.",
    "Tool docs: call search(query, limit=10) to find items; errors raise NotFound.",
    "0 1 2 3 4 5 6 7 8 9 user assistant system",
] * 20


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(
    seed: int = 0, layers: int = 2, hidden: int = 32, tie: bool = True, init_range: float = 0.02
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=init_range,
        pad_token_id=tiny_tokenizer().pad_token_id,
        eos_token_id=tiny_tokenizer().eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_base(seed: int = 0, **kwargs: object) -> LoadedBaseModel:
    return wrap_base_model(tiny_model(seed, **kwargs), tiny_tokenizer(), name=f"tiny-{seed}")


def tiny_hypernet_config(model: LlamaForCausalLM, rank: int = 4, **overrides: object) -> HypernetConfig:
    settings: dict[str, object] = {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64, **overrides}
    return default_hypernet_config(model, ("mlp.down_proj",), rank, **settings)


def tiny_hypernet(model: LlamaForCausalLM, seed: int = 0, **overrides: object) -> HyperLoRA:
    """A random hypernetwork whose B scale is non-zero, so its adapters actually change outputs."""
    torch.manual_seed(seed)
    net = HyperLoRA(tiny_hypernet_config(model, **overrides))
    with torch.no_grad():
        for head in net.heads.values():
            head.scale_b.fill_(0.5)
    return net.eval()


def tiny_engine(
    seed: int = 0,
    chunk_tokens: int = 16,
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig(),
    init_range: float = 0.02,
    **overrides: object,
) -> MemoryEngine:
    base = tiny_base(seed, init_range=init_range)
    net = tiny_hypernet(base.model, seed, **overrides)
    return MemoryEngine(
        base, net, hypernet_id=hypernet_id_of(net), chunking=ChunkConfig(chunk_tokens=chunk_tokens),
        generation=GenerationConfig(max_new_tokens=8), prefix_cache=prefix_cache,
    )
