"""The `lightning_tfm` command: LightningCLI over the tasks and datamodules, chosen by `class_path` in YAML.

    lightning_tfm fit --config configs/lm/shakespeare_char_small.yaml
    lightning_tfm test --config configs/lm/shakespeare_char_small.yaml --ckpt_path best
    lightning_tfm predict --config ... --ckpt_path best --data.predict_path prompts.txt --predictions.path out.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from tokenizers import Tokenizer

import lightning_tfm.blocks  # noqa: F401  (so --help lists the blocks as known subclasses)
import lightning_tfm.models.presets  # noqa: F401
from lightning_tfm.callbacks import PredictionWriter

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

Show every option of a class:  lightning_tfm fit --model.help lightning_tfm.tasks.TranslationModule
Show a whole resolved config:  lightning_tfm fit --config FILE --print_config
"""


class TransformerCLI(LightningCLI):
    """LightningCLI that links what the data knows (vocabulary size, number of classes) into the model, and
    evaluates checkpoints with the tokenizer stored inside them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.n_classes", "model.init_args.n_classes", apply_on="instantiate")
        parser.add_class_arguments(PredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if self.subcommand != "fit" and ckpt_path and Path(ckpt_path).is_file():
            _use_checkpoint_tokenizer(config, Path(ckpt_path))

    def before_predict(self) -> None:
        config = self.config[self.subcommand]
        self.trainer.callbacks.append(PredictionWriter(**config["predictions"]))


def _use_checkpoint_tokenizer(config: Any, ckpt_path: Path) -> None:
    """Point the datamodule at the tokenizer stored in the checkpoint (extracted beside it). An explicit
    `data.tokenizer_path` is kept when it holds that same tokenizer, and is an error when it holds another."""
    from lightning_tfm.checkpoints import load_checkpoint

    stored = load_checkpoint(ckpt_path).get("tokenizer")
    data_args = config["data"]["init_args"]
    if stored is None or "tokenizer_path" not in data_args:
        return
    given = data_args["tokenizer_path"]
    if given is not None:       # a missing file is left to the datamodule, which names the key
        if Path(given).is_file() and Tokenizer.from_file(str(given)).to_str() != stored:
            raise ValueError(f"data.tokenizer_path={given} is not the tokenizer stored in the checkpoint "
                             f"{ckpt_path}; leave data.tokenizer_path unset to use the checkpoint's own")
        return
    target = ckpt_path.with_suffix(".tokenizer.json")
    if not target.exists() or target.read_text(encoding="utf-8") != stored:
        target.write_text(stored, encoding="utf-8")
    data_args["tokenizer_path"] = str(target)


def main(args: list[str] | None = None) -> None:
    torch.set_float32_matmul_precision("high")
    TransformerCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   parser_kwargs={"description": DESCRIPTION, "parser_mode": "omegaconf+"},
                   save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()  # LightningCLI reads sys.argv itself; passing it as args too makes it warn
