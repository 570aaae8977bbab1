"""The README is part of the contract: every config key documented, the quickstart intact."""

from __future__ import annotations

import re
from pathlib import Path

from drnn_cli.config import DataConfig, ModelConfig, TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_documents_every_config_key():
    for section, model in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        for key in model.model_fields:
            assert f"`{section}.{key}`" in README, f"{section}.{key} is missing from the README"


def test_quickstart_is_two_commands_that_train_the_seed_preset_predict_evaluate_and_test():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2 and all("\n" not in command for command in commands)
    assert commands[0].endswith(
        '&& drnn train --config lstm2.yaml && drnn predict "time traveller" && drnn eval'
    )
    assert "python -m pytest" in commands[1]


def test_readme_has_no_unfilled_placeholders():
    assert not re.search(r"^[A-Z0-9_]{6,}$", README, flags=re.M)
