from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from d2l_memory.training import vocab
from d2l_memory.training.config import TrainConfig
from d2l_memory.training.synth import DOMAINS, make_sample, mixed_sample
from d2l_memory.training.batch import student_forward
from d2l_memory.training.trainer import Trainer
from tiny import tiny_base

TESTS = Path(__file__).parent


def tiny_config(out_dir: Path, steps: int, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "base_model": "tiny-0", "out_dir": str(out_dir), "steps": steps, "docs_per_step": 2, "questions_per_doc": 2,
        "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 1, "eval_every": 1000, "eval_docs": 4, "max_chunks": 2,
        "domain_weights": {"facts": 0.5, "conversation": 0.3, "tool": 0.2}, "rank": 2,
        "hypernet": {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64},
    }
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


def test_generators_are_deterministic() -> None:
    for domain in DOMAINS:
        assert make_sample(0, "train", 7, domain) == make_sample(0, "train", 7, domain)
    assert mixed_sample(1, "test", 3, {"facts": 1.0}) == mixed_sample(1, "test", 3, {"facts": 1.0})
    assert make_sample(0, "train", 1, "facts") != make_sample(0, "train", 2, "facts")


def test_held_out_values_never_appear_in_training() -> None:
    open_values: dict[str, set[str]] = {"train": set(), "test": set()}
    texts = {"train": [], "test": []}
    for split in ("train", "test"):
        for i in range(300):
            for domain in ("facts", "conversation", "tool", "needle"):
                sample = make_sample(0, split, i, domain)
                texts[split].append(sample.text)
                open_values[split] |= {qa.answer for qa in sample.qas if qa.open_value}
    assert open_values["test"] and not open_values["train"] & open_values["test"]
    assert all(vocab.split_of(v) == "test" for v in open_values["test"])
    train_text = "\n".join(texts["train"])
    assert not any(v in train_text for v in list(open_values["test"])[:200] if len(v) >= 5)


def test_held_out_phrasings_never_appear_in_training() -> None:
    from d2l_memory.training import synth

    held = [t for statements, *_ in synth._FACTS.values() for i, t in enumerate(statements) if i % 5 == 4]
    fragments = [t.split("{v}")[0].replace("{p}", "").strip() for t in held]
    fragments = [f for f in fragments if len(f) > 8]
    train = " ".join(make_sample(0, "train", i, "facts").text for i in range(300))
    test = " ".join(make_sample(0, "test", i, "facts").text for i in range(300))
    assert fragments and not any(f in train for f in fragments)
    assert any(f in test for f in fragments)


def test_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    # A wider init than the default 0.02 gives the tiny model logits a LoRA can move. The loss is
    # compared on the same fixed batches before and after, so batch-to-batch noise cannot fake it.
    trainer = Trainer(tiny_config(tmp_path / "run", steps=40, checkpoint_every=40, lr=1e-2), base=tiny_base(init_range=0.3))
    batches = [trainer.microbatch(step, 0) for step in range(4)]

    def fixed_loss() -> float:
        with torch.no_grad():
            outs = [student_forward(trainer.base.model, trainer.hypernet, trainer.layers_prefix, b) for b in batches]
        return sum(o.loss.item() for o in outs) / len(outs)

    before = fixed_loss()
    trainer.run(progress=False)
    after = fixed_loss()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 40
    assert after < before - 0.2, (before, after)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "state" / "hypernet.safetensors"))


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = 6
    Trainer(tiny_config(tmp_path / "straight", steps), base=tiny_base()).run(progress=False)

    killed = tmp_path / "killed"
    config = tmp_path / "killed.json"
    config.write_text(tiny_config(killed, steps).to_json())
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tiny import tiny_base;"
        "from d2l_memory.training.config import TrainConfig;"
        "from d2l_memory.training.trainer import Trainer;"
        "Trainer(TrainConfig.from_file(sys.argv[2]), base=tiny_base()).run(progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(config)], env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it somewhere after its second checkpoint
        state = killed / "state" / "trainer_state.json"
        if state.is_file() and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = Trainer(tiny_config(killed, steps), base=tiny_base())
    assert 2 <= resumed.step < steps  # it really was interrupted
    resumed.run(progress=False)

    straight, again = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    optim_a = load_file(str(tmp_path / "straight" / "state" / "optimizer.safetensors"))
    optim_b = load_file(str(killed / "state" / "optimizer.safetensors"))
    assert all(torch.equal(optim_a[k], optim_b[k]) for k in optim_a)
