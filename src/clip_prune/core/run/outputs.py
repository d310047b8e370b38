"""Run directories that appear whole or not at all, and never replace a finished run unless asked."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from clip_prune.files import (
    atomic_directory,
    check_free,
    check_output_location,
    new_staging,
    stale_stagings,
)


def check_not_an_input(output: Path, inputs: tuple[str | Path | None, ...]) -> None:
    """Refuse an output directory that is, holds or lies inside one of the run's local inputs: replacing it would
    delete the input, or write into a folder (a data set, a checkpoint) that is the user's."""
    target = output.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a Hub name, or an input that is not there (its own check says so)
        source = Path(item).resolve()
        if source == target or target in source.parents:
            relation = "is" if source == target else "holds"
            raise ValueError(f"the output directory {output} {relation} the input {item}: writing the run there would "
                             "delete it; choose another --output_dir")
        if source in target.parents:
            raise ValueError(f"the output directory {output} lies inside the input {item}; keep outputs apart from "
                             "the data and models they are made from: choose another --output_dir")


class RunFolder:
    """A folder of a run being written: its files go to the same place in the run's staging directory.

    Args:
        path: where the folder will be once the run is in place.
        staging: where it is written meanwhile.
    """

    def __init__(self, path: Path, staging: Path) -> None:
        self.path = path
        self.staging = staging

    def folder(self, name: str) -> RunFolder:
        """The sub-folder `name` (e.g. one point of a run over several constraints)."""
        return RunFolder(self.path / name, self.staging / name)

    def file(self, name: str) -> Path:
        """Path of `name` inside the staging directory (created on first use)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / name

    def write_json(self, name: str, content: Any) -> Path:
        path = self.file(name)
        path.write_text(json.dumps(content, indent=2) + "\n")
        return path

    def save_tensor(self, name: str, tensor: torch.Tensor) -> Path:
        """Save `tensor` with `torch.save` (the original tool's mask format), through Python's file writes: torch's own
        writer reports a full disk as an unrelated "unexpected pos" error."""
        serialised = io.BytesIO()
        torch.save(tensor.detach().cpu().contiguous(), serialised)
        path = self.file(name)
        path.write_bytes(serialised.getvalue())
        return path


class RunDirectory(RunFolder):
    """An output directory written in a hidden staging sibling and renamed into place when complete
    (`clip_prune.files.atomic_directory`).

    Files go to the staging folder (`file`, `write_json`, `save_tensor`); the rank that writes the run wraps
    its work in `writing()`, at whose end the run takes its place.

    Args:
        path: the final output directory.
        overwrite: replace `path` if it already exists (otherwise refuse, before any work).
        inputs: what the run reads (checkpoint, masks, data): refused as `path` or inside it, which replacing
            `path` would delete.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> None:
        path = Path(path)
        check_output_location(path)  # first: "/" holds every input, but that is not the point to make
        check_not_an_input(path, inputs)
        check_free(path, overwrite)
        super().__init__(path, new_staging(path))
        self.overwrite = overwrite

    def interrupted_runs(self) -> list[Path]:
        """Staging directories that interrupted runs into the same `path` left behind, newest first (never the
        staging directory of a run still at work)."""
        return [candidate for candidate in stale_stagings(self.path) if candidate != self.staging]

    @contextmanager
    def writing(self, keep: str | None = None) -> Iterator[RunDirectory]:
        """Write the run in the block: at its end the staged files take `path`'s place. On an error the staging
        directory is removed, or kept (a warning says where) if it holds `keep` (e.g. the Fisher statistics of a
        long pass, which a rerun reuses)."""
        with atomic_directory(self.path, self.overwrite, keep=keep, staging=self.staging):
            yield self


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (a hard link: no copy, and its metadata stays the original's),
    or a byte copy where the file system cannot link."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
