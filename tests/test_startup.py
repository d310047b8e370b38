"""The stopwatch of the time before the first batch, and its report in a real run."""

import json
import time

import pytest

from clip_prune.startup import Stopwatch, process_age


def test_laps_add_up_by_stage_and_stop_at_the_first_batch() -> None:
    watch = Stopwatch()
    watch.begin()
    time.sleep(0.02)
    watch.lap("model_load")
    time.sleep(0.01)
    watch.lap("model_load")
    watch.stop("first_batch")
    time.sleep(0.01)
    watch.lap("later")  # after the first batch: not part of the start-up
    report = watch.report()
    assert "later" not in report and report["model_load"] >= 0.03
    assert report["total"] == pytest.approx(sum(value for key, value in report.items() if key != "total"))


def test_a_second_command_in_one_process_counts_from_its_own_start() -> None:
    watch = Stopwatch()
    watch.begin()
    watch.stop("first_batch")
    time.sleep(0.02)
    watch.begin()
    assert watch.running and set(watch.laps) == set() and watch.report()["total"] == 0


def test_the_process_age_is_the_interpreter_start_up_where_linux_tells_it() -> None:
    age = process_age()
    assert age is None or 0 <= age < 24 * 3600


def test_a_prune_run_reports_its_start_up_stages(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    from test_cli import run_prune

    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--options.reconstruct", "none")
    startup = json.loads((tmp_path / "run" / "report.json").read_text())["startup_s"]
    assert {"arguments", "model_load", "data_and_trainer_init", "cli", "run_setup", "data_setup", "lightning_setup",
            "first_batch"} <= set(startup)
    assert all(seconds >= 0 for seconds in startup.values())
    assert startup["total"] == pytest.approx(sum(value for key, value in startup.items() if key != "total"))
