"""Run directories that appear whole or not at all, and never replace a finished run unless asked."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class RunDirectory:
    """An output directory written in a hidden staging sibling and renamed into place when complete.

    Args:
        path: the final output directory.
        overwrite: replace `path` if it already exists (otherwise refuse, before any work).
    """

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        if self.path.exists() and not overwrite and (not self.path.is_dir() or any(self.path.iterdir())):
            raise FileExistsError(
                f"output directory {self.path} already exists and is not empty; choose another --output_dir "
                "or pass --overwrite true to replace it"
            )
        self.staging = self.path.parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}"

    def interrupted_runs(self) -> list[Path]:
        """Staging directories that earlier runs into the same `path` left behind, newest first."""
        found = [candidate for candidate in self.path.parent.glob(f".{self.path.name}.partial-*")
                 if candidate.is_dir() and candidate != self.staging]
        return sorted(found, key=lambda candidate: candidate.stat().st_mtime, reverse=True)

    def file(self, name: str) -> Path:
        """Path of `name` inside the staging directory (created on first use)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / name

    def write_json(self, name: str, content: Any) -> Path:
        path = self.file(name)
        path.write_text(json.dumps(content, indent=2) + "\n")
        return path

    def save_tensor(self, name: str, tensor: torch.Tensor) -> Path:
        path = self.file(name)
        torch.save(tensor.detach().cpu().contiguous(), path)
        return path

    def commit(self) -> Path:
        """Move the staged files into place (replacing an old run only when `overwrite`)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if not self.overwrite and any(self.path.iterdir()):
                raise FileExistsError(f"{self.path} appeared while this run was working; results are in {self.staging}")
            trash = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, trash)
            os.replace(self.staging, self.path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.staging, self.path)
        return self.path

    @contextmanager
    def abandoned_on_error(self, keep: str | None = None) -> Iterator[None]:
        """On an error inside the block, remove the staging directory, or keep it and say where if it holds `keep`
        (e.g. the Fisher statistics of a long pass, which `--fisher` can reuse)."""
        try:
            yield
        except BaseException:
            if keep is not None and (self.staging / keep).exists():
                warnings.warn(f"the run failed; {keep} was kept in {self.staging}: the same command run again "
                              "reuses it", stacklevel=3)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (a hard link: no copy, and its metadata stays the original's),
    or a byte copy where the file system cannot link."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_json_atomically(path: Path, content: Any, overwrite: bool = False) -> None:
    """Write `content` as JSON to `path` through a temporary sibling, refusing an existing file unless `overwrite`."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite true to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)
