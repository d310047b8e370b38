"""Every shipped YAML parses against the subcommand it is written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_prune.lightning.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
SUBCOMMAND = {"sensitivity": "sensitivity", "train": "fit"}


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subcommand = next((command for key, command in SUBCOMMAND.items() if key in config.stem), "prune")
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out
