"""One LightningCLI dispatches every verb: its help lists them all, each reaches its Trainer method with its own
model and data classes (none for the tool verbs), and ClipPruneCLI overrides no private LightningCLI method."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from clip_prune.lightning.cli import TOOL_VERBS, VERB_CLASSES, VERB_DEFAULTS, ClipPruneCLI, main
from clip_prune.lightning.trainer import ClipPruneTrainer

VERBS = ("fit", "validate", "prune", "apply", "evaluate", "sensitivity", "make-demo-data",
         "export-onnx")
CLI_SOURCE = Path(__file__).parents[2] / "src" / "clip_prune" / "lightning" / "cli.py"


def test_lightning_subcommands_are_extended_not_replaced() -> None:
    subcommands = ClipPruneCLI.subcommands()
    assert tuple(subcommands) == VERBS
    assert all(subcommands[verb] == skip for verb, skip in LightningCLI.subcommands().items() if verb in subcommands)
    assert set(VERB_CLASSES) == set(subcommands)


@pytest.mark.parametrize("verb", ["test", "predict"])
def test_lightning_verbs_the_demo_module_lacks_are_not_offered(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_verb_with_a_one_line_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for verb in VERBS:
        assert re.search(rf"^    {re.escape(verb)} +\S", text, re.MULTILINE), f"{verb} is not listed with its help"


def test_no_private_lightning_cli_method_is_overridden() -> None:
    private = {name for name in vars(LightningCLI) if name.startswith("_") and not name.startswith("__")}
    ours = {name for klass in ClipPruneCLI.__mro__[:ClipPruneCLI.__mro__.index(LightningCLI)] for name in vars(klass)}
    assert not private & ours
    assert not re.findall(r"def _", CLI_SOURCE.read_text())  # as `grep "def _" cli.py` checks it


def _record_calls(monkeypatch: pytest.MonkeyPatch, verb: str) -> list[dict]:
    """Replace the Trainer method of `verb` by one with its signature that records its arguments."""
    calls: list[dict] = []
    method = getattr(ClipPruneTrainer, verb)

    @functools.wraps(method)  # LightningCLI reads the options from the signature this keeps
    def record(self: ClipPruneTrainer, **kwargs: object) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(ClipPruneTrainer, verb, record)
    return calls


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_is_dispatched_by_lightning_cli_with_its_classes(verb, monkeypatch, tiny_clip_dir, tiny_coco_root,
                                                                    tmp_path) -> None:
    calls = _record_calls(monkeypatch, verb)
    model_class, datamodule_class = VERB_CLASSES[verb]
    args = {"prune": [], "apply": ["--masks", "m"], "evaluate": [], "sensitivity": [], "make-demo-data": [],
            "export-onnx": ["--pruned", "p"]}.get(verb, ["--model.save_dir", str(tmp_path / "trained")])
    if model_class is not None:
        args += ["--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root)]
    main([verb, *args])
    [kwargs] = calls
    if model_class is None:
        assert kwargs["model"] is None and "datamodule" not in kwargs
    else:
        assert type(kwargs["model"]) is model_class and type(kwargs["datamodule"]) is datamodule_class
        assert kwargs["datamodule"].hparams.pretrained == str(tiny_clip_dir)  # linked from --model.pretrained


@pytest.mark.parametrize("verb", TOOL_VERBS)
def test_tool_verbs_take_no_model_data_or_trainer_options(verb, capsys) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = capsys.readouterr().out
    assert "--model." not in text and "--data." not in text and "--trainer." not in text


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    return [leaf for key, value in tree.items()
            for leaf in (_leaves(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)])]


def _value(tree: dict, path: tuple[str, ...]) -> object:
    return functools.reduce(lambda node, key: node[key], path, tree)


@pytest.mark.parametrize("defaults", sorted(VERB_DEFAULTS.glob("*.yaml")), ids=lambda path: path.stem)
def test_verb_defaults_apply_to_their_verb_only(defaults: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verb = defaults.stem
    assert verb in ClipPruneCLI.subcommands(), f"{defaults.name} is named after no verb"
    resolved = {}
    for name in (verb, "prune"):
        required = {"export-onnx": ["--pruned", "p"], "make-demo-data": []}.get(
            name, ["--model.pretrained", "m", "--data.root", "d"])
        required += ["--model.save_dir", "s"] if name == "fit" else []
        with pytest.raises(SystemExit):
            main([name, *required, "--print_config"])
        resolved[name] = yaml.safe_load(capsys.readouterr().out)
    expected = _leaves(yaml.safe_load(defaults.read_text()))
    assert all(_value(resolved[verb], path) == value for path, value in expected)
    assert any(_value(resolved["prune"], path) != value for path, value in expected)


def test_a_gloo_process_group_is_ended_after_a_failed_run_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left to interpreter shutdown, gloo can abort the process (status -6) and hide the run's own exit status."""
    import torch.distributed

    import clip_prune.lightning.cli as cli

    def failing_run(args: list[str] | None) -> None:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise ValueError("bad input")

    monkeypatch.setattr(cli, "run_cli", failing_run)
    with pytest.raises(ValueError, match="bad input"):
        main(["prune"])
    assert not torch.distributed.is_initialized()
