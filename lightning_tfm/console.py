"""What the `lightning_tfm` command prints around a run: third-party noise silenced one message at a time (never
all warnings, so our own `rank_zero_warn`s still show), a user's mistake as one line on stderr instead of a
traceback, and where a finished fit saved its checkpoints and logs."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

TRACEBACK_ENV = "LIGHTNING_TFM_TRACEBACK"

# Mistakes in a config or the data, whose message names the key or the file: one line, no traceback. Everything
# else (RuntimeError from torch, AssertionError, KeyError, KeyboardInterrupt, ...) is a bug or an interruption and
# keeps its traceback. FloatingPointError is only raised by our stop-on-NaN check (tasks/base.py), which says
# which setting to change.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, FloatingPointError, MisconfigurationException)


class _DropLightningTips(logging.Filter):
    """Lightning 2.6 logs "💡 Tip: For seamless cloud logging ... install [litlogger]" on every Trainer without a
    LitLogger (trainer/connectors/logger_connector.py), and "💡 Tip: For seamless cloud uploads ... [litmodels]"
    when it adds its default ModelCheckpoint (connectors/callback_connector.py). They are advertisements, logged
    with rank_zero_info like the lines we keep, and no setting turns them off, so they are dropped by text."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIPS = _DropLightningTips()


def quiet_third_party() -> None:
    """Silence the messages every run printed that tell a user nothing about their run. Each filter matches one
    message from one module; call it before the Trainer is built (it is idempotent)."""
    # rank_zero_info logs through the logger of whichever rank_zero module was imported last; both are covered
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if _TIPS not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_TIPS)
    # torch 2.13 deprecated `LeafSpec` (a FutureWarning on each construction), which Lightning 2.6's CombinedLoader
    # still builds in lightning/pytorch/utilities/_pytree.py; nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Lightning 2.6's model summary warns that it cannot size a `bf16-mixed` or `16-mixed` model and "uses 32 bits
    # instead": a mixed-precision run keeps its weights in fp32, so the size it prints is right and the warning not
    warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary",
                            category=UserWarning)


def drop_wandb_anonymous(loggers: list[Logger]) -> None:
    """Lightning's WandbLogger always passes `anonymous` to `wandb.init`, None unless asked for, and wandb since
    its removal of anonymous mode (wandb/wandb#10909; 0.31 here) warns "The anonymous setting has no effect and will
    be removed" whenever the key is there. None means "never", as does leaving it out, so it is left out."""
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None) if isinstance(logger, WandbLogger) else None
        if init is not None and init.get("anonymous", "set") is None:
            del init["anonymous"]


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn a user error (`USER_ERRORS`) raised inside into `PROG: Type: message` on stderr and exit code 1, unless
    the environment sets LIGHTNING_TFM_TRACEBACK (to anything but 0), which lets it through with its traceback.
    Under DDP a rank that fails still exits 1, as with the traceback, so Lightning's launcher still sees it, and
    its line names the rank."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        rank = getattr(rank_zero_only, "rank", 0)
        where = f" (rank {rank})" if rank else ""
        e = _unwrapped(e)
        print(f"{prog}{where}: {type(e).__name__}: {e} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _unwrapped(error: BaseException) -> BaseException:
    """The error a class raised while jsonargparse instantiated it, which jsonargparse re-raises as "Does not
    validate against any of the Union subtypes" followed by the whole config; our own errors that wrap another
    (`raise ValueError("path:line ...") from e`) are kept, since they name the file."""
    while isinstance(error.__cause__, USER_ERRORS) and _raised_in(error, "jsonargparse"):
        error = error.__cause__
    return error


def _raised_in(error: BaseException, package: str) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return name == package or name.startswith(package + ".")


def saved_summary(trainer: Trainer) -> str:
    """Where a finished fit put its files: the checkpoints (with the best monitored score), each logger's folder
    and the resolved config.yaml. For rank 0: it uses no collective, so the other ranks need not call it."""
    lines = [f"Run saved in {_shown(trainer.default_root_dir)}"]
    names: dict[str, list[str]] = {}
    for callback in trainer.checkpoint_callbacks:
        folder = names.setdefault(_shown(callback.dirpath), [])
        if callback.best_model_path:
            name = Path(callback.best_model_path).name
            if callback.monitor and callback.best_model_score is not None:
                name += f" (best {callback.monitor}={float(callback.best_model_score):.4g})"
            folder.append(name)
        if callback.last_model_path:
            folder.append(Path(callback.last_model_path).name)
    for folder, files in names.items():
        lines.append(f"  checkpoints: {folder}: {', '.join(dict.fromkeys(files)) or 'none written'}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment         # a stand-in without a folder when W&B is disabled, and on ranks > 0
            folder = getattr(run, "dir", None)
            if getattr(run, "disabled", False) is True or not isinstance(folder, str) or not folder:
                continue
            folder = Path(folder).parent                  # .../wandb/offline-run-*/files -> the run's folder
        else:
            folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder:
            lines.append(f"  logs ({type(logger).__name__}): {_shown(folder)}")
    config = next((Path(_log_dir(trainer)) / c.config_filename for c in trainer.callbacks
                   if isinstance(c, SaveConfigCallback)), None)
    if config is not None and config.is_file():
        lines.append(f"  config: {_shown(config)}")
    return "\n".join(lines)


def _log_dir(trainer: Trainer) -> str:
    """`trainer.log_dir` (where SaveConfigCallback writes config.yaml) as rank 0 sees it. The property itself is a
    broadcast under DDP: asked by rank 0 alone after fit it fails or hangs, and asked by every rank as the last
    collective it raced the other ranks' exit ("Connection closed by peer")."""
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    first = trainer.loggers[0]
    return str(first.log_dir if isinstance(first, (CSVLogger, TensorBoardLogger)) else first.save_dir)


def _shown(path: str | os.PathLike | None) -> str:
    """A path relative to the working folder when it lies below it, else absolute."""
    if path is None:
        return "?"
    absolute = Path(path).resolve()
    return str(absolute.relative_to(Path.cwd().resolve())) if absolute.is_relative_to(Path.cwd().resolve()) \
        else str(absolute)
