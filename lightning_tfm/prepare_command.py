"""`lightning_tfm prepare --config FILE`: tokenize a run's data once into memory-mapped rows (`data/prepare.py`).

The config is the one `fit` reads (its `data.init_args.prepared_dir` says where the rows go); only its `data`
section is built, with the interpolations of the whole file resolved (`${...trainer.default_root_dir}`), so the
tokenizer is trained or reused exactly as `fit` would and the model is never built.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

import lightning_tfm.data  # noqa: F401  (the datamodules, for class_path)
from lightning_tfm.console import one_line_errors, quiet_third_party
from lightning_tfm.data.prepare import prepare

# top-level keys of a fit config that prepare reads past
_OTHER_KEYS = ("model", "seed_everything", "auto_precision", "inference_precision", "optimizer", "lr_scheduler",
               "ckpt_path", "predictions")


def _config_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(prog="lightning_tfm prepare", parser_mode="omegaconf+",
                                     description="Tokenize a run's data once into memory-mapped rows and a manifest; "
                                     "fit then reads them (data.init_args.prepared_dir).")
    parser.add_argument("--config", action=ActionConfigFile, help="the run's YAML config, as given to fit")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_lightning_class_args(Trainer, "trainer")
    for key in _OTHER_KEYS:
        parser.add_argument(f"--{key}", type=Any, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    parser.add_argument("--rebuild", type=bool, default=False,
                        help="prepare again when the raw files, the tokenizer or the settings changed (the "
                        "prepared files are replaced); without it such a change is refused")
    return parser


def _datamodule(parser: LightningArgumentParser, config: Namespace) -> Any:
    only_data = LightningArgumentParser(parser_mode="omegaconf+")
    only_data.add_subclass_arguments(LightningDataModule, "data", required=True)
    return only_data.instantiate(Namespace(data=config.data)).data


def prepare_command(args: list[str]) -> None:
    """Parse `args`, build the datamodule, prepare it; a data or config mistake is one line on stderr."""
    quiet_third_party()
    parser = _config_parser()
    with one_line_errors("lightning_tfm prepare"):
        config = parser.parse_args(args)
        if config.workers < 1:
            raise ValueError(f"--workers {config.workers}: must be >= 1")
        datamodule = _datamodule(parser, config)
        if getattr(datamodule, "prepared_dir", None) is None:
            name = type(datamodule).__name__
            raise ValueError("data.init_args.prepared_dir is not set" + (
                f": add it to the config, e.g. --data.init_args.prepared_dir data/prepared/{name.lower()}"
                if hasattr(datamodule, "prepared_dir") else f"; {name} does not read prepared data yet"))
        print(prepare(datamodule, workers=config.workers, rebuild=config.rebuild))
