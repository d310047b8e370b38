"""The `clip-prune` command: one LightningCLI whose subcommands are the methods of `ClipPruneTrainer`.

LightningCLI dispatches every verb itself: `subcommands()` extends the two of Lightning's that the demo CLIP's
module has steps for (fit and validate; test and predict would fail on it) with clip-prune's, each a Trainer
method whose typed arguments are its options. Each verb's parser gets the model and data classes it works on
(`VERB_CLASSES`, through the public `add_core_arguments_to_parser`): none for the verbs that need neither, so they
run without `--model.pretrained`.
Defaults of one verb only are YAML files in `lightning/defaults/` named after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import lightning as L
import torch
import torch.distributed
import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from clip_prune.errors import notes
from clip_prune.lightning.console import (
    DEBUG_VARIABLE,
    ClipPruneArgumentParser,
    debug_requested,
    progress_on_stderr,
    quiet_the_libraries,
    user_error,
)
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.lightning.trainer import ClipPruneTrainer
from clip_prune.lightning.training import CocoTrainingDataModule, ContrastiveTrainingModule
from clip_prune.startup import STARTUP

PRUNING_VERBS = ("prune", "apply", "evaluate", "sensitivity")
"""Verbs on a CLIP checkpoint (`MaskedCLIPModule`) and COCO captions (`CocoDataModule`)."""
TOOL_VERBS = ("make-demo-data", "export-onnx")
"""Verbs that need no model and no data."""
DEMO_VERBS = ("fit", "validate")
"""Lightning's verbs that the demo trainer (`ContrastiveTrainingModule`) implements."""
_DEMO_TRAINING = (ContrastiveTrainingModule, CocoTrainingDataModule)
VERB_CLASSES: dict[str, tuple[type[L.LightningModule] | None, type[L.LightningDataModule] | None]] = {
    **dict.fromkeys(DEMO_VERBS, _DEMO_TRAINING),
    **dict.fromkeys(PRUNING_VERBS, (MaskedCLIPModule, CocoDataModule)),
    **dict.fromkeys(TOOL_VERBS, (None, None)),
}
"""The LightningModule and LightningDataModule each verb's `--model.*` and `--data.*` options configure."""
VERB_DEFAULTS = Path(__file__).parent / "defaults"
"""`VERB.yaml` here holds defaults of that verb only, read before `--config` (e.g. sensitivity's sample count)."""


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"data": {"num_samples": 128}}` as `{"data.num_samples": 128}`, the keys `parser.set_defaults` takes."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


class LoggerConfigCallback(SaveConfigCallback):
    """Lightning's config saver, but only into a logger's folder: without a logger it would write
    ./config.yaml over whatever is there; every run directory gets its own config.yaml anyway."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class ClipPruneCLI(LightningCLI):
    """LightningCLI for every clip-prune verb; the checkpoint is named once (`--model.pretrained`). `run_cli` builds
    it with clip-prune's settings."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands for the demo and clip-prune's verbs, each with the method arguments the CLI fills
        itself."""
        lightning_verbs = {verb: skip for verb, skip in LightningCLI.subcommands().items() if verb in DEMO_VERBS}
        return lightning_verbs | {verb: {"model", "datamodule"} for verb in PRUNING_VERBS + TOOL_VERBS}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The options of the trainer, model and data of this parser's verb (a verb without model and data has no
        use for trainer options either)."""
        model_class, datamodule_class = self.classes_of(parser)
        if (model_class, datamodule_class) != (None, None):
            parser.add_lightning_class_args(self.trainer_class, "trainer")
            parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items()
                                if key != "callbacks"})  # as LightningCLI does: callbacks are not options
        if model_class is not None:
            parser.add_lightning_class_args(model_class, "model")
        if datamodule_class is not None:
            parser.add_lightning_class_args(datamodule_class, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the checkpoint to the data module's (its processor and tokenizer); set the verb's own defaults."""
        if None not in self.classes_of(parser):
            parser.link_arguments("model.pretrained", "data.pretrained")
        defaults = VERB_DEFAULTS / f"{getattr(parser, 'verb', None)}.yaml"
        if defaults.is_file():
            # Not jsonargparse's default_config_files: those are checked before the command line fills
            # --model.pretrained, which the link above needs.
            parser.set_defaults(dotted_keys(yaml.safe_load(defaults.read_text())))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer whose method runs the verb; a default one for the verbs without trainer options."""
        if self.subcommand in TOOL_VERBS:
            kwargs.setdefault("callbacks", [])  # what the trainer options would give (LightningCLI adds its own)
        else:
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            check_accelerator(config.trainer.accelerator)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # Lightning's refusal of the trainer options given
            raise ValueError(f"{error} (check the --trainer.* options)") from error
        progress_on_stderr(trainer)
        STARTUP.lap("data_and_trainer_init")
        return trainer

    def classes_of(self, parser: LightningArgumentParser) -> tuple[type | None, type | None]:
        """The model and data classes of `parser`'s verb (the pruning ones for the parser of `run=False`)."""
        return VERB_CLASSES.get(getattr(parser, "verb", None), (self.model_class, self.datamodule_class))


def check_accelerator(accelerator: Any) -> None:
    """Refuse a GPU accelerator where PyTorch sees no GPU, with the fix (Lightning's own error names no option)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--trainer.accelerator {accelerator}: PyTorch sees no GPU here (torch.cuda.is_available() "
                         "is False); use --trainer.accelerator cpu, or auto to take a GPU "
                         "where there is one")


def run_cli(args: ArgsType = None, run: bool = True, cli_class: type[ClipPruneCLI] = ClipPruneCLI) -> ClipPruneCLI:
    """The `clip-prune` command without its error handling: parse `args`, instantiate the verb's classes, run it.

    Args:
        args: the command line after `clip-prune` (None: sys.argv), as LightningCLI takes it.
        run: run the verb (False: only parse and instantiate, without subcommands, on the pruning classes).
        cli_class: `ClipPruneCLI` or a subclass (e.g. with LightningCLI's `before_VERB` hooks).
    """
    return cli_class(
        MaskedCLIPModule,
        CocoDataModule,
        trainer_class=ClipPruneTrainer,
        parser_class=ClipPruneArgumentParser,
        trainer_defaults={"inference_mode": False, "enable_checkpointing": False},
        save_config_callback=LoggerConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
        parser_kwargs={
            "description": "Prune the vision tower of a CLIP model without retraining. fit (and validate) train "
                           "the demo CLIP: --config configs/demo_train.yaml. Add --debug (or set "
                           f"{DEBUG_VARIABLE}=1) to see the traceback of an error.",
            **{verb: {"verb": verb} for verb in cli_class.subcommands()},  # the parser of each verb knows it
        },
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of `clip-prune`; `args` replaces sys.argv[1:] (for tests).

    A user error (bad path, value or file, refused overwrite, full disk) prints one `clip-prune: error:` block and
    exits with status 2; `--debug` or CLIP_PRUNE_DEBUG=1 raises it with its traceback instead, as internal errors
    are. SIGINT and SIGTERM stop a run with one line that says what was kept, and the shell's status (130, 143).
    """
    STARTUP.begin()
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[DEBUG_VARIABLE] = "1"  # DDP launches this command again in each process: tell them too
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given both)
    debug = debug_requested()
    quiet_the_libraries(debug)
    # Dataclass fields document themselves with a docstring below them: show those in --help
    # (reading them costs about a second, so only when help is asked for).
    set_parsing_settings(docstring_parse_attribute_docstrings=any(arg.endswith("help") for arg in argv))
    succeeded = False
    with stop_signals_recorded() as received:
        try:
            run_cli(None if args is None else argv)
            succeeded = True
        except BaseException as error:
            if received or isinstance(error, SIGTERMException):
                # Lightning turns SIGTERM into a SIGTERMException or an exit without a code, i.e. status 0, and the
                # signal may first surface as a DataLoader whose workers it killed: say what stopped the run.
                stopped_by(received[0] if received else signal.SIGTERM, error)
            if debug or not isinstance(error, Exception):
                raise
            cause = user_error(error)
            if cause is None:
                raise
            print("\n".join([f"clip-prune: error: {cause}", *notes(error),
                             f"(run with --debug or {DEBUG_VARIABLE}=1 to see the traceback)"]), file=sys.stderr)
            sys.exit(2)
        finally:
            close_process_group(succeeded)


STOP_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The signals that stop a run, and the status the shell gives a process they stop (128 + the signal)."""


@contextmanager
def stop_signals_recorded() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM as they arrive and stop the work with a KeyboardInterrupt (Lightning calls this
    handler after its own, which stops DDP's other processes), so that `main` can name the signal whatever error
    the stop then surfaces as. Only the main thread may set handlers: elsewhere nothing is recorded."""
    received: list[int] = []

    def stop(signum: int, _: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:  # a second signal while the first one's clean-up runs: stop at once, as asked
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        sys.unraisablehook = partial(quiet_stopped_workers, sys.unraisablehook)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    # A signal the shell set to be ignored (a job started in the background) stays ignored.
    previous = {number: signal.signal(number, stop) for number in STOP_STATUS
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def quiet_stopped_workers(report: Callable[[Any], None], unraisable: Any) -> None:
    """After a stop signal, drop the DataLoader's complaint that its workers, stopped by the same signal, are gone
    (raised while the loader is collected, where Python prints it as "Exception ignored"); report the rest."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and "DataLoader worker" in str(unraisable.exc_value)):
        report(unraisable)


def stopped_by(signum: int, error: BaseException) -> NoReturn:
    """Say which signal stopped the run and what it left (the notes of `error`), then exit with the shell's status."""
    kept = notes(error) or ["nothing of this run was kept (outputs appear only when complete): the same command "
                            "starts it again"]
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line for a DDP run, whose every process got the signal
        print(f"clip-prune: stopped by {signal.Signals(signum).name}; " + "; ".join(kept), file=sys.stderr)
    sys.exit(STOP_STATUS.get(signum, 1))


def close_process_group(succeeded: bool) -> None:
    """End a DDP run's process group while Python is still whole.

    Left to interpreter shutdown, gloo's worker threads can still hold tensors whose release needs the
    GIL, and the process aborts ("terminate called without an active exception", status -6) after its
    work is done, or turns a clear error's status 2 into an abort. Gloo's shutdown is local, so it is safe
    after a failure too; NCCL's may wait on ranks that failed elsewhere, so it is left to Lightning then.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if succeeded or torch.distributed.get_backend() == "gloo":
        torch.distributed.destroy_process_group()
