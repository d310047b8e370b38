"""How clip-prune talks on the console: user errors as one line, quiet libraries, progress bars named for their work.

A user error (a check of clip-prune's own, on a path, value or file) prints one `clip-prune: error:`
block and exits with status 2; `--debug` or CLIP_PRUNE_DEBUG=1 shows its traceback instead, and
internal errors always keep theirs. A run's console holds its progress, its summary and where the
outputs went: library tips, banners and known-harmless warnings are silenced.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from transformers.utils import logging as transformers_logging

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/clip_prune
_python_format_warning = warnings.formatwarning

DEBUG_VARIABLE = "CLIP_PRUNE_DEBUG"
"""Environment switch (any value but empty or 0) that, like --debug, shows tracebacks of user errors."""

USER_ERRORS = (ValueError, TypeError, OSError)
"""What clip-prune's own checks raise for bad input (OSError covers missing and existing files)."""

HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning 2.6 on torch 2.9 internals, nothing to act on
    r".*does not have many workers",  # --data.num_workers is chosen on purpose (default: all cores)
    r".*`srun` command is available",  # SLURM hint; clip-prune launches its own processes
    r"You have overridden `on_before_batch_transfer`",  # MaskedCLIPModule's hook is meant to run beside our data
)


def debug_requested() -> bool:
    """Whether tracebacks of user errors are wanted (`--debug`, which `main` turns into CLIP_PRUNE_DEBUG=1)."""
    return os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def user_error(error: BaseException) -> BaseException | None:
    """The error of clip-prune's own input checks in `error`'s chain (jsonargparse wraps those raised while it
    builds the options), or None for an internal error."""
    seen: BaseException | None = error
    while seen is not None:
        traceback = seen.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        if (isinstance(seen, USER_ERRORS) and traceback is not None
                and Path(traceback.tb_frame.f_code.co_filename).is_relative_to(PACKAGE_DIR)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
        sys.stderr.write(f"clip-prune: error: {message}\n(options: {parser.prog.replace(' [options]', '')} --help)\n")
        self.exit(2)


class _NamedValidation:
    """A progress bar whose validation loop is labelled by what it does here (`description`)."""

    description = "Validation"

    @property
    def validation_description(self) -> str:
        return self.description


class NamedTQDMProgressBar(_NamedValidation, TQDMProgressBar):
    """Lightning's tqdm bar with a named validation loop."""


class NamedRichProgressBar(_NamedValidation, RichProgressBar):
    """Lightning's rich bar with a named validation loop."""


def name_validation_bar(trainer: L.Trainer, description: str) -> None:
    """Label Lightning's default progress bar with `description` (e.g. "Fisher pass") instead of "Validation"."""
    bar = trainer.progress_bar_callback
    named = {TQDMProgressBar: NamedTQDMProgressBar, RichProgressBar: NamedRichProgressBar}
    if type(bar) in named:  # a bar the user configured is left as it is
        trainer.callbacks[trainer.callbacks.index(bar)] = named[type(bar)]()
    if isinstance(trainer.progress_bar_callback, _NamedValidation):
        trainer.progress_bar_callback.description = description
