"""Prompts and decoding. The same prompt builder serves training, evaluation and the engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from threading import Event, Thread

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from d2l_memory.config import GenerationConfig
from d2l_memory.errors import DocumentTooLargeError
from d2l_memory.lora import AdapterLike, lora_scope, rows_of
from d2l_memory.prefix_cache import PrefixCache


def user_prompt(question: str, context: str | None = None) -> str:
    """The user turn: the question alone, or the document followed by the question."""
    return question if context is None else f"{context}\n\n{question}"


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: str | None = None,
    history: Sequence[dict[str, str]] = (),
) -> list[int]:
    """Token ids of a chat prompt ending where the assistant's answer starts."""
    messages = [*history, {"role": "user", "content": user_prompt(question, context)}]
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    if tokenizer.chat_template is None:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    else:
        text = str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    return tokenizer.encode(text, add_special_tokens=False)


def context_window(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def check_fits(model: PreTrainedModel, n_prompt: int, max_new_tokens: int) -> None:
    window = context_window(model)
    if n_prompt + max_new_tokens > window:
        raise DocumentTooLargeError(
            f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's {window}-token "
            "window; internalize the document as a memory instead of passing it as context"
        )


def _generate_kwargs(tokenizer: PreTrainedTokenizerBase, cfg: GenerationConfig) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "max_new_tokens": cfg.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def pad_after_prefix(
    prompts: Sequence[Sequence[int]], prefix_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out as [shared-length prefix][padding][rest]: the prefix columns line up with a stacked
    prefix KV cache, and masked padding in the middle leaves every token's position id unchanged."""
    rests = [p[prefix_length:] for p in prompts]
    longest = max(len(r) for r in rests)
    width = prefix_length + longest
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, (prompt, rest) in enumerate(zip(prompts, rests, strict=True)):
        ids[row, :prefix_length] = torch.tensor(prompt[:prefix_length], dtype=torch.long)
        ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[row, :prefix_length] = 1
        mask[row, width - len(rest) :] = 1
    return ids, mask


def batch_inputs(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    adapters: AdapterLike | Sequence[AdapterLike | None] | None,
    prefix_cache: PrefixCache | None,
    prefix_length: int,
) -> dict[str, object]:
    """``generate`` inputs: left-padded rows, or rows whose first ``prefix_length`` tokens come from the
    prefix cache (computed under each row's adapter and stored on a miss)."""
    cache = None
    if prefix_cache is not None and prefix_length > 0:
        if any(len(p) <= prefix_length for p in prompts):
            raise ValueError("every prompt needs at least one token after the cached prefix")
        cache = prefix_cache.states(model, [p[:prefix_length] for p in prompts], rows_of(adapters, len(prompts)))
    ids, mask = left_pad(prompts, pad_id) if cache is None else pad_after_prefix(prompts, prefix_length, pad_id)
    device = model.get_input_embeddings().weight.device
    inputs: dict[str, object] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if cache is not None:
        inputs["cache"] = cache
    return inputs


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    adapters: AdapterLike | Sequence[AdapterLike | None] | None = None,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix_length: int = 0,
) -> tuple[list[str], list[int]]:
    """Decode a batch of prompts, one adapter for all rows or one per row.

    With a ``prefix_cache``, every row's first ``prefix_length`` tokens are not recomputed but taken
    from (or added to) the cache. Returns the answers and how many tokens each generated.
    """
    for prompt in prompts:
        check_fits(model, len(prompt), cfg.max_new_tokens)
    inputs = batch_inputs(model, prompts, tokenizer.pad_token_id, adapters, prefix_cache, prefix_length)
    with lora_scope(model, adapters):
        out = model.generate(**inputs, **_generate_kwargs(tokenizer, cfg))
    new = out[:, inputs["input_ids"].shape[1] :]
    answers, counts = [], []
    for row in new:
        tokens = [t for t in row.tolist() if t not in (tokenizer.pad_token_id, tokenizer.eos_token_id)]
        counts.append(len(tokens))
        answers.append(cut_at_stops(tokenizer.decode(tokens, skip_special_tokens=True), cfg.stop).strip())
    return answers, counts


def stream_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[int],
    cfg: GenerationConfig,
    adapter: AdapterLike | None = None,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix_length: int = 0,
) -> Iterator[str]:
    """Yield text pieces as they are decoded. The adapter is active only in the decoding thread's scope."""
    check_fits(model, len(prompt), cfg.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = batch_inputs(model, [prompt], tokenizer.pad_token_id, adapter, prefix_cache, prefix_length)
    errors: list[BaseException] = []
    cancelled = Event()

    def run() -> None:
        try:
            with torch.inference_mode(), lora_scope(model, adapter):
                model.generate(**inputs, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                               **_generate_kwargs(tokenizer, cfg))
        except BaseException as exc:  # surfaced to the consumer below
            errors.append(exc)
            streamer.end()

    worker = Thread(target=run, daemon=True)
    worker.start()
    emitted = ""
    try:
        for piece in streamer:
            if cfg.stop:
                candidate = cut_at_stops(emitted + piece, cfg.stop)
                if len(candidate) < len(emitted + piece):
                    if candidate[len(emitted):]:
                        yield candidate[len(emitted):]
                    break
            emitted += piece
            if piece:
                yield piece
    finally:
        # A stop string, an error or the consumer closing the iterator ends decoding now: the
        # adapter scope must be gone before the caller (and the engine lock) moves on.
        cancelled.set()
        worker.join()
    if errors:
        raise errors[0]


class _Cancelled(StoppingCriteria):
    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> bool:
        return self.event.is_set()
