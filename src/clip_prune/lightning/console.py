"""How clip-prune talks on the console: user errors as one line, quiet libraries, progress bars named for their work.

A user error (a check of clip-prune's own, on a path, value or file) prints one `clip-prune: error:`
block and exits with status 2; `--debug` or CLIP_PRUNE_DEBUG=1 shows its traceback instead, and
internal errors always keep theirs. A run's console holds its progress, its summary and where the
outputs went: library tips, banners and known-harmless warnings are silenced.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from clip_prune.errors import MissingExtra

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/clip_prune
_python_format_warning = warnings.formatwarning

DEBUG_VARIABLE = "CLIP_PRUNE_DEBUG"
"""Environment switch (any value but empty or 0) that, like --debug, shows tracebacks of user errors."""

USER_ERRORS = (ValueError, TypeError, OSError, MissingExtra)
"""What clip-prune's own checks raise for bad input (OSError covers missing and existing files)."""

DISK_PROBLEMS = {
    errno.ENOSPC: "cannot write {}: the disk is full; free some space or write the output to another disk",
    errno.EDQUOT: "cannot write {}: the disk quota is used up; free some space or write the output to another disk",
    errno.EROFS: "cannot write {}: the file system is read-only; write the output to a writable disk",
    errno.EACCES: "cannot use {}: permission denied; choose files and folders this user may read and write",
    errno.EPERM: "cannot use {}: operation not permitted; choose files and folders this user may read and write",
}
"""Errors of the machine, not of clip-prune, wherever a write or read meets them: each one a user can fix."""

HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning 2.6 on torch 2.9 internals, nothing to act on
    r".*does not have many workers",  # --data.num_workers is chosen on purpose (default: all cores)
    r".*`srun` command is available",  # SLURM hint; clip-prune launches its own processes
    r"You have overridden `on_before_batch_transfer`",  # MaskedCLIPModule's hook is meant to run beside our data
    r"No seed found, seed set to",  # LightningCLI seeds every verb; the pruning verbs draw nothing at random
)


def debug_requested() -> bool:
    """Whether tracebacks of user errors are wanted (`--debug`, which `main` turns into CLIP_PRUNE_DEBUG=1)."""
    return os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def user_error(error: BaseException) -> BaseException | str | None:
    """The error of clip-prune's own input checks in `error`'s chain (jsonargparse wraps those raised while it
    builds the options), or a full or read-only disk (as a sentence); None for an internal error."""
    seen: BaseException | None = error
    while seen is not None:
        disk = disk_problem(seen)
        if disk is not None:
            return disk
        traceback = seen.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        if (isinstance(seen, USER_ERRORS) and traceback is not None
                and Path(traceback.tb_frame.f_code.co_filename).is_relative_to(PACKAGE_DIR)):
            # An OSError made with an errno prints as "[Errno N] message: 'file'": say it as a sentence.
            if isinstance(seen, OSError) and seen.errno and seen.strerror:
                where = str(seen.filename or "")
                return seen.strerror + (f": {where}" if where and where not in seen.strerror else "")
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_problem(error: BaseException) -> str | None:
    """What is wrong with the disk or the permissions `error` met, with the fix; None if it is no such error. Only
    the system's own error number counts (safetensors reports it in its message), not a message that merely reads
    alike: DataLoader workers out of shared memory say "No space left on device" of /dev/shm, not of the output."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code not in DISK_PROBLEMS:
        numbered = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
        code = int(numbered.group(1)) if numbered else None
        if code not in DISK_PROBLEMS:
            return None
    return DISK_PROBLEMS[code].format(getattr(error, "filename", None) or "the output")


def quiet_the_libraries(debug: bool) -> None:
    """Keep a run's console to progress, summary and outputs: no library tips, banners or known-harmless warnings."""
    warnings.formatwarning = _format_warning
    if debug:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available", seed, tips and launcher banners
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """clip-prune's own warnings as one `clip-prune: warning:` line; other libraries' as Python prints them."""
    if Path(filename).is_relative_to(PACKAGE_DIR):
        return f"clip-prune: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class ClipPruneArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one `clip-prune: error:` block instead of the full usage first.

    Args:
        verb: the subcommand this parser is for (None: the main parser); `ClipPruneCLI` gives each verb its classes.
    """

    def __init__(self, *args: Any, verb: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verb = verb

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_requested():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"clip-prune: error: {plain_parser_message(message)}\n"
                         f"(options: {parser.prog.replace(' [options]', '')} --help)\n")
        self.exit(2)


TYPE_WORDS = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "a text",
              "list": "a list such as '[1, 2]'", "dict": "a mapping"}
"""How a value's expected type reads in an error, for jsonargparse's type names."""
REQUIRED_EXAMPLES = {"model.pretrained": "a Hub name such as openai/clip-vit-base-patch16, or a folder written by "
                                         "save_pretrained"}
"""What to give for a required option that was left out."""


def plain_parser_message(message: str) -> str:
    """jsonargparse's report of a value of the wrong type (a block naming Python classes and union subtypes) as one
    line: the option, the value given and what it takes; other messages as they are."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return message
    option = "--" + ".".join(keys)
    given = re.findall(r"Got value: (.*)", message) or re.findall(r"Given value: (.*)", message)
    value = given[0].strip() if given else None
    if value == "None":
        example = REQUIRED_EXAMPLES.get(".".join(keys))
        return f"{option} is required" + (f": {example}" if example else "")
    expected = []
    for name in re.findall(r"Expected an? (?:<class '(?:[\w.]*\.)?(\w+)'>|typing\.(Literal\[.*?\]))", message):
        word = TYPE_WORDS.get(name[0]) if name[0] else "one of " + name[1].removeprefix("Literal[").removesuffix("]")
        if word is not None and word not in expected:
            expected.append(word)
    if "dot import path" in message:
        expected.append(f"its fields set one by one (e.g. {option}.steps 2)")
    if not expected:
        return message.splitlines()[0] + " " + " ".join(line.strip() for line in message.splitlines()[1:3])
    return f"{option}: got {value}, expected {' or '.join(expected)}"


class _NamedValidation:
    """A progress bar whose validation loop is labelled by what it does here (`description`)."""

    description = "Validation"

    @property
    def validation_description(self) -> str:
        return self.description


class NamedTQDMProgressBar(_NamedValidation, TQDMProgressBar):
    """Lightning's tqdm bar with a named validation loop, on stderr (Lightning draws it on stdout, where it would
    mix with the results: redirected, a log would hold every redraw)."""

    def init_sanity_tqdm(self) -> Any:
        with redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Any:
        with redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self) -> Any:
        with redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()


class NamedRichProgressBar(_NamedValidation, RichProgressBar):
    """Lightning's rich bar with a named validation loop, on stderr (see `NamedTQDMProgressBar`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"console_kwargs": {"stderr": True}, **kwargs})


def progress_on_stderr(trainer: L.Trainer) -> None:
    """Put Lightning's default progress bar on stderr, named (a bar the user configured is left as it is)."""
    bar = trainer.progress_bar_callback
    ours = {TQDMProgressBar: NamedTQDMProgressBar, RichProgressBar: NamedRichProgressBar}
    if type(bar) in ours:
        trainer.callbacks[trainer.callbacks.index(bar)] = ours[type(bar)]()


def name_validation_bar(trainer: L.Trainer, description: str) -> None:
    """Label the validation loop's bar with `description` (e.g. "Fisher pass") instead of "Validation"."""
    if isinstance(trainer.progress_bar_callback, _NamedValidation):
        trainer.progress_bar_callback.description = description
