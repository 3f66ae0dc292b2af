"""The repository's record of the shipped checkpoint agrees with the checkpoint itself.

Every cycle of training edits the run's config, commits a new training-state folder and ships a
checkpoint; the README, `training-runs/README.md` and the config file then have to be brought along by
hand, and once the README kept naming the previous state folder. These checks read only committed
files (no model), so a shipping commit that forgets one of them fails the suite.

Decision: `configs/smollm2-135m-nokeys.json` always describes the cycle that produced the shipped
checkpoint. A cycle that is trained but not shipped restores the file (its recipe goes into its own
config, as the ablation variants do).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from d2l_memory.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "d2l_memory" / "checkpoints" / "smollm2-135m-instruct" / "hypernet.json"
RUN_CONFIG = REPO / "configs" / "smollm2-135m-nokeys.json"
STATE_FOLDER = re.compile(r"training-runs/smollm2-135m-nokeys-step(\d+)")


def _shipped_training() -> dict[str, Any]:
    return json.loads(SHIPPED.read_text())["training"]


def test_run_config_is_the_recipe_of_the_shipped_checkpoint() -> None:
    shipped = TrainConfig.from_dict(_shipped_training()["train_config"])
    committed = TrainConfig.from_file(RUN_CONFIG)
    assert committed == shipped, (
        f"{RUN_CONFIG.name} does not describe the shipped checkpoint's last cycle: restore it, or ship "
        "the checkpoint it trained"
    )


def test_shipped_step_has_its_committed_training_state() -> None:
    step = _shipped_training()["step"]
    state = REPO / "training-runs" / f"smollm2-135m-nokeys-step{step}" / "state"
    assert (state / "hypernet.safetensors").is_file(), f"no committed training state for step {step}"
    assert json.loads((state / "trainer_state.json").read_text())["step"] == step


def test_continue_instructions_name_the_shipped_state() -> None:
    step = _shipped_training()["step"]
    for doc in (REPO / "README.md", REPO / "training-runs" / "README.md"):
        copies = [int(m.group(1)) for m in re.finditer(r"cp -r\s+" + STATE_FOLDER.pattern, doc.read_text())]
        assert copies, f"{doc.relative_to(REPO)} no longer says which state folder to continue from"
        assert set(copies) == {step}, f"{doc.relative_to(REPO)} continues from step {copies}, shipped is {step}"
