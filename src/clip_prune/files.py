"""Directories that appear whole or not at all: written in a hidden staging sibling, renamed into place when complete.

One writer for every output folder of clip-prune (run directories, saved pruned models, the demo data set). It sits
below every other layer (it imports only `clip_prune.errors`), so that `data/` may use it as well as `core/`.

`--overwrite` must never cost a user a file of theirs: every folder written here carries a manifest of what it
holds (`MANIFEST`), and a folder is replaced only when everything in it is listed there. Folders that no output
may be (the current directory, the home directory, a filesystem root, or one holding them) are refused outright.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

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
    """Refuse an output folder whose replacement would take the current or home directory, or a filesystem root,
    and a mount point, which the final rename cannot replace."""
    target = Path(path).resolve()
    if target.parent == target:
        raise ValueError(f"the output {path} is a filesystem root; choose a folder of its own, e.g. outputs/run1")
    if os.path.ismount(target):
        raise ValueError(f"the output {path} is a mount point: a finished output takes its place by a rename, which a "
                         "mount point cannot take; choose a folder inside it")
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
        unlisted = "" if (path / MANIFEST).is_file() else f"; it has no {MANIFEST} (earlier versions wrote none)"
        raise FileExistsError(f"{path} holds files clip-prune did not write or that changed since ({shown}){unlisted}; "
                              "--overwrite replaces only clip-prune's own outputs: choose a new or empty folder, or "
                              "move those files away")


def check_file_free(path: str | Path, overwrite: bool, record: Path | None = None) -> None:
    """Refuse the file `path` before any work if it exists, unless `overwrite` and clip-prune wrote it: `record`
    (by default `path` itself) is a JSON file of clip-prune's, which says so in its `written_by` and, when it is
    another file's record, names that file in `describes`."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass --overwrite true to replace it")
    described = None if record is None else path.name
    if path.is_dir() or path.is_symlink() or not _written_by_clip_prune(record or path, described):
        raise FileExistsError(f"{path} is not a file clip-prune wrote; --overwrite replaces only clip-prune's own "
                              "outputs: choose another path, or move that file away")


def record_written(path: Path) -> None:
    """Add the file `path`, written into a finished clip-prune folder (an ONNX export beside a pruned model), to the
    manifest of every folder above it that has one, so that `--overwrite` still knows the folder for its own."""
    stat = os.lstat(path)
    for folder in Path(path).resolve().parents:
        manifest = folder / MANIFEST
        if manifest.is_file():
            content = json.loads(manifest.read_text())
            files = {**content.get("files", {}), path.resolve().relative_to(folder).as_posix(): _state(stat)}
            content["files"] = dict(sorted(files.items()))
            write_text_atomically(manifest, json.dumps(content, indent=1) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling: a reader sees the old content or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomically(path: Path, content: dict[str, Any], overwrite: bool = False) -> None:
    """Write `content` as JSON to `path` through a temporary sibling, marked as clip-prune's (`written_by`); an
    existing file is refused unless `overwrite` and clip-prune wrote it."""
    check_file_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"written_by": WRITTEN_BY, **content}, indent=2) + "\n")


def _written_by_clip_prune(record: Path, describes: str | None = None) -> bool:
    try:
        content = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(content, dict) and content.get("written_by") == WRITTEN_BY
            and (describes is None or content.get("describes") == describes))


def files_not_written_here(path: Path) -> list[str]:
    """What in the folder `path` its manifest does not list, or lists with another size or modification time (a
    file the user saved over clip-prune's under the same name); [] for a clip-prune output as it was written.

    A folder written before manifests existed counts as foreign: nothing proves the files are clip-prune's. Empty
    folders hold nothing to lose and are not counted."""
    if path.is_symlink() or not path.is_dir():
        return [path.name]
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
        listed = listed if isinstance(listed, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    return [name for name, state in _file_states(path).items() if name != MANIFEST and listed.get(name) != state]


def write_manifest(folder: Path) -> None:
    """List every file under `folder`, with its size and modification time, in its manifest (the last file written
    into it)."""
    content = {"written_by": WRITTEN_BY, "note": "clip-prune --overwrite replaces this folder only while it holds "
               "nothing but these files, unchanged ([bytes, modified ns])",
               "files": {name: state for name, state in _file_states(folder).items() if name != MANIFEST}}
    (folder / MANIFEST).write_text(json.dumps(content, indent=1) + "\n")


def _file_states(folder: Path) -> dict[str, list[int]]:
    """Every file and link under `folder`, by POSIX path relative to it: its [size, modification time in ns] (a
    link's own, not its target's)."""
    states = {}
    for directory, folders, files in os.walk(folder):
        relative = Path(directory).relative_to(folder)
        for name in [*files, *(name for name in folders if Path(directory, name).is_symlink())]:
            states[(relative / name).as_posix()] = _state(os.lstat(Path(directory, name)))
    return dict(sorted(states.items()))


def _state(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns]


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
    for candidate in path.parent.glob(f".{glob.escape(path.name)}{STAGING_MARK}*"):
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
    with _stop_signals_held():  # between the two renames `path` is missing: a stop must not land there
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


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back in the block (they arrive after it), where the platform allows."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
