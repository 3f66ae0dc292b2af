"""Write and read costs of D2L memory against in-context prompting and context distillation.

    d2l-memory bench [--lengths 512 1024 ...] [--quick] [--benchmarks]

Everything is measured in one run on one machine and reported as ratios:
- write: internalizing a document vs one in-context prefill of it vs context distillation;
- read: time to first token and decode speed with the adapter vs with the document in the prompt;
- memory: adapter bytes vs KV-cache bytes (computed from the config, checked against the cache
  tensors of a real prefill);
- serving: a batch of B requests each with its own adapter vs the base model, and adapter swap time;
- chat prefix: time to first token after a fixed system prompt, with and without reusing its KV cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from d2l_memory import MemoryEngine
from d2l_memory.evaluation.distill import DistillConfig, context_distill
from d2l_memory.generation import context_window, left_pad, prompt_ids
from d2l_memory.lora import lora_scope, stack_per_row
from d2l_memory.prefix_cache import PrefixCacheConfig
from d2l_memory.reporting import save_figure, with_artifacts
from d2l_memory.training.synth import haystack_corpus

logger = logging.getLogger("benchmarks.perf")
QUESTION = "What is the special magic number mentioned in the text?"
DECODE_TOKENS = 32
LENGTH_COLUMNS = (
    "doc tokens", "chunks / rank", "internalize s, fp32 encoder", "internalize s, bf16 encoder (adapter Δ from fp32)",
    "in-context prefill s", "context distillation s", "TTFT adapter s", "TTFT in-context s", "decode tok/s adapter",
    "decode tok/s in-context", "adapter MB fp16", "KV MB fp16 (computed / measured)",
)


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """Result of the last call and the median wall time over ``repeat`` calls."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def document(engine: MemoryEngine, n_tokens: int) -> str:
    ids = engine.tokenizer.encode(haystack_corpus()[: n_tokens * 8], add_special_tokens=False)[:n_tokens]
    return engine.tokenizer.decode(ids)


def kv_bytes_per_token(engine: MemoryEngine, bytes_per_value: int = 2) -> int:
    cfg = engine.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * bytes_per_value


def measured_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers cache object."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def prefill(engine: MemoryEngine, prompt: list[int], adapter: Any = None) -> Any:
    """The KV cache of ``prompt`` and the first token's logits, as ``generate`` computes them: the output
    head runs on the last position only (over every position it would add ~20% to a long prefill and
    flatter every ratio against in-context)."""
    ids = torch.tensor([prompt])
    with lora_scope(engine.model, adapter):
        return engine.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache


@torch.inference_mode()
def decode(engine: MemoryEngine, prompts: list[list[int]], adapters: Any, n_new: int) -> None:
    ids, mask = left_pad(prompts, engine.tokenizer.pad_token_id)
    with lora_scope(engine.model, adapters):
        engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)


@torch.inference_mode()
def decode_speed(
    engine: MemoryEngine, prompt: list[int], adapter: Any, forward: Callable[..., Any] | None = None
) -> float:
    """Greedy decode steps per second after one prefill, reusing its KV cache (prefill not counted).

    ``forward`` runs the model's steps (default: the model itself; the compile rows pass
    ``torch.compile(model)``); the adapter's hooks sit on the model's modules either way."""
    step = engine.model if forward is None else forward
    with lora_scope(engine.model, adapter):
        out = step(input_ids=torch.tensor([prompt]), use_cache=True)
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = out.logits[:, -1:].argmax(-1)
            out = step(input_ids=token, cache=out.cache, use_cache=True)
        return DECODE_TOKENS / (time.perf_counter() - start)


def bench_compile(engine: MemoryEngine) -> dict[str, Any]:
    """Decode speed of ``torch.compile(model)`` against eager, and whether the compiled model still
    applies an adapter.

    It does not: the adapter is a set of forward hooks added for the call, and by default dynamo does
    not guard on hooks added after compilation, so the compiled graph silently runs the base model
    (unless something else happens to force a recompilation while the hooks are present: then they
    are traced in, by accident). That is why the engine offers no compile option. The check compares
    logits with an adapter active, compiled against eager; speed is measured for the base model only,
    as a compiled adapter run would time the wrong computation. The first compiled call (the
    compilation of the prefill) is timed apart."""
    memory = engine.internalize(document(engine, 400), progress=False)
    prompt = prompt_ids(engine.tokenizer, QUESTION)
    ids = torch.tensor([prompt])
    compiled = torch.compile(engine.model, dynamic=True)
    with torch.inference_mode():
        # Compile on a plain call, then make the same call with an adapter active: the case of a model
        # compiled once and then used with memories.
        plain, first_s = timed(lambda: compiled(input_ids=ids, use_cache=True).logits)
        with lora_scope(engine.model, memory):
            eager = engine.model(input_ids=ids, use_cache=True).logits
            traced = compiled(input_ids=ids, use_cache=True).logits
    row: dict[str, Any] = {"first_compiled_call_s": first_s}
    row["adapter_effect_eager"] = float((eager - plain).abs().max())
    row["compiled_vs_eager_with_adapter"] = float((traced - eager).abs().max())
    tolerance = 1e-3 * max(row["adapter_effect_eager"], 1e-6)
    row["compiled_applies_adapter"] = row["compiled_vs_eager_with_adapter"] < tolerance
    row["eager_tok_s_base"] = decode_speed(engine, prompt, None)
    decode_speed(engine, prompt, None, compiled)  # the decode-step shapes compile here
    row["compiled_tok_s_base"] = statistics.median(decode_speed(engine, prompt, None, compiled) for _ in range(3))
    return row


def relative_l2(reference: Any, other: Any) -> float:
    """‖other − reference‖ / ‖reference‖ over every factor of two adapters of the same shape."""
    diff = sum(float((o - r).pow(2).sum()) for name in reference.weights
               for r, o in zip(reference.weights[name], other.weights[name]))
    norm = sum(float(r.pow(2).sum()) for pair in reference.weights.values() for r in pair)
    return (diff / norm) ** 0.5 if norm else float("nan")


def bench_length(
    engine: MemoryEngine, bf16_engine: MemoryEngine, n_tokens: int, distill_steps: int | None
) -> dict[str, Any]:
    text = document(engine, n_tokens)
    window = context_window(engine.model)
    in_context = prompt_ids(engine.tokenizer, QUESTION, text)
    fits = len(in_context) + DECODE_TOKENS <= window
    bare = prompt_ids(engine.tokenizer, QUESTION)
    row: dict[str, Any] = {"tokens": n_tokens, "in_context_fits": fits}

    repeat = 3 if n_tokens <= 2048 else 1  # medians where a run is short enough to repeat
    memory, row["internalize_s"] = timed(lambda: engine.internalize(text, progress=False), repeat=repeat)
    row["chunks"], row["rank"] = memory.n_chunks, memory.rank
    # The opt-in bf16 encoder pass: same hypernetwork, its own timing and its distance from fp32.
    fast, row["internalize_bf16_s"] = timed(lambda: bf16_engine.internalize(text, progress=False), repeat=repeat)
    row["adapter_bf16_rel_l2"] = relative_l2(memory, fast)
    row["adapter_bytes_fp16"] = memory.to(dtype=torch.float16).nbytes
    row["kv_bytes_fp16_computed"] = kv_bytes_per_token(engine) * len(in_context)
    # Read: time to first token = prefill of the prompt; decode speed = the extra tokens of a long
    # generation over a one-token one, so the prefill cancels out of the same kind of call.
    _, row["ttft_adapter_s"] = timed(lambda: prefill(engine, bare, memory), repeat=3)
    row["decode_tok_s_adapter"] = decode_speed(engine, bare, memory)
    if fits:
        cache, row["prefill_in_context_s"] = timed(lambda: prefill(engine, in_context), repeat=repeat)
        row["ttft_in_context_s"] = row["prefill_in_context_s"]
        row["kv_bytes_fp16_measured"] = measured_cache_bytes(cache) * 2 // cache_element_size(cache)
        del cache
        row["decode_tok_s_in_context"] = decode_speed(engine, in_context, None)
    if distill_steps:
        _, row["distill_s"] = timed(lambda: context_distill(engine, text, DistillConfig(steps=distill_steps)))
        row["distill_steps"] = distill_steps
    return row


def cache_element_size(cache: Any) -> int:
    for layer in getattr(cache, "layers", []):
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            return layer.keys.element_size()
    return 2


def bench_serving(engine: MemoryEngine, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    texts = [document(engine, 400)[i * 50 :] for i in range(max(batch_sizes))]
    memories = [engine.internalize(t, progress=False) for t in texts]
    prompt = prompt_ids(engine.tokenizer, QUESTION)
    out: dict[str, Any] = {"decode_tokens": DECODE_TOKENS, "batches": []}
    for b in batch_sizes:
        _, t_base = timed(lambda: decode(engine, [prompt] * b, None, DECODE_TOKENS))
        _, t_lora = timed(lambda: decode(engine, [prompt] * b, memories[:b], DECODE_TOKENS))
        out["batches"].append({"batch": b, "base_tok_s": b * DECODE_TOKENS / t_base,
                               "per_row_adapters_tok_s": b * DECODE_TOKENS / t_lora})
    # Swapping = stacking the new rows' factors and registering hooks; the base weights are untouched.
    def swap() -> None:
        with lora_scope(engine.model, stack_per_row(memories[: max(batch_sizes)])):
            pass

    _, out["swap_s_batch_max"] = timed(swap, repeat=20)
    return out


def bench_prefix(engine: MemoryEngine, plain: MemoryEngine, prefix_tokens: tuple[int, ...]) -> list[dict[str, Any]]:
    """TTFT of an agent-style call: a fixed system prompt (tool docs) + a question, with an adapter.

    ``plain`` is the same engine with prefix reuse off. "first call" clears the cache first, so it pays
    the prefix prefill and stores it; "later calls" find it (a new adapter object with the same weights
    each time, as the provider's recall builds one per call).
    """
    memory = engine.internalize(document(engine, 400), progress=False)
    rows = []
    for n in prefix_tokens:
        system = [{"role": "system", "content": document(engine, n)}]

        def ask(on: MemoryEngine) -> None:
            on.complete(QUESTION, memory=memory.select_chunks(range(memory.n_chunks)), history=system, max_new_tokens=1)

        def first_call() -> None:
            engine.prefix_cache.clear()
            ask(engine)

        _, off = timed(lambda: ask(plain), repeat=3)
        _, cold = timed(first_call, repeat=3)
        _, warm = timed(lambda: ask(engine), repeat=3)
        rows.append({"prefix_tokens": engine.count_prompt_tokens(QUESTION, history=system), "ttft_no_reuse_s": off,
                     "ttft_first_call_s": cold, "ttft_reused_s": warm})
    return rows


def verdicts(
    rows: list[dict[str, Any]], serving: dict[str, Any], default_encoder: str
) -> list[tuple[str, str, bool | None]]:
    by_len = {r["tokens"]: r for r in rows}
    checks: list[tuple[str, str, bool | None]] = []
    for key, encoder in (("internalize_s", "float32"), ("internalize_bf16_s", "bfloat16")):
        ratios = [r[key] / r["prefill_in_context_s"] for r in rows if "prefill_in_context_s" in r and key in r]
        if ratios:
            label = f"internalize ≤ one in-context prefill, {encoder} encoder"
            label += " (the engine's default for this checkpoint)" if encoder == default_encoder else ""
            checks.append((label, f"worst {max(ratios):.2f}× prefill", max(ratios) <= 1.0))
    cd = [r["distill_s"] / r["internalize_s"] for r in rows if "distill_s" in r]
    if cd:
        checks.append(("internalize ≥ 100× cheaper than context distillation", f"min {min(cd):.0f}×", min(cd) >= 100))
    r4 = by_len.get(4096)
    if r4 and "ttft_in_context_s" in r4:
        ratio = r4["ttft_in_context_s"] / r4["ttft_adapter_s"]
        checks.append(("4K: TTFT with adapter ≥ 20× shorter", f"{ratio:.1f}×", ratio >= 20))
    if r4:
        ratio = r4["kv_bytes_fp16_computed"] / r4["adapter_bytes_fp16"]
        checks.append(("4K: adapter (fp16) ≥ 20× smaller than KV cache (fp16)", f"{ratio:.1f}×", ratio >= 20))
    b16 = [b for b in serving.get("batches", []) if b["batch"] == 16]
    if b16:
        share = b16[0]["per_row_adapters_tok_s"] / b16[0]["base_tok_s"]
        checks.append(("16 adapters in one batch ≥ 60% of base throughput", f"{100 * share:.0f}%", share >= 0.6))
    return checks


def markdown(result: dict[str, Any]) -> str:
    rows, serving = result["lengths"], result["serving"]

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = [
        "## Performance: write and read costs",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; base model `{result['base_model']}`, "
        f"chunk size {result['chunk_tokens']} tokens, fp32 weights, greedy decoding of {DECODE_TOKENS} tokens. "
        f"In-context numbers exist only where the document fits the {result['window']}-token window. "
        "Internalizing runs the encoder pass in fp32 and in bf16; the engine's default for this checkpoint is "
        f"{result.get('default_encoder', 'float32')} (the dtype it was trained with); every "
        "other column uses the fp32 adapters.",
        "",
        "| " + " | ".join(LENGTH_COLUMNS) + " |",
        "|" + "---|" * len(LENGTH_COLUMNS),
    ]
    for r in rows:
        measured = r.get("kv_bytes_fp16_measured")
        cells = [
            str(r["tokens"]), f"{r['chunks']} / {r['rank']}", f(r["internalize_s"]),
            f"{f(r.get('internalize_bf16_s'))} ({f(r.get('adapter_bf16_rel_l2'), '{:.1%}')})",
            f(r.get("prefill_in_context_s")), f(r.get("distill_s")),
            f(r["ttft_adapter_s"], "{:.3f}"), f(r.get("ttft_in_context_s"), "{:.3f}"),
            f(r["decode_tok_s_adapter"], "{:.1f}"), f(r.get("decode_tok_s_in_context"), "{:.1f}"),
            f"{r['adapter_bytes_fp16'] / 1e6:.2f}",
            f"{r['kv_bytes_fp16_computed'] / 1e6:.1f} / {f(measured and measured / 1e6, '{:.1f}')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Serving (each row of the batch has its own adapter):", "",
              "| batch | base tok/s | per-row adapters tok/s | share |", "|---|---|---|---|"]
    for b in serving["batches"]:
        lines.append(f"| {b['batch']} | {b['base_tok_s']:.1f} | {b['per_row_adapters_tok_s']:.1f} | "
                     f"{100 * b['per_row_adapters_tok_s'] / b['base_tok_s']:.0f}% |")
    if result.get("prefix"):
        lines += ["", "Chat prefix reuse (a fixed system prompt + the question, with an adapter; time to first token, "
                  "median of 3; the first call stores the prefix's KV cache, later calls reuse it):", "",
                  "| prompt tokens | no reuse s | first call s | later calls s | later calls vs no reuse |",
                  "|---|---|---|---|---|"]
        for p in result["prefix"]:
            lines.append(f"| {p['prefix_tokens']} | {p['ttft_no_reuse_s']:.3f} | {p['ttft_first_call_s']:.3f} | "
                         f"{p['ttft_reused_s']:.3f} | {p['ttft_no_reuse_s'] / p['ttft_reused_s']:.1f}× shorter |")
    if result.get("compile"):
        c = result["compile"]
        lines += ["", f"`torch.compile(model)` (`--compile`): base-model decode {c['eager_tok_s_base']:.1f} → "
                  f"{c['compiled_tok_s_base']:.1f} tok/s ({c['compiled_tok_s_base'] / c['eager_tok_s_base']:.2f}×) "
                  f"after {c['first_compiled_call_s']:.0f} s of compilation (prefill shapes). With an adapter active "
                  f"the compiled model's logits differ from eager by {c['compiled_vs_eager_with_adapter']:.3g} "
                  f"(the adapter itself moves them by {c['adapter_effect_eager']:.3g}): it "
                  + ("applies" if c["compiled_applies_adapter"] else "**ignores**") + " the adapter."]
    lines += ["", f"Adapter swap (stack {max(b['batch'] for b in serving['batches'])} adapters + register hooks): "
              f"{1e3 * serving['swap_s_batch_max']:.1f} ms; base weights are never copied or modified.", "",
              "| target | measured | verdict |", "|---|---|---|"]
    for name, value, ok in result["verdicts"]:
        lines.append(f"| {name} | {value} | {'met' if ok else 'MISSED'} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["lengths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = [r["tokens"] for r in rows]
    left.plot(xs, [r["internalize_s"] for r in rows], marker="o", label="internalize (D2L)")
    fit = [r for r in rows if "prefill_in_context_s" in r]
    left.plot([r["tokens"] for r in fit], [r["prefill_in_context_s"] for r in fit], marker="s",
              label="in-context prefill")
    cd = [r for r in rows if "distill_s" in r]
    if cd:
        left.plot([r["tokens"] for r in cd], [r["distill_s"] for r in cd], marker="^", label="context distillation")
    left.plot(xs, [r["ttft_adapter_s"] for r in rows], marker="x", label="TTFT with adapter")
    left.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="seconds", title="Write and read time")
    left.legend(fontsize=8)
    right.plot(xs, [r["adapter_bytes_fp16"] / 1e6 for r in rows], marker="o", label="adapter (fp16)")
    right.plot(xs, [r["kv_bytes_fp16_computed"] / 1e6 for r in rows], marker="s", label="KV cache (fp16)")
    right.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="MB", title="Memory per document")
    right.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--distill-lengths", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prefix-tokens", type=int, nargs="*", default=[512, 2048],
                        help="system-prompt lengths for the chat prefix reuse rows")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile(model): base decode speed and whether it applies adapters "
                             "(compilation takes minutes on CPU)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="override the engine's chunk size")
    parser.add_argument("--hypernet", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--benchmarks", action="store_true", help="write the results into BENCHMARKS.md")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv

    default = MemoryEngine.from_pretrained(hypernet=args.hypernet)  # encoder dtype as the checkpoint was trained
    default_encoder = str(default.encoder_autocast or torch.float32).removeprefix("torch.")
    chunking = default.chunking
    if args.chunk_tokens:
        from dataclasses import replace

        chunking = replace(chunking, chunk_tokens=args.chunk_tokens)
    # Both encoder dtypes on one loaded model: fp32 is the reference every other column uses.
    engine, bf16_engine = (MemoryEngine(default.base, default.hypernet, hypernet_id=default.hypernet_id,
                                        chunking=chunking, encoder_autocast=dtype) for dtype in (None, torch.bfloat16))
    engine.internalize(document(engine, 256), progress=False)  # warm-up: first-call allocations
    bf16_engine.internalize(document(engine, 256), progress=False)
    rows = []
    for n in args.lengths:
        logger.info("benchmarking %d tokens", n)
        rows.append(bench_length(engine, bf16_engine, n, args.distill_steps if n in args.distill_lengths else None))
    serving = bench_serving(engine, tuple(args.batches))
    plain = MemoryEngine(default.base, default.hypernet, hypernet_id=default.hypernet_id, chunking=chunking,
                         prefix_cache=PrefixCacheConfig(enabled=False))
    prefix = bench_prefix(engine, plain, tuple(args.prefix_tokens))
    compiled = bench_compile(engine) if args.compile else None
    result = {
        "command": "d2l-memory bench " + shlex.join(argv_used),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "base_model": engine.base_model_id, "hypernet": engine.hypernet_id,
        "chunk_tokens": engine.chunking.chunk_tokens, "window": context_window(engine.model),
        "lengths": rows, "serving": serving, "prefix": prefix, "compile": compiled,
    }  # fmt: skip
    result["default_encoder"] = default_encoder
    result["verdicts"] = verdicts(rows, serving, default_encoder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(result, indent=1))
    text = with_artifacts(markdown(result), out / "perf.json", ("performance", plot(result, out / "perf.png")))
    (out / "perf.md").write_text(text + "\n")
    print(text)
    if args.benchmarks:
        from d2l_memory.reporting import replace_section

        replace_section(Path("BENCHMARKS.md"), "perf", text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
