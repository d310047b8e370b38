"""Directories that appear whole or not at all: written in a hidden staging sibling, renamed into place when complete.

One writer for every output folder of clip-prune (run directories, saved pruned models, the demo data set). It sits
below every other layer (it imports only `clip_prune.errors`), so that `data/` may use it as well as `core/`.

`--overwrite` must never cost a user a file of theirs: every folder written here carries a manifest of what it
holds (`MANIFEST`), and a folder is replaced only when everything in it is listed there. Folders that no output
may be (the current directory, the home directory, a filesystem root, or one holding them) are refused outright.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from clip_prune.errors import add_note

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): every staging folder is taken for an interrupted writer's
    fcntl = None  # type: ignore[assignment]

STAGING_MARK = ".partial-"
"""What a staging folder's name holds between the hidden target name and its random suffix."""


MANIFEST = ".clip-prune.json"
"""The file in every folder clip-prune writes that lists the folder's files: what `--overwrite` may replace."""
WRITTEN_BY = "clip-prune"
"""The `written_by` value of the manifests and of the JSON files clip-prune writes: whose they are."""


def is_occupied(path: Path) -> bool:
    """Whether writing `path` would replace something: it exists and is not an empty folder (or it is a link)."""
    return path.is_symlink() or (path.exists() and not (path.is_dir() and not any(path.iterdir())))


def check_output_location(path: str | Path) -> None:
    """Refuse an output folder whose replacement would take the current or home directory, or a filesystem root."""
    target = Path(path).resolve()
    if target.parent == target:
        raise ValueError(f"the output {path} is a filesystem root; choose a folder of its own, e.g. outputs/run1")
    protected = ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home directory"))
    for place, name in protected:
        if target == place or target in place.parents:
            relation = "is" if target == place else "holds"
            raise ValueError(f"the output {path} {relation} {name}, which writing a result there would replace; "
                             "choose a folder of its own, e.g. outputs/run1")


def check_free(path: str | Path, overwrite: bool) -> None:
    """Refuse `path` before any work if it holds something, unless `overwrite` and all of it is clip-prune's."""
    path = Path(path)
    check_output_location(path)
    if not is_occupied(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or pass --overwrite "
                              "true (overwrite=True from Python) to replace it")
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} is a {'link' if path.is_symlink() else 'file'}, not a folder clip-prune wrote; "
                              "--overwrite replaces only clip-prune's own outputs: choose another path")
    foreign = files_not_written_here(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"{path} holds files clip-prune did not write ({shown}); --overwrite replaces only "
                              "clip-prune's own outputs: choose a new or empty folder, or move those files away")


def check_file_free(path: str | Path, overwrite: bool, record: Path | None = None) -> None:
    """Refuse the file `path` before any work if it exists, unless `overwrite` and clip-prune wrote it: `record`
    (by default `path` itself) is a JSON file of clip-prune's, which says so in its `written_by`."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass --overwrite true to replace it")
    if path.is_dir() or path.is_symlink() or not _written_by_clip_prune(record or path):
        raise FileExistsError(f"{path} is not a file clip-prune wrote; --overwrite replaces only clip-prune's own "
                              "outputs: choose another path, or move that file away")


def record_written(path: Path) -> None:
    """Add the file `path`, written into a finished clip-prune folder (an ONNX export beside a pruned model), to the
    manifest of every folder above it that has one, so that `--overwrite` still knows the folder for its own."""
    for folder in Path(path).resolve().parents:
        manifest = folder / MANIFEST
        if manifest.is_file():
            content = json.loads(manifest.read_text())
            content["files"] = sorted({*content.get("files", []), path.resolve().relative_to(folder).as_posix()})
            write_text_atomically(manifest, json.dumps(content, indent=1) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling: a reader sees the old content or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _written_by_clip_prune(record: Path) -> bool:
    try:
        content = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("written_by") == WRITTEN_BY


def files_not_written_here(path: Path) -> list[str]:
    """What in the folder `path` its manifest does not list (everything, if it has none); [] for a clip-prune output.

    A folder written before manifests existed counts as foreign: nothing proves the files are clip-prune's."""
    if path.is_symlink() or not path.is_dir():
        return [path.name]
    try:
        listed = set(json.loads((path / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return [name for name in _relative_files(path) if name not in listed and name != MANIFEST]


def write_manifest(folder: Path) -> None:
    """List every file under `folder` in its manifest (the last file written into it)."""
    names = sorted(name for name in _relative_files(folder) if name != MANIFEST)
    content = {"written_by": WRITTEN_BY, "note": "clip-prune --overwrite replaces this folder only while it holds "
               "nothing but these files", "files": names}
    (folder / MANIFEST).write_text(json.dumps(content, indent=1) + "\n")


def _relative_files(folder: Path) -> list[str]:
    """Every file and link under `folder` (and every empty folder), as POSIX paths relative to it."""
    found = []
    for directory, folders, files in os.walk(folder):
        relative = Path(directory).relative_to(folder)
        found += [(relative / name).as_posix() for name in files]
        found += [(relative / name).as_posix() for name in folders if Path(directory, name).is_symlink()]
        if not folders and not files and directory != str(folder):
            found.append(relative.as_posix() + "/")
    return sorted(found)


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
    ends without error its manifest is written and the staging folder is renamed to `path`; what was at
    `path` is removed only after that, and only if `overwrite` and it is clip-prune's. When the block fails
    the staging folder is removed, unless it holds the file `keep` (costly work worth reusing), which a
    warning then names.

    Args:
        path: the folder to write.
        overwrite: replace what `path` holds if clip-prune wrote all of it (otherwise refuse before the block runs).
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
        except BaseException as error:
            if keep is not None and (staging / keep).exists():
                add_note(error, f"{keep} was kept in {staging}: a rerun into {path} resumes from it")
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        write_manifest(staging)
        _move_into_place(staging, path, overwrite)
    finally:
        _unlock(lock)


def _move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    """Rename `staging` to `path`, removing what was at `path` only once `staging` is in place."""
    if not (path.exists() or path.is_symlink()):
        os.replace(staging, path)
        return
    if is_occupied(path) and (not overwrite or files_not_written_here(path)):
        raise FileExistsError(f"{path} was filled while this was being written; the result is in {staging}")
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
    try:
        creating.mkdir(parents=True)
    except OSError as error:  # e.g. /proc, a read-only disk, a file where a folder should be
        raise OSError(error.errno, f"cannot create a folder in {staging.parent} ({error.strerror}); choose an output "
                      "on a writable disk", str(staging.parent)) from error
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
