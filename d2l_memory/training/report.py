"""A run's training record as a BENCHMARKS.md section: config, compute, loss and held-out accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2l_memory.training.export import read_log, training_compute


def _window_mean(records: list[dict[str, Any]], key: str, end: int, width: int) -> float:
    window = [r[key] for r in records if end - width < r["step"] <= end]
    return sum(window) / len(window) if window else float("nan")


def _schedule(config: dict[str, Any]) -> str:
    start = config.get("schedule_start", 0)
    cycle = f"warm-up {config['warmup_steps']}, cosine to ×{config['min_lr_ratio']}"
    if start:
        return f"warm restart at step {start}: {cycle} by step {config['steps']}"
    return f"{cycle} over {config['steps']} steps"


def _mix(config: dict[str, Any]) -> str:
    weights = config.get("domain_weights", {})
    return ", ".join(f"{name} {weight:g}" for name, weight in weights.items()) or "default"


def _chunks(config: dict[str, Any]) -> str:
    drawn = "1" if config["multi_chunk_prob"] == 0 else "1–" + str(config["max_chunks"])
    matched = config.get("inference_chunking_prob", 0.0)
    blocks = config.get("compaction_block_prob", 0.0)
    overrides = config.get("chunking") or {}
    policy = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "the default ChunkConfig"
    text = (f"documents cut as the engine cuts them ({policy}) with probability {matched:g}, else into {drawn} chunks"
            if matched else f"{drawn} chunks per document")
    if blocks:
        text += (f"; chats cut first into compaction blocks of {config.get('compaction_block_messages', 4)} "
                 f"messages, as the memory provider compacts them, with probability {blocks:g}")
    return text


def _distractors(config: dict[str, Any]) -> str:
    prob = config.get("distractor_prob", 0.0)
    if not prob:
        return ""
    return (f" (with probability {prob:g} the memory also holds chunks of 1 to all of the step's other documents, "
            "as distractors)")


def training_markdown(
    run_dir: str | Path, checkpoint_dir: str | Path, command: str, plot_path: str | None = None
) -> str:
    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.jsonl")
    config = json.loads((run_dir / "train_config.json").read_text())
    compute = training_compute(records)
    last = records[-1]["step"] if records else 0
    lines = [
        "## Meta-training the shipped hypernetwork",
        "",
        f"Run `{config['out_dir']}` → `{Path(checkpoint_dir).as_posix()}`, exported with `{command}`.  ",
        f"{compute['logged_steps']} optimizer steps, {compute['train_step_hours']:.2f} hours of step time on this "
        f"machine's CPU ({config.get('threads') or 'default'} torch threads). Training command: "
        f"`d2l-memory train configs/{Path(config['out_dir']).name}.json` (resumes from `{config['out_dir']}/state`).",
        "",
        f"Recipe: {config['docs_per_step']} documents × {config['questions_per_doc']} questions per step, "
        f"lr {config['lr']} ({_schedule(config)}), "
        f"rank {config['rank']} per chunk on {', '.join(config['targets'])} of every layer, "
        f"{_chunks(config)}{_distractors(config)}, "
        f"loss = {config.get('ce_weight', 1.0)}·CE(gold) + {config.get('kl_weight', 0.0)}"
        f"·KL(teacher top-{config.get('teacher_top_k', 16)}) "
        f"+ {config['l1_weight']}·L1; documents by domain {_mix(config)}; "
        f"encoder pass in {config.get('encoder_autocast') or 'float32'}. "
        "These are the settings of the run's latest segment.",
        "",
        "| steps | train CE (mean of last 25) | train token acc | held-out exact, own adapter "
        "| held-out exact, wrong doc's adapter | held-out token acc, own | held-out token acc, wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in [r for r in records if "held_out" in r]:
        held = record["held_out"]
        step = record["step"]
        lines.append(
            f"| {step} | {_window_mean(records, 'loss', step, 25):.3f} "
            f"| {_window_mean(records, 'token_acc', step, 25):.3f} "
            f"| {100 * held['own_exact']:.1f}% | {100 * held['wrong_exact']:.1f}% | {100 * held['own_token_acc']:.1f}% "
            f"| {100 * held['wrong_token_acc']:.1f}% |"
        )
    lines += ["", f"Held-out scores are teacher-forced on {config['eval_docs']} held-out documents (one chunk each); "
              "generation results are in the evaluation section below. Last logged step: "
              f"{last}."]
    if plot_path:
        lines += ["", f"![training]({plot_path})"]
    return "\n".join(lines)
