"""benchmarks/average_states.py: the average is the weighted mean of every tensor, and mismatched
inputs (shape, base model, weights) are refused before anything is written; ``--run-like`` makes a
run folder that judge.py accepts and never writes over a folder in use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_modules import load_benchmark
from tiny import tiny_base, tiny_hypernet

from d2l_memory.checkpoint import load_hypernet, save_hypernet
from d2l_memory.errors import CheckpointError
from d2l_memory.training.state import is_weights_only, latest_state_dir

average_states = load_benchmark("average_states")


def _saved(tmp_path: Path, name: str, seed: int, fingerprint: str = "fp", **overrides: object) -> Path:
    net = tiny_hypernet(tiny_base().model, seed=seed, **overrides)
    with torch.no_grad():  # zero-initialised parts would average to zero whatever the code does
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    save_hypernet(tmp_path / name, net, base_model_name="tiny", base_model_fingerprint=fingerprint,
                  training={"step": seed})
    return tmp_path / name


def test_weighted_mean_of_every_tensor_and_sources_recorded(tmp_path: Path) -> None:
    a, b = _saved(tmp_path, "a", 1), _saved(tmp_path, "b", 2)
    average_states.main([str(a), str(b), "--out", str(tmp_path / "soup"), "--weights", "0.25", "0.75"])
    soup, meta = load_hypernet(tmp_path / "soup")
    first, second = load_hypernet(a)[0].state_dict(), load_hypernet(b)[0].state_dict()
    for key, value in soup.state_dict().items():
        torch.testing.assert_close(value, 0.25 * first[key] + 0.75 * second[key])
    assert [s["step"] for s in meta.training["averaged_from"]] == [1, 2] and "step" not in meta.training
    assert [s["weight"] for s in meta.training["averaged_from"]] == [0.25, 0.75]


def test_refuses_mismatched_inputs(tmp_path: Path) -> None:
    a = _saved(tmp_path, "a", 1)
    with pytest.raises(CheckpointError, match="trained for base model"):
        average_states.average_hypernets([a, _saved(tmp_path, "other", 2, fingerprint="fp2")])
    with pytest.raises(CheckpointError, match="network shape"):
        average_states.average_hypernets([a, _saved(tmp_path, "wide", 3, rank=2)])
    with pytest.raises(ValueError, match="summing to 1"):
        average_states.average_hypernets([a, _saved(tmp_path, "b", 4)], [0.5, 0.6])
    with pytest.raises(ValueError, match="at least two"):
        average_states.average_hypernets([a])


def test_run_like_writes_a_weights_only_run_folder_and_never_over_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = _saved(run, "state", 5)
    (state / "trainer_state.json").write_text('{"step": 5}')
    (run / "train_config.json").write_text("{}")
    (run / "log.jsonl").write_text('{"step": 5, "seconds": 1.0}\n')
    a, out = _saved(tmp_path, "a", 1), tmp_path / "soup"
    average_states.main([str(a), str(state), "--out", str(out), "--run-like", str(run)])
    assert latest_state_dir(out) == out / "state" and is_weights_only(out / "state")
    assert (out / "log.jsonl").read_text() == (run / "log.jsonl").read_text()
    soup = load_hypernet(out / "state")[0].state_dict()
    first, second = load_hypernet(a)[0].state_dict(), load_hypernet(state)[0].state_dict()
    for key, value in soup.items():
        torch.testing.assert_close(value, 0.5 * first[key] + 0.5 * second[key])
    before = (out / "state" / "hypernet.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        average_states.main([str(a), str(state), "--out", str(out), "--run-like", str(run)])
    assert (out / "state" / "hypernet.safetensors").read_bytes() == before
