"""Directories that appear whole or not at all: written in a hidden staging sibling, renamed into place when complete.

One writer for every output folder of clip-prune (run directories, saved pruned models, the demo data set). It sits
below every other layer (it imports nothing of clip_prune), so that `data/` may use it as well as `core/`.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): every staging folder is taken for an interrupted writer's
    fcntl = None  # type: ignore[assignment]

STAGING_MARK = ".partial-"
"""What a staging folder's name holds between the hidden target name and its random suffix."""


def is_occupied(path: Path) -> bool:
    """Whether writing `path` would replace something: it exists and is not an empty folder (or it is a link)."""
    return path.is_symlink() or (path.exists() and not (path.is_dir() and not any(path.iterdir())))


def check_free(path: str | Path, overwrite: bool) -> None:
    """Refuse `path` before any work if it holds something, unless `overwrite`."""
    if not overwrite and is_occupied(Path(path)):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or pass --overwrite "
                              "true (overwrite=True from Python) to replace it")


def new_staging(path: str | Path) -> Path:
    """A fresh staging path for `path`: the hidden sibling `.NAME.partial-XXXXXXXX` (not created)."""
    path = Path(path)
    return path.parent / f".{path.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"


def stale_stagings(path: str | Path) -> list[Path]:
    """Staging folders of `path` that no live writer holds (an interrupted writer's), newest first.

    A writer holds its staging folder locked while it works (`atomic_directory`); the lock goes with the
    process, so a folder of a concurrent run into the same `path` is never listed, and never removed.
    """
    path = Path(path)
    found = []
    for candidate in path.parent.glob(f".{path.name}{STAGING_MARK}*"):
        try:
            if candidate.is_dir() and not _is_locked(candidate):
                found.append((candidate.stat().st_mtime, candidate))
        except FileNotFoundError:  # a concurrent writer finished and renamed it meanwhile
            continue
    return [candidate for _, candidate in sorted(found, reverse=True)]


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False, keep: str | None = None,
                     staging: Path | None = None) -> Iterator[Path]:
    """Write the folder `path` through a hidden staging sibling that takes its place only when complete.

    The block gets the staging folder (created, and locked for as long as the block runs, so that
    concurrent writers into the same `path` never take it for an interrupted one's). When the block
    ends without error the staging folder is renamed to `path`; what was at `path` is removed only
    after that, and only if `overwrite`. When the block fails the staging folder is removed, unless
    it holds the file `keep` (costly work worth reusing), which a warning then names.

    Args:
        path: the folder to write.
        overwrite: replace what `path` holds (otherwise refuse before the block runs).
        keep: name of a file whose presence keeps the staging folder after a failure.
        staging: the staging folder to use (`new_staging(path)`, the default), e.g. one chosen beforehand.
    """
    path = Path(path)
    check_free(path, overwrite)
    staging = new_staging(path) if staging is None else Path(staging)
    lock = _lock(staging) if staging.is_dir() else _create_locked(staging)
    try:
        try:
            yield staging
        except BaseException:
            if keep is not None and (staging / keep).exists():
                warnings.warn(f"the run failed; {keep} was kept in {staging}: the same command run again reuses it",
                              stacklevel=3)
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _move_into_place(staging, path, overwrite)
    finally:
        _unlock(lock)


def _move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    """Rename `staging` to `path`, removing what was at `path` only once `staging` is in place."""
    if not (path.exists() or path.is_symlink()):
        os.replace(staging, path)
        return
    if not overwrite and is_occupied(path):
        raise FileExistsError(f"{path} appeared while this was being written; the result is in {staging}")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError:
        os.replace(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _create_locked(staging: Path) -> int | None:
    """Create `staging` already locked: made and locked under a name `stale_stagings` does not match, then renamed
    (the lock is on the folder itself and moves with it), so no other run ever sees it unlocked."""
    creating = staging.with_name(staging.name.replace(STAGING_MARK, ".creating-"))
    creating.mkdir(parents=True)
    lock = _lock(creating)
    os.rename(creating, staging)
    return lock


def _lock(folder: Path) -> int | None:
    """Hold `folder` (an flock on the folder itself: no lock file to clean up, released when the process ends)."""
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def _unlock(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)  # closing the descriptor releases its flock


def _is_locked(folder: Path) -> bool:
    """Whether a live writer holds `folder` (see `_lock`).

    The probe asks for a shared lock: it fails against a writer's exclusive one, but not against another probe, so
    processes looking at the same interrupted run at once (DDP ranks) all see it as interrupted."""
    if fcntl is None:
        return False
    descriptor = os.open(folder, os.O_RDONLY)  # FileNotFoundError if it was renamed meanwhile
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        with suppress(OSError):
            os.close(descriptor)
    return False
