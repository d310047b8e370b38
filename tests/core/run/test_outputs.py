"""Output folders appear whole, never replace what is there unless asked, keep what a failure should not lose, and
concurrent runs into one output directory leave each other's staging folders alone."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from clip_prune import files
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.data.synthetic import write_synthetic_coco
from clip_prune.errors import notes
from clip_prune.files import (
    MANIFEST,
    atomic_directory,
    check_file_free,
    check_free,
    check_output_location,
    record_written,
    stale_stagings,
    write_json_atomically,
)


def test_run_directory_is_staged_then_renamed(tmp_path) -> None:
    run = RunDirectory(tmp_path / "run")
    with run.writing():
        run.write_json("report.json", {"a": 1})
        assert not (tmp_path / "run").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"a": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    with pytest.raises(FileExistsError, match="--overwrite true"):
        RunDirectory(tmp_path / "run")
    again = RunDirectory(tmp_path / "run", overwrite=True)
    with again.writing():
        again.write_json("report.json", {"a": 2})
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"a": 2}
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_failed_run_keeps_only_what_is_worth_keeping(tmp_path) -> None:
    run = RunDirectory(tmp_path / "cheap")
    with pytest.raises(RuntimeError), run.writing(keep="fisher.safetensors"):
        run.write_json("report.json", {})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    run = RunDirectory(tmp_path / "costly")
    with pytest.raises(RuntimeError) as caught, run.writing(keep="fisher.safetensors"):
        run.file("fisher.safetensors").write_bytes(b"statistics")
        raise RuntimeError("boom")
    assert notes(caught.value) == [f"fisher.safetensors was kept in {run.staging}: a rerun into {run.path} resumes "
                                   "from it"]
    assert (run.staging / "fisher.safetensors").read_bytes() == b"statistics"
    assert RunDirectory(tmp_path / "costly").interrupted_runs() == [run.staging]


def test_atomic_directory_leaves_nothing_on_failure_and_refuses_to_overwrite(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists() and staging.parent == tmp_path and staging.name.startswith(".out.partial-")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="out already exists and is not empty.*--overwrite true"), \
            atomic_directory(target):
        pytest.fail("the block must not run")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
        assert (target / "a.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(path.name for path in target.iterdir()) == [MANIFEST, "b.txt"]
    assert list(json.loads((target / MANIFEST).read_text())["files"]) == ["b.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    link = tmp_path / "link"  # a link is the user's: neither it nor what it points to is replaced
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="link is a link, not a folder clip-prune wrote"), \
            atomic_directory(link, overwrite=True):
        pytest.fail("the block must not run")
    assert link.is_symlink() and (target / "b.txt").exists()


def test_overwrite_replaces_only_a_folder_that_holds_nothing_but_its_manifest_files(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "pruned").mkdir()
        (staging / "pruned" / "model.safetensors").write_text("weights")
        (staging / "empty").mkdir()
    assert list(json.loads((target / MANIFEST).read_text())["files"]) == ["pruned/model.safetensors"]
    check_free(target, overwrite=True)  # as written: clip-prune's (an empty folder holds nothing to lose)
    (target / "pruned" / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out holds files clip-prune did not write .*\(pruned/notes.md\)"), \
            atomic_directory(target, overwrite=True):
        pytest.fail("the block must not run")
    (target / "pruned" / "notes.md").unlink()
    (target / "pruned" / "model.safetensors").write_text("fine-tuned")  # saved over clip-prune's, same name
    with pytest.raises(FileExistsError, match=r"or that changed since \(pruned/model.safetensors\)"):
        check_free(target, overwrite=True)
    (target / MANIFEST).unlink()  # a folder without a manifest (an older clip-prune's, or anyone's) is not taken
    with pytest.raises(FileExistsError, match=r"\(pruned/model.safetensors\); it has no \.clip-prune\.json"), \
            atomic_directory(target, overwrite=True):
        pytest.fail("the block must not run")
    assert (target / "pruned" / "model.safetensors").read_text() == "fine-tuned"
    user = tmp_path / "user.txt"
    user.write_text("mine")
    with pytest.raises(FileExistsError, match="user.txt is a file, not a folder clip-prune wrote"), \
            atomic_directory(user, overwrite=True):
        pytest.fail("the block must not run")
    assert user.read_text() == "mine"


def test_a_file_written_into_a_finished_folder_joins_its_manifest(tmp_path) -> None:
    with atomic_directory(tmp_path / "run") as staging:
        (staging / "pruned").mkdir()
        (staging / "pruned" / "config.json").write_text("{}")
    onnx = tmp_path / "run" / "pruned" / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"graph")
    record_written(onnx)
    assert list(json.loads((tmp_path / "run" / MANIFEST).read_text())["files"]) == ["pruned/config.json",
                                                                                  "pruned/onnx/model.onnx"]
    check_free(tmp_path / "run", overwrite=True)  # still all clip-prune's


def test_a_file_beside_a_record_of_clip_prune_is_replaced_only_if_the_record_names_it(tmp_path) -> None:
    write_json_atomically(tmp_path / "model_report.json", {"describes": "model.onnx"})  # an earlier export's
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.bin").write_bytes(b"the user's")  # its report would have the same name
    check_file_free(tmp_path / "model.onnx", overwrite=True, record=tmp_path / "model_report.json")
    with pytest.raises(FileExistsError, match="model.bin is not a file clip-prune wrote"):
        check_file_free(tmp_path / "model.bin", overwrite=True, record=tmp_path / "model_report.json")


def test_staging_folders_of_another_output_are_not_taken_for_this_ones(tmp_path) -> None:
    other = tmp_path / ".run1.partial-abcd1234"
    other.mkdir()
    assert stale_stagings(tmp_path / "run[1]") == [] and stale_stagings(tmp_path / "run?") == []
    assert stale_stagings(tmp_path / "run1") == [other]


@pytest.mark.skipif(not os.path.ismount("/proc"), reason="needs a mount point to write to")
def test_a_mount_point_is_never_an_output() -> None:
    with pytest.raises(ValueError, match="/proc is a mount point"):
        check_output_location("/proc")


def test_a_concurrent_run_does_not_take_a_live_staging_folder_for_an_interrupted_one(tmp_path) -> None:
    first, second = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run")
    with first.writing(keep="fisher.safetensors"):
        first.file("fisher.safetensors").write_bytes(b"in progress")
        assert second.interrupted_runs() == [] and stale_stagings(tmp_path / "run") == []
        assert first.staging.is_dir()
    # Once the first is done (or dead: the lock goes with its process), its leftovers are another matter.
    assert (tmp_path / "run" / "fisher.safetensors").read_bytes() == b"in progress"


def test_a_staging_folder_is_never_seen_unlocked(tmp_path, monkeypatch) -> None:
    """Between creating its staging folder and locking it, a writer is not yet protected: it locks the folder under a
    name no one looks for, then renames it."""
    seen = []
    real_lock = files._lock
    monkeypatch.setattr(files, "_lock", lambda folder: (seen.append(stale_stagings(tmp_path / "run")),
                                                         real_lock(folder))[1])
    with atomic_directory(tmp_path / "run") as staging:
        assert seen == [[]] and stale_stagings(tmp_path / "run") == []
        assert files.STAGING_MARK in staging.name and staging.is_dir()
        assert not list(tmp_path.glob("*.creating-*"))


def wait_or_kill(child: int, timeout: float) -> None:
    """Reap a forked child; one stuck past `timeout` seconds is killed and fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(child, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail(f"the forked run did not end within {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_lock_is_held_across_processes(tmp_path) -> None:
    """A live staging folder of another process is not stale; once that process ends, it is."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the other run: holds its staging folder until told to stop
        os.close(write)
        try:
            with atomic_directory(tmp_path / "run", keep="fisher.safetensors") as staging:
                (staging / "fisher.safetensors").write_bytes(b"x")
                (tmp_path / "ready").write_text(str(staging))
                os.read(read, 1)
                raise SystemExit
        finally:
            os._exit(0)
    os.close(read)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert RunDirectory(tmp_path / "run").interrupted_runs() == []
    finally:
        os.write(write, b"x")
        wait_or_kill(child, timeout=60)
    staging = (tmp_path / "ready").read_text()
    assert [str(path) for path in RunDirectory(tmp_path / "run").interrupted_runs()] == [staging]


def test_demo_data_is_written_atomically(tmp_path, monkeypatch) -> None:
    import clip_prune.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_write_zero_shot", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_coco(tmp_path / "demo", num_train=2, num_val=1, zero_shot_per_class=1)
    assert list(tmp_path.iterdir()) == []


def test_json_is_written_atomically_and_not_over_an_existing_file(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomically(path, {"x": 1})
    with pytest.raises(FileExistsError, match="--overwrite true"):
        write_json_atomically(path, {"x": 2})
    write_json_atomically(path, {"x": 2}, overwrite=True)
    assert json.loads(path.read_text()) == {"written_by": "clip-prune", "x": 2} and len(list(tmp_path.iterdir())) == 1
    users = tmp_path / "users.json"
    users.write_text('{"x": 0}')
    with pytest.raises(FileExistsError, match="users.json is not a file clip-prune wrote"):
        write_json_atomically(users, {"x": 3}, overwrite=True)
    assert users.read_text() == '{"x": 0}'


def test_an_output_directory_that_holds_an_input_is_refused(tmp_path) -> None:
    """With --overwrite, replacing it would delete the checkpoint, masks or data the run reads."""
    checkpoint = tmp_path / "models" / "clip"
    checkpoint.mkdir(parents=True)
    for output, relation in ((checkpoint, "is"), (tmp_path / "models", "holds"), (checkpoint / "out", "lies inside")):
        with pytest.raises(ValueError, match=f"{relation} the input .*choose another --output_dir"):
            RunDirectory(output, overwrite=True, inputs=("openai/clip-vit-base-patch16", None, checkpoint))
        assert checkpoint.is_dir()
    RunDirectory(tmp_path / "models-pruned", overwrite=True, inputs=(checkpoint,))  # a sibling is fine
