"""The `lightning_tfm` command: LightningCLI over the tasks and datamodules, chosen by `class_path` in YAML.

    lightning_tfm fit --config configs/lm/shakespeare_char_small.yaml
    lightning_tfm test --config configs/lm/shakespeare_char_small.yaml --ckpt_path best
    lightning_tfm predict --config ... --ckpt_path best --data.predict_path prompts.txt --predictions.path out.txt
    lightning_tfm prepare --config configs/translation/multi30k_small.yaml --data.init_args.prepared_dir DIR
    lightning_tfm average runs/NAME/checkpoints/step-*.ckpt --last 5 --output runs/NAME/checkpoints/averaged.ckpt
    lightning_tfm export runs/NAME/checkpoints/best.ckpt --output exported/NAME
    lightning_tfm attention runs/NAME/checkpoints/best.ckpt --text "..." --output pictures/NAME
    lightning_tfm plot patterns | positions | schedule | curves | scaling ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

import lightning_tfm.blocks  # noqa: F401  (so --help lists the blocks as known subclasses)
import lightning_tfm.models.presets  # noqa: F401
from lightning_tfm.callbacks import PredictionWriter
from lightning_tfm.checkpoints import AtomicCheckpointIO, average_checkpoints, load_checkpoint
from lightning_tfm.console import drop_wandb_anonymous, one_line_errors, quiet_third_party, saved_summary
from lightning_tfm.finetune import read_tokenizer
from lightning_tfm.finetune.export import export_checkpoint
from lightning_tfm.inference import InferencePrecision
from lightning_tfm.precision import auto_precision

DESCRIPTION = """Train, evaluate and use Transformers from YAML.

tasks (model.class_path):  lightning_tfm.tasks.TranslationModule, ClassificationModule, LanguageModelModule,
                           MaskedLanguageModelModule
models (model.init_args.model.class_path):  lightning_tfm.models.EncoderDecoder, EncoderOnly, DecoderOnly,
                           presets TransformerBase, TransformerBig, BertBaseLike, GPT2SmallLike, Tiny*
data (data.class_path):    lightning_tfm.data.TranslationDataModule, ClassificationDataModule,
                           LanguageModelDataModule
blocks (by class_path inside a model):  attention MultiHeadAttention; feedforward ReLUFeedForward,
                           GELUFeedForward, SiLUFeedForward, SwiGLU; norm LayerNorm, RMSNorm; positions
                           SinusoidalPositions, LearnedPositions, RotaryPositions, ALiBiPositions

Tokenize once into memory-mapped rows:  lightning_tfm prepare --config FILE   (data.init_args.prepared_dir)
Average checkpoints (paper §6.1):  lightning_tfm average CKPT [CKPT ...] [--last N] --output FILE
Export for prediction anywhere:     lightning_tfm export CKPT --output DIR   (then predict --config DIR/config.yaml)
Attention maps of a checkpoint:     lightning_tfm attention CKPT --text TEXT [--attention cross] [--rollout]
Pictures of a config or a run:      lightning_tfm plot {patterns,positions,schedule,curves,scaling} --help
Fine-tune:  model.init_args.init_from (a checkpoint, an export or a Hugging Face folder), model.init_args.finetune

Show every option of a class:  lightning_tfm fit --model.help lightning_tfm.tasks.TranslationModule
Show a whole resolved config:  lightning_tfm fit --config FILE --print_config
A bad value or data file stops with one line naming it; LIGHTNING_TFM_TRACEBACK=1 shows the traceback
"""


class SaveConfigEverywhere(SaveConfigCallback):
    """LightningCLI's config.yaml in the log folder, and the same resolved config in every W&B run (under the
    key "config", beside the model's hyperparameters) with the YAML file itself saved in the run's files."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False):
                run = logger.experiment
                run.config.update({"config": self.config.as_dict()}, allow_val_change=True)
                path = Path(run.dir) / self.config_filename
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
                run.save(str(path), base_path=run.dir, policy="now")


class TransformerCLI(LightningCLI):
    """LightningCLI that links what the data knows (vocabulary size, number of classes) into the model, and
    evaluates checkpoints with the tokenizer stored inside them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.n_classes", "model.init_args.n_classes", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.init_args.multi_label", apply_on="instantiate")
        parser.add_class_arguments(PredictionWriter, "predictions")
        parser.add_argument("--auto_precision", type=bool, default=False,
                            help="when trainer.precision is not set: bf16-mixed where the device computes bf16 "
                            "natively (CUDA with bf16, a CPU with AMX-BF16 or AVX512-BF16), else 32-true; the "
                            "log says which and why")
        parser.add_argument("--inference_precision", type=InferencePrecision, default="fp32",
                            help="test and predict in fp32, bf16 weights or int8 linear maps (int8 only where "
                            "measured faster); refused with the reason where the machine would emulate it")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:     # not a user's, nor FSDP's sharded one
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        drop_wandb_anonymous(trainer.loggers)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._checkpoint = None
        if ckpt_path and Path(ckpt_path).is_file():
            # read it safely before LightningCLI does: a damaged or foreign file gets our one-line error, and a
            # pickle that would run code is refused
            self._checkpoint = load_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self._checkpoint is not None and self.subcommand != "fit":     # evaluate with the checkpoint's tokenizer
            _use_checkpoint_tokenizer(config, Path(config["ckpt_path"]), self._checkpoint.get("tokenizer"))
        elif (config["model"].get("init_args") or {}).get("init_from"):  # fine-tune with the source's tokenizer
            source = Path(config["model"]["init_args"]["init_from"])
            _use_checkpoint_tokenizer(config, source, read_tokenizer(source))
        self._checkpoint = None
        if config.get("inference_precision", "fp32") != "fp32" and self.subcommand not in ("test", "predict"):
            raise ValueError(f"inference_precision={config['inference_precision']} applies to test and predict, "
                             f"not to {self.subcommand}")
        trainer = config["trainer"]
        if config.get("auto_precision") and trainer.get("precision") is None:
            trainer["precision"], reason = auto_precision(str(trainer.get("accelerator") or "auto"))
            rank_zero_info(f"auto_precision: training in {trainer['precision']}, since {reason}")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.inference_precision = config.get("inference_precision", "fp32")

    def before_fit(self) -> None:
        # the resolved data settings go into every checkpoint, so `lightning_tfm export` can write a complete
        # config for prediction without the training run
        self.model.data_config = self.config[self.subcommand]["data"].as_dict()

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(saved_summary(self.trainer))

    def before_predict(self) -> None:
        config = self.config[self.subcommand]
        self.trainer.callbacks.append(PredictionWriter(**config["predictions"]))


def _use_checkpoint_tokenizer(config: Any, ckpt_path: Path, stored: str | None) -> None:
    """Point the datamodule at the tokenizer stored in the checkpoint (written to a file in the temporary
    folder, named by its hash, so the checkpoint's folder may be read-only and stays as it was). An explicit
    `data.tokenization.path` is kept when it holds that same tokenizer, and is an error when it holds another."""
    data_args = config["data"]["init_args"]
    if stored is None or "tokenization.path" not in data_args:
        return
    given = data_args["tokenization.path"]
    if given is not None:       # a missing file is left to the datamodule, which names the key
        if Path(given).is_file() and Tokenizer.from_file(str(given)).to_str() != stored:
            raise ValueError(f"data.tokenization.path={given} is not the tokenizer stored with "
                             f"{ckpt_path}; leave data.tokenization.path unset to use that one")
        return
    digest = hashlib.sha256(stored.encode("utf-8")).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"lightning_tfm-tokenizer-{digest}.json"
    if not target.is_file() or target.read_text(encoding="utf-8") != stored:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(stored, encoding="utf-8")
        os.replace(tmp, target)
    data_args["tokenization.path"] = str(target)


def average(args: list[str]) -> None:
    """`lightning_tfm average`: write the mean of the newest N checkpoints' weights to a new checkpoint."""
    parser = argparse.ArgumentParser(prog="lightning_tfm average", description=average.__doc__.split(": ")[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of one run (a shell glob is fine)")
    parser.add_argument("--last", type=int, default=None, help="keep only the N with the highest global step")
    parser.add_argument("--output", required=True, help="the averaged checkpoint to write")
    options = parser.parse_args(args)
    if options.last is not None and options.last < 2:
        parser.error(f"--last {options.last}: average at least 2 checkpoints")
    try:
        paths = options.checkpoints
        if options.last is not None:
            steps = {path: load_checkpoint(path).get("global_step", 0) for path in paths}
            paths = sorted(paths, key=steps.__getitem__)[-options.last:]
        averaged = average_checkpoints(paths, options.output)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"lightning_tfm average: {e}")
    print(f"averaged {len(paths)} checkpoints into {options.output}: {', '.join(averaged['averaged_from'])}")


def export(args: list[str]) -> None:
    """`lightning_tfm export`: write a folder (weights, tokenizer, config) that predicts without the training run."""
    parser = argparse.ArgumentParser(prog="lightning_tfm export", description=export.__doc__.split(": ")[1])
    parser.add_argument("checkpoint", help="a checkpoint of a lightning_tfm run (LoRA adapters are merged)")
    parser.add_argument("--output", required=True, help="the folder to write (created; its files are replaced)")
    options = parser.parse_args(args)
    try:
        config = export_checkpoint(options.checkpoint, options.output)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"lightning_tfm export: {e}")
    print(f"exported {options.checkpoint} to {config.parent}\n"
          f"  lightning_tfm predict --config {config} --data.predict_path FILE")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["average"]:
        return average(argv[1:])
    if argv[:1] == ["export"]:
        return export(argv[1:])
    if argv[:1] == ["prepare"]:
        from lightning_tfm.prepare_command import prepare_command
        return prepare_command(argv[1:])
    if argv[:1] == ["attention"]:
        from lightning_tfm.viz.attention_command import attention  # matplotlib only when drawing
        return attention(argv[1:])
    if argv[:1] == ["plot"]:
        from lightning_tfm.viz.plot_command import plot
        return plot(argv[1:])
    torch.set_float32_matmul_precision("high")
    quiet_third_party()
    # W&B without an account or network: offline runs on disk (`wandb sync` uploads them); WANDB_MODE=online
    # logs live, WANDB_MODE=disabled turns it off
    os.environ.setdefault("WANDB_MODE", "offline")
    prog = "lightning_tfm" + (f" {argv[0]}" if argv[:1] and not argv[0].startswith("-") else "")
    with one_line_errors(prog):     # a bad value or file: one line on stderr, exit 1 (console.py)
        TransformerCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       save_config_callback=SaveConfigEverywhere,
                       parser_kwargs={"description": DESCRIPTION, "parser_mode": "omegaconf+"},
                       save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()  # LightningCLI reads sys.argv itself; passing it as args too makes it warn
