"""A user's mistake ends in one `clip-prune: error:` line and status 2 (a stop signal: one line, 130 or 143), and no
case changes or deletes a file the run did not create: data, models and the user's own files stay byte-identical.

Each case runs the real command line in this process (the signal cases in a fresh one) against copies of a tiny
checkpoint and data set, and compares every file under the workspace before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_prune.lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@dataclass
class Workspace:
    """Copies of a tiny CLIP (full and vision-only) and a tiny COCO set, and a project folder of the user's."""

    root: Path
    model: Path
    vision: Path
    data: Path
    project: Path

    def prune(self, *extra: str, model: Path | None = None) -> list[str]:
        return ["prune", "--config", str(CONFIG), "--model.pretrained", str(model or self.model), "--data.root",
                str(self.data), *extra]

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file under the workspace, by relative path."""
        return {path.relative_to(self.root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(self.root.rglob("*")) if path.is_file()}


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str

    @property
    def first_line(self) -> str:
        """The error's line (status lines such as "latency table measured" may come before it)."""
        lines = self.stderr.strip().splitlines()
        return next((line for line in lines if line.startswith("clip-prune: error:")), lines[0] if lines else "")


@pytest.fixture
def workspace(tmp_path: Path, tiny_clip_dir: Path, tiny_vision_dir: Path, tiny_coco_root: Path,
              monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.delenv("CLIP_PRUNE_DEBUG")  # as a user runs it: errors as one line
    root = tmp_path / "workspace"
    project = root / "project"
    project.mkdir(parents=True)
    (project / "train.py").write_text("print('my training script')\n")
    (project / "notes.md").write_text("# my notes\n")
    space = Workspace(root, root / "model", root / "vision", root / "data", project)
    shutil.copytree(tiny_clip_dir, space.model)
    shutil.copytree(tiny_vision_dir, space.vision)
    shutil.copytree(tiny_coco_root, space.data)
    return space


def run(args: list[str], capsys: pytest.CaptureFixture) -> Outcome:
    """`clip-prune ARGS` in this process: its exit status and what it printed."""
    capsys.readouterr()
    try:
        main(args)
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return Outcome(status, out, err)


def assert_refused(outcome: Outcome, *phrases: str) -> None:
    """One `clip-prune: error:` line naming the problem (the second line only points at --debug), status 2."""
    assert outcome.status == 2, outcome.stderr
    assert outcome.first_line.startswith("clip-prune: error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr
    for phrase in phrases:
        assert phrase in outcome.first_line, outcome.first_line


# Outputs that would replace or write into what is not a clip-prune output -------------------------------------------

OUTPUT_CASES: dict[str, tuple[Callable[[Workspace], tuple[str, Path | None]], str]] = {
    "inside the image folder": (lambda ws: (str(ws.data / "train2017"), None), "lies inside the input"),
    "inside the captions folder": (lambda ws: (str(ws.data / "annotations"), None), "lies inside the input"),
    "the data root": (lambda ws: (str(ws.data), None), "is the input"),
    "a folder holding the data": (lambda ws: (str(ws.root), None), "holds the input"),
    "the model folder": (lambda ws: (str(ws.model), None), "is the input"),
    "the current directory as .": (lambda ws: (".", ws.project), "is the current directory"),
    "the current directory by name": (lambda ws: (str(ws.project), ws.project), "is the current directory"),
    "a parent of the current directory": (lambda ws: ("..", ws.project / "sub"), "holds the current directory"),
    "a project folder of the user's": (lambda ws: (str(ws.project), None),
                                       "did not write or that changed since (notes.md, train.py)"),
    "a filesystem root": (lambda ws: ("/", None), "is a filesystem root"),
}


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_overwrite_never_touches_what_is_not_a_clip_prune_output(case, workspace, capsys, monkeypatch) -> None:
    where, expected = OUTPUT_CASES[case]
    output, cwd = where(workspace)
    if cwd is not None:
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
    before = workspace.snapshot()
    outcome = run(workspace.prune("--output_dir", output, "--overwrite", "true"), capsys)
    assert_refused(outcome, expected)
    assert workspace.snapshot() == before


def test_the_home_directory_is_never_an_output(workspace, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(workspace.project))
    before = workspace.snapshot()
    assert_refused(run(workspace.prune("--output_dir", str(workspace.project), "--overwrite", "true"), capsys),
                   "is your home directory")
    assert workspace.snapshot() == before


def test_overwrite_replaces_a_run_but_not_a_file_the_user_added_to_it(workspace, capsys) -> None:
    output = workspace.root / "run"
    assert run(workspace.prune("--output_dir", str(output), "--constraint", "0.6"), capsys).status == 0
    assert run(workspace.prune("--output_dir", str(output), "--constraint", "0.8", "--overwrite", "true"),
               capsys).status == 0
    assert json.loads((output / "report.json").read_text())["constraint"] == 0.8
    (output / "pruned" / "my_notes.md").write_text("mine")
    before = workspace.snapshot()
    assert_refused(run(workspace.prune("--output_dir", str(output), "--overwrite", "true"), capsys),
                   "holds files clip-prune did not write or that changed since (pruned/my_notes.md)")
    assert workspace.snapshot() == before


def test_an_evaluation_file_replaces_only_one_clip_prune_wrote(workspace, capsys) -> None:
    captions = workspace.data / "annotations" / "captions_val2017.json"
    before = workspace.snapshot()
    evaluate = ["evaluate", "--model.pretrained", str(workspace.model), "--data.root", str(workspace.data),
                "--data.num_workers", "0", "--overwrite", "true"]
    assert_refused(run([*evaluate, "--output_json", str(captions)], capsys), "is not a file clip-prune wrote")
    assert workspace.snapshot() == before
    metrics = workspace.root / "metrics.json"
    assert run([*evaluate, "--output_json", str(metrics)], capsys).status == 0
    assert run([*evaluate, "--output_json", str(metrics)], capsys).status == 0  # its own file: replaced
    assert json.loads(metrics.read_text())["written_by"] == "clip-prune"


# Budgets that leave a model whose embedding ignores its image -------------------------------------------------------

def test_a_mac_budget_below_one_head_is_refused_with_the_least_that_works(workspace, capsys) -> None:
    outcome = run(workspace.prune("--output_dir", str(workspace.root / "run"), "--constraint", "0.01"), capsys)
    # One head of the tiny CLIP (T = 26, D = 32, d = 8): 4·T·D·d + 2·T²·d = 37,440 of 12 × 37,440 + 3 × 37 × 1,664
    # = 633,984 MACs, 0.059 of them.
    assert_refused(outcome, "--constraint 0.01 is below 0.0591", "one attention head",
                   "raise --constraint to at least 0.0597")
    assert not (workspace.root / "run").exists()
    assert run(workspace.prune("--output_dir", str(workspace.root / "run"), "--constraint", "0.0597"),
               capsys).status == 0
    assert json.loads((workspace.root / "run" / "report.json").read_text())["kept"]["heads"] >= 1


def test_a_latency_budget_below_the_fixed_parts_is_refused_before_the_fisher_pass(workspace, capsys,
                                                                                  monkeypatch) -> None:
    from conftest import linear_latency_table

    monkeypatch.setenv("XDG_CACHE_HOME", str(workspace.root.parent / "cache"))
    monkeypatch.setattr("clip_prune.core.pruning.latency_table.measure_latency_table", linear_latency_table)
    monkeypatch.setattr("clip_prune.core.pruning.fisher.FisherInformation.update",
                        lambda *args: pytest.fail("the Fisher pass ran"))
    outcome = run(workspace.prune("--output_dir", str(workspace.root / "run"), "--constraint", "0.1",
                                  "--constraint_type", "latency"), capsys)
    # The stand-in table: empty tower 2 ms, a layer's first head 2 ms, dense 21.5 ms (conftest.linear_latency_table).
    assert_refused(outcome, "--constraint 0.1 is below 0.186", "parts no pruning removes", "one attention head")


def test_masks_without_a_head_are_refused_before_any_data_is_read(workspace, capsys) -> None:
    masks = workspace.root / "masks"
    masks.mkdir()
    torch.save(torch.zeros(3, 4), masks / "head_mask.pt")
    torch.save(torch.ones(3, 37), masks / "neuron_mask.pt")
    before = workspace.snapshot()
    outcome = run(["apply", "--model.pretrained", str(workspace.model), "--data.root", str(workspace.data / "none"),
                   "--masks", str(masks), "--output_dir", str(workspace.root / "out")], capsys)
    assert_refused(outcome, "keep no attention head", "the same for every image")
    assert workspace.snapshot() == before


def test_the_spread_rule_tells_a_tower_without_heads_from_one_with_a_single_head() -> None:
    from conftest import build_tiny_model

    from clip_prune.core.run.finish import MIN_SPREAD_RATIO, image_dependence, masked_embeddings
    from clip_prune.towers import image_embeds

    model = build_tiny_model("clip")
    images = torch.randn(5, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    dense = image_embeds(model, images)
    no_head, one_head = torch.zeros(3, 4), torch.zeros(3, 4)
    one_head[2, 0] = 1
    neurons = torch.ones(3, 37)
    with pytest.raises(ValueError, match="hardly depend on the image"):
        image_dependence(dense, masked_embeddings(model, no_head, neurons, images))
    spread = image_dependence(dense, masked_embeddings(model, one_head, neurons, images))
    assert spread["ratio"] > 100 * MIN_SPREAD_RATIO


# Silent no-ops --------------------------------------------------------------------------------------------------------

def test_evaluate_on_a_vision_only_model_compares_embeddings_or_says_why_not(workspace, capsys) -> None:
    evaluate = ["evaluate", "--model.pretrained", str(workspace.vision), "--data.root", str(workspace.data),
                "--data.num_workers", "0", "--model.loss", "distill"]
    assert_refused(run(evaluate, capsys), "is vision-only", "pass --pruned DIR")
    run_dir = workspace.root / "run"
    assert run(workspace.prune("--output_dir", str(run_dir), "--model.loss", "distill", model=workspace.vision),
               capsys).status == 0
    outcome = run([*evaluate, "--pruned", str(run_dir)], capsys)
    assert outcome.status == 0, outcome.stderr
    assert "image embeddings vs dense: cosine" in outcome.stdout


def test_a_zero_shot_template_without_a_place_for_the_class_is_refused(workspace, capsys) -> None:
    outcome = run(workspace.prune("--data.zero_shot_templates", '["a photo"]'), capsys)
    assert_refused(outcome, "'a photo' has no {} where the class name goes")


def _masks(folder: Path, head: torch.Tensor, neuron: torch.Tensor) -> Path:
    folder.mkdir()
    torch.save(head, folder / "head_mask.pt")
    torch.save(neuron, folder / "neuron_mask.pt")
    return folder


def test_negative_scales_are_named_and_refused_in_binary_masks(workspace, capsys, tmp_path) -> None:
    head, neuron = torch.ones(3, 4), torch.ones(3, 37)
    neuron[1, 5] = -0.5  # a least-squares scale may turn a unit round: the original tool writes such masks
    scales = _masks(workspace.root / "scales", head, neuron)
    apply = ["apply", "--model.pretrained", str(workspace.model), "--data.root", str(workspace.data),
             "--data.num_workers", "0"]
    outcome = run([*apply, "--masks", str(scales), "--output_dir", str(tmp_path / "a")], capsys)
    assert outcome.status == 0, outcome.stderr
    assert "warning: neuron_mask holds 1 negative scales (down to -0.5)" in outcome.stdout
    run_dir = workspace.root / "run"
    assert run(workspace.prune("--output_dir", str(run_dir)), capsys).status == 0  # binary masks and refit columns
    binary = torch.load(run_dir / "neuron_mask.pt")
    binary[binary != 0] = -1.0
    torch.save(binary, run_dir / "neuron_mask.pt")
    before = workspace.snapshot()
    outcome = run([*apply, "--masks", str(run_dir), "--output_dir", str(tmp_path / "b")], capsys)
    assert_refused(outcome, "neuron_mask hold values other than 0 and 1")
    assert workspace.snapshot() == before


# Bad files and settings: one line each --------------------------------------------------------------------------------

def _without_processor(ws: Workspace) -> Path:
    (ws.model / "preprocessor_config.json").unlink()
    return ws.model


def _without_weights(ws: Workspace) -> Path:
    (ws.model / "model.safetensors").unlink()
    return ws.model


def _truncated_weights(ws: Workspace) -> Path:
    weights = ws.model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ws.model


def _corrupt_weights(ws: Workspace) -> Path:
    weights = ws.model / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[8:40] = b"\xff" * 32  # the JSON header
    weights.write_bytes(bytes(content))
    return ws.model


def _weights_with_nan(ws: Workspace) -> Path:
    weights = ws.model / "model.safetensors"
    content = bytearray(weights.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = b"\xff" * 64  # inside the tensors: NaN floats, which no format check sees
    weights.write_bytes(bytes(content))
    return ws.model


BAD_MODELS = {
    "no preprocessor_config.json": (_without_processor, "has no image processor (no preprocessor_config.json)"),
    "no weights": (_without_weights, "cannot load the weights"),
    "truncated weights": (_truncated_weights, "cannot load the weights"),
    "corrupt weights": (_corrupt_weights, "cannot load the weights"),
    "weights with NaN": (_weights_with_nan, "hold NaN or infinite values"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_broken_model_folder_is_one_line(case, workspace, capsys) -> None:
    damage, expected = BAD_MODELS[case]
    model = damage(workspace)
    before = workspace.snapshot()
    assert_refused(run(workspace.prune("--output_dir", str(workspace.root / "run"), model=model), capsys), expected)
    assert workspace.snapshot() == before


OPTION_CASES = {
    "a constraint that is not a number": (["--constraint", "abc"], "--constraint: got abc, expected a number"),
    "a constraint above 1": (["--constraint", "1.5"], "--constraint must be in (0, 1]"),
    "an unknown constraint type": (["--constraint_type", "flops"],
                                   "--constraint_type: got flops, expected one of 'macs', 'latency'"),
    "a bad nested option": (["--options.steps", "two"], "--options.steps: got two, expected a whole number"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_bad_option_values_are_one_plain_line(case, workspace, capsys) -> None:
    extra, expected = OPTION_CASES[case]
    outcome = run(workspace.prune(*extra), capsys)
    assert_refused(outcome, expected)
    assert len(outcome.stderr.strip().splitlines()) == 2 and "Parser key" not in outcome.stderr


def test_a_missing_checkpoint_option_says_what_to_give(workspace, capsys) -> None:
    outcome = run(["prune", "--data.root", str(workspace.data)], capsys)
    assert outcome.status == 2
    assert outcome.first_line.startswith("clip-prune: error: --model.pretrained is required: a Hub name such as")
    assert "<class" not in outcome.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_one_line(workspace, capsys) -> None:
    outcome = run(workspace.prune("--trainer.accelerator", "gpu"), capsys)
    assert_refused(outcome, "--trainer.accelerator gpu: PyTorch sees no GPU here", "--trainer.accelerator cpu")


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(code, workspace, capsys, monkeypatch) -> None:
    def refuse(self: object, name: str, content: object) -> None:
        raise OSError(code, os.strerror(code), str(workspace.root / "run" / name))

    monkeypatch.setattr("clip_prune.core.run.outputs.RunDirectory.write_json", refuse)
    before = workspace.snapshot()
    outcome = run(workspace.prune("--output_dir", str(workspace.root / "run")), capsys)
    expected = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full"}[code]
    assert_refused(outcome, "cannot write", expected)
    # The staging folder keeps the Fisher statistics (a rerun resumes from them), and says so; nothing else is left.
    assert "fisher.safetensors was kept in" in outcome.stderr
    after = workspace.snapshot()
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert all(".run.partial-" in name for name in set(after) - set(before))


def test_an_image_too_large_to_decode_is_a_bad_image_like_any_other(workspace, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1700)  # 40 x 40 images pass; Pillow refuses above 2 x 1700
    bomb = workspace.data / "train2017" / f"{3:012d}.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(bomb)
    outcome = run(workspace.prune("--output_dir", str(workspace.root / "run"), "--data.num_samples", "12"), capsys)
    assert_refused(outcome, "1 sampled image(s) cannot be read")
    assert f"{bomb} (too large to decode safely" in outcome.stderr
    with pytest.warns(UserWarning, match="skipped 1 of 12 sampled images"):
        outcome = run(workspace.prune("--output_dir", str(workspace.root / "run"), "--data.num_samples", "12",
                                      "--data.skip_bad_images", "true"), capsys)
    assert outcome.status == 0, outcome.stderr


def test_export_without_the_onnx_extra_is_one_line(workspace, capsys, monkeypatch) -> None:
    monkeypatch.setattr("clip_prune.core.deploy.onnx_export.ONNX_PACKAGES",
                        ("onnx", "onnx_package_that_is_not_installed"))
    outcome = run(["export-onnx", "--pruned", str(workspace.root / "run")], capsys)
    assert_refused(outcome, "ONNX export needs onnx_package_that_is_not_installed",
                   "pip install 'clip-prune[onnx]'")
    assert len(outcome.stderr.strip().splitlines()) == 2


# Stop signals ---------------------------------------------------------------------------------------------------------

SIGNAL_SCRIPT = """
import os, signal, sys
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.lightning.cli import main

step = MaskedCLIPModule.validation_step
passes = {{"seen": 0}}

def validation_step(self, batch, batch_idx):
    if batch_idx == 1:
        passes["seen"] += 1
        if passes["seen"] == {stop_in_pass}:  # the signal arrives while a Fisher pass and its loader workers run
            os.killpg(os.getpgid(0), signal.{signal_name})
    return step(self, batch, batch_idx)

MaskedCLIPModule.validation_step = validation_step
main(sys.argv[1:])
"""


@pytest.mark.parametrize(("signal_name", "stop_in_pass", "status", "kept"), [
    ("SIGTERM", 1, 143, "nothing of this run was kept"),
    ("SIGINT", 2, 130, "fisher.safetensors was kept in"),
])
def test_a_stop_signal_says_what_was_kept_and_exits_with_the_shells_status(signal_name, stop_in_pass, status, kept,
                                                                          workspace) -> None:
    output = workspace.root / "run"
    script = SIGNAL_SCRIPT.format(signal_name=signal_name, stop_in_pass=stop_in_pass)
    env = {key: value for key, value in os.environ.items() if key != "CLIP_PRUNE_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    before = workspace.snapshot()
    result = subprocess.run(
        [sys.executable, "-c", script, *workspace.prune("--output_dir", str(output), "--data.num_workers", "2",
                                                        "--constraint", "0.4")],
        capture_output=True, text=True, timeout=300, cwd=workspace.root, env=env, start_new_session=True)
    assert result.returncode == status, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clip-prune: stopped by {signal_name}; {kept}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr
    after = workspace.snapshot()
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert not output.exists()


def test_only_the_systems_own_error_number_makes_a_disk_problem() -> None:
    from safetensors import SafetensorError

    from clip_prune.lightning.console import disk_problem, user_error

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/report.json")
    assert disk_problem(full) == ("cannot write /out/report.json: the disk is full; free some space or write the "
                                  "output to another disk")
    assert "the disk is full" in disk_problem(SafetensorError("I/O error: No space left on device (os error 28)"))
    # DataLoader workers out of shared memory read alike, but it is /dev/shm, not the output: keep the traceback
    shared_memory = RuntimeError("unable to write to file </torch_123_456>: No space left on device (28)")
    assert disk_problem(shared_memory) is None and user_error(shared_memory) is None


def test_a_stop_signal_the_shell_ignores_stays_ignored() -> None:
    from clip_prune.lightning.cli import stop_signals_recorded

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job started with & from a script
    try:
        with stop_signals_recorded():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
