"""Run directories appear whole, never replace a run unless asked, and keep what a failure should not lose."""

from __future__ import annotations

import json

import pytest

from clip_prune.core.outputs import RunDirectory, write_json_atomically


def test_run_directory_is_staged_then_renamed(tmp_path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.write_json("report.json", {"a": 1})
    assert not (tmp_path / "run").exists()
    run.commit()
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"a": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    with pytest.raises(FileExistsError, match="--overwrite true"):
        RunDirectory(tmp_path / "run")
    again = RunDirectory(tmp_path / "run", overwrite=True)
    again.write_json("report.json", {"a": 2})
    again.commit()
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"a": 2}
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_failed_run_keeps_only_what_is_worth_keeping(tmp_path) -> None:
    run = RunDirectory(tmp_path / "cheap")
    with pytest.raises(RuntimeError), run.abandoned_on_error(keep="fisher.safetensors"):
        run.write_json("report.json", {})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    run = RunDirectory(tmp_path / "costly")
    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="fisher.safetensors was kept in"), \
            run.abandoned_on_error(keep="fisher.safetensors"):
        run.file("fisher.safetensors").write_bytes(b"statistics")
        raise RuntimeError("boom")
    assert (run.staging / "fisher.safetensors").read_bytes() == b"statistics"


def test_json_is_written_atomically_and_not_over_an_existing_file(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomically(path, {"x": 1})
    with pytest.raises(FileExistsError, match="--overwrite true"):
        write_json_atomically(path, {"x": 2})
    write_json_atomically(path, {"x": 2}, overwrite=True)
    assert json.loads(path.read_text()) == {"x": 2} and len(list(tmp_path.iterdir())) == 1
