"""Plot a run's log.jsonl: training loss and accuracy, held-out accuracy with own vs wrong adapter."""

from __future__ import annotations

from pathlib import Path

from d2l_memory.reporting import save_figure
from d2l_memory.training.export import read_log


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_log(run_dir: str | Path, out: str | Path | None = None, window: int = 25) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/log.jsonl is empty")
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.plot(steps, [r["loss"] for r in records], alpha=0.25, color="tab:blue")
    left.plot(steps, moving_average([r["loss"] for r in records], window), color="tab:blue",
              label=f"train CE (moving avg {window})")
    left.set(xlabel="step", ylabel="cross-entropy on answer tokens", title="Training loss")
    left.legend(fontsize=8)
    right.plot(steps, moving_average([r["token_acc"] for r in records], window), label="train token acc",
               color="tab:gray")
    held = [r for r in records if "held_out" in r]
    if held:
        hs = [r["step"] for r in held]
        for key, marker, label in (("own_token_acc", "o", "held-out token acc, own adapter"),
                                   ("own_exact", "s", "held-out exact, own adapter"),
                                   ("wrong_exact", "x", "held-out exact, wrong doc's adapter")):
            right.plot(hs, [r["held_out"][key] for r in held], marker=marker, label=label)
    right.set(xlabel="step", ylabel="accuracy (teacher-forced)", ylim=(0, 1), title="Accuracy")
    right.legend(fontsize=8)
    return save_figure(fig, Path(out) if out else run_dir / "training.png")
