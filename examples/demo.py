"""Internalize a document into a LoRA adapter, then answer questions three ways, side by side.

    make demo                      # or: .venv/bin/python examples/demo.py [--document FILE --question Q ...]

1. no context: the base model alone;
2. in context: the whole document in the prompt (classic prompting);
3. adapter only: the document's D2L adapter is active, the prompt holds only the question.

Runs offline on the defaults: SmolLM2-135M-Instruct and the hypernetwork shipped in the package.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
import time
from pathlib import Path

import torch

from d2l_memory import MemoryEngine
from d2l_memory.generation import prompt_ids

SAMPLE_DOCUMENT = """\
Orvane Tessaly lives in Brakmoor and works for Quillfen Logistics. Orvane was born in 1987.
Orvane's badge number is 4821. Orvane's favourite colour is teal, and Orvane plays the cello.
Orvane's sister is Mirel Tessaly. Mirel lives in Dastow and works as a pharmacist.
Tool `sync_ledger(batch_size=64, retries=3)` reconciles the warehouse ledger.
If the ledger is locked it raises `LedgerBusyError`."""

SAMPLE_QUESTIONS = (
    "Where does Orvane Tessaly live?",
    "What is Orvane Tessaly's badge number?",
    "Which instrument does Orvane Tessaly play?",
    "What is the default value of retries in sync_ledger?",
)


def kv_cache_bytes(engine: MemoryEngine, n_tokens: int, bytes_per_value: int = 2) -> int:
    """fp16 KV cache the document would occupy in the prompt: 2 (K, V) · layers · kv heads · head dim."""
    cfg = engine.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * n_tokens * bytes_per_value


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201 - tiny helper
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--document", type=Path, help="text file to internalize (default: a built-in sample)")
    parser.add_argument("--question", action="append", help="question to ask (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    document = args.document.read_text() if args.document else SAMPLE_DOCUMENT
    questions = tuple(args.question or SAMPLE_QUESTIONS)

    print("Loading the base model and hypernetwork (offline)...")
    engine, load_s = timed(MemoryEngine.from_pretrained)
    trained = engine.hypernet_trained
    print(f"  loaded in {load_s:.1f} s; hypernetwork {engine.hypernet_id}"
          + ("" if trained else "  (UNTRAINED: adapter answers equal the base model's)"))

    memory, write_s = timed(engine.internalize, document)
    n_doc_tokens = len(engine.tokenizer.encode(document, add_special_tokens=False))
    print(f"\nInternalized a {n_doc_tokens}-token document in {write_s:.2f} s: {memory.n_chunks} chunk(s), "
          f"rank {memory.rank}, adapter {memory.to(dtype=torch.float16).nbytes / 1e6:.2f} MB fp16 "
          f"(the document's KV cache would be {kv_cache_bytes(engine, n_doc_tokens) / 1e6:.2f} MB fp16)")

    modes = {
        "no context": {},
        "document in prompt": {"context": document},
        "adapter only": {"memory": memory},
    }
    for question in questions:
        print(f"\nQ: {question}")
        for label, kwargs in modes.items():
            n_prompt = len(prompt_ids(engine.tokenizer, question, kwargs.get("context")))
            answer, seconds = timed(engine.generate, question, max_new_tokens=args.max_new_tokens, **kwargs)
            short = textwrap.shorten(answer.replace("\n", " "), width=90, placeholder=" ...")
            print(f"  {label:<19} {seconds:5.2f} s  {n_prompt:4d} prompt tokens | {short}")


if __name__ == "__main__":
    main()
