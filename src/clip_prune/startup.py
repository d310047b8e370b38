"""Where a command's time goes before its first batch: laps of one process-wide stopwatch, for `report.json`.

Imported first by `clip_prune/__init__.py` (standard library only), so its clock starts before the heavy imports.
Each lap is named after what just finished; the laps stop at the first calibration batch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), None elsewhere: the interpreter's own start-up."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Laps since the last one, summed by stage name, until `stop`."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}
        interpreter = process_age()
        if interpreter is not None:
            self.laps["interpreter"] = interpreter
        self.running = True
        self._begun = False

    def begin(self) -> None:
        """The command starts: the first time, the laps so far are the imports; a later command in the same process
        (tests, notebooks) starts a new count from now."""
        if self._begun:
            self.laps, self.running, self._last = {}, True, time.perf_counter()
        else:
            self.lap("imports")
        self._begun = True

    def lap(self, stage: str) -> None:
        """The seconds since the last lap, added to `stage` (nothing once stopped)."""
        now = time.perf_counter()
        if self.running:
            self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now

    def stop(self, stage: str) -> None:
        """The last lap: the first batch is here."""
        self.lap(stage)
        self.running = False

    def report(self) -> dict[str, float]:
        """The laps and their total (seconds)."""
        return {**self.laps, "total": sum(self.laps.values())}


STARTUP = Stopwatch()
"""This process's stopwatch from its start to its first calibration batch."""
