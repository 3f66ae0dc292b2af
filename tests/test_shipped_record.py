"""The repository's record of the shipped checkpoint agrees with the checkpoint itself.

Every cycle of training edits the run's config, commits a new training-state folder and ships a
checkpoint; the README, `training-runs/README.md` and the config file then have to be brought along by
hand, and once the README kept naming the previous state folder. These checks read only committed
files (no model), so a shipping commit that forgets one of them fails the suite.

Decision: `configs/smollm2-135m-nokeys.json` always describes the cycle that produced the shipped
checkpoint. A cycle that is trained but not shipped restores the file (its recipe goes into its own
config, as the ablation variants do). Only ``out_dir`` may differ: it says where a cycle ran, not how,
and a trial cycle runs in a folder of its own.

The state folder to continue from is the one the continue instructions copy
(``cp -r training-runs/smollm2-135m-nokeys-step<N>[-<what>]``), so two states of the same step (a
shipped one and a trial) can both be committed; that folder must hold the shipped cycle's state.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from d2l_memory.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "d2l_memory" / "checkpoints" / "smollm2-135m-instruct" / "hypernet.json"
RUN_CONFIG = REPO / "configs" / "smollm2-135m-nokeys.json"
STATE_FOLDER = re.compile(r"cp -r\s+training-runs/(smollm2-135m-nokeys-step(\d+)(?:-[a-z0-9]+)*)\b")


def _shipped_training() -> dict[str, Any]:
    return json.loads(SHIPPED.read_text())["training"]


def _recipe(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, out_dir="")


def _continued_folders(doc: Path) -> set[tuple[str, int]]:
    return {(m.group(1), int(m.group(2))) for m in STATE_FOLDER.finditer(doc.read_text())}


def test_run_config_is_the_recipe_of_the_shipped_checkpoint() -> None:
    shipped = TrainConfig.from_dict(_shipped_training()["train_config"])
    committed = TrainConfig.from_file(RUN_CONFIG)
    assert _recipe(committed) == _recipe(shipped), (
        f"{RUN_CONFIG.name} does not describe the shipped checkpoint's last cycle: restore it, or ship "
        "the checkpoint it trained"
    )


def test_continue_instructions_name_the_shipped_state() -> None:
    step = _shipped_training()["step"]
    named = [_continued_folders(doc) for doc in (REPO / "README.md", REPO / "training-runs" / "README.md")]
    for doc, folders in zip(("README.md", "training-runs/README.md"), named, strict=True):
        assert folders, f"{doc} no longer says which state folder to continue from"
        assert {s for _, s in folders} == {step}, f"{doc} continues from step {sorted(folders)}, shipped is {step}"
    assert len(set.union(*named)) == 1, f"the continue instructions name different folders: {sorted(set.union(*named))}"


def test_shipped_step_has_its_committed_training_state() -> None:
    training = _shipped_training()
    ((folder, step),) = _continued_folders(REPO / "README.md")
    run = REPO / "training-runs" / folder
    state = run / "state"
    assert (state / "hypernet.safetensors").is_file(), f"no committed training state in {folder}"
    assert json.loads((state / "trainer_state.json").read_text())["step"] == step == training["step"]
    recorded = TrainConfig.from_file(run / "train_config.json")
    assert _recipe(recorded) == _recipe(TrainConfig.from_dict(training["train_config"])), (
        f"{folder} holds another cycle's state than the shipped checkpoint's"
    )
