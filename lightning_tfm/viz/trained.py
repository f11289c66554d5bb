"""A trained model read back from a checkpoint for drawing: its backbone with the trained weights, the tokenizer
stored with it, and text encoded the way its datamodule encodes examples (translation sources `tokens eos`,
targets `bos tokens eos`; classification and masked LM `cls tokens sep`; language models `tokens`)."""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.data.tokenizers import SpecialIds, SpecialTokens, special_token_ids
from lightning_tfm.finetune.sources import architecture_factory, merge_adapters
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.viz.heatmaps import token_labels

# what each family's datamodule needs, when the checkpoint does not record its data settings
_DEFAULT_SPECIALS = {EncoderDecoder: (SpecialTokens(), ("bos", "eos")),
                     EncoderOnly: (SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>"), ("cls", "sep")),
                     DecoderOnly: (SpecialTokens(pad=None, bos=None, eos=None), ())}


@dataclass
class Trained:
    """A checkpoint's backbone (eval mode), tokenizer and special ids.

    Attributes:
        path: the checkpoint.
        model: the backbone (`EncoderDecoder`, `EncoderOnly` or `DecoderOnly`) with the trained weights.
        tokenizer: the tokenizer stored with it.
        specials: ids of the special roles the datamodule used.
        task: class path of the task that wrote the checkpoint.
        hparams: the task's hyperparameters (beam size, length penalty, ...).
    """

    path: str
    model: nn.Module
    tokenizer: Tokenizer
    specials: SpecialIds
    task: str
    hparams: dict[str, Any]

    @property
    def family(self) -> str:
        return type(self.model).__name__

    def ids(self, text: str, what: str = "text") -> list[int]:
        """The example's ids with the special tokens its datamodule adds; raises if it exceeds the context."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"the {what} is empty after tokenization: give some text")
        s = self.specials
        if isinstance(self.model, EncoderDecoder):
            ids = [*ids, s.eos] if what != "target" else [s.bos, *ids, s.eos]
        elif isinstance(self.model, EncoderOnly):
            ids = [s.cls, *ids, s.sep]
        max_len = self.model.max_len
        if len(ids) > max_len:
            raise ValueError(f"the {what} is {len(ids)} tokens long, more than the model's context of {max_len} "
                             f"positions ({self.path}); shorten it")
        return ids

    def labels(self, ids: list[int]) -> list[str]:
        return token_labels(self.tokenizer, ids)

    def translate(self, src: list[int], beam_size: int | None = None) -> list[int]:
        """The model's own translation of `src`: target ids `bos ... eos`, by the task's beam search."""
        from lightning_tfm.tasks.translation import TranslationModule

        h = self.hparams
        task = TranslationModule(model=lambda vocab_size: self.model, vocab_size=self.model.vocab_size,
                                 beam_size=h.get("beam_size", 4), length_penalty=h.get("length_penalty", 0.6),
                                 max_extra_len=h.get("max_extra_len", 50))
        task.pad_id = self.specials.pad if self.specials.pad is not None else self.specials.eos
        task.bos_id, task.eos_id = self.specials.bos, self.specials.eos
        with torch.no_grad():
            out = task.eval()(torch.tensor([src]), None, beam_size)[0].tolist()
        return [self.specials.bos, *out[: out.index(task.eos_id) + 1 if task.eos_id in out else len(out)]]


def load_trained(path: str | os.PathLike) -> Trained:
    """Rebuild the backbone of a lightning_tfm checkpoint with its weights (LoRA adapters merged), without
    unpickling anything.

    Raises:
        ValueError: the checkpoint is damaged, unsafe, carries no tokenizer, or was not written by a task.
    """
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    architecture = hparams.get("model")
    if not isinstance(architecture, dict) or "class_path" not in architecture:
        raise ValueError(f"checkpoint {path} does not record its model's architecture; it was not written by a "
                         "lightning_tfm task run")
    if checkpoint.get("tokenizer") is None:
        raise ValueError(f"checkpoint {path} carries no tokenizer; it was not written by a lightning_tfm task run")
    weights = {k.removeprefix("model."): v for k, v in merge_adapters(checkpoint["state_dict"]).items()
               if k.startswith("model.")}
    table = weights.get("embedding.tokens.weight", weights.get("src_embedding.tokens.weight"))
    model = architecture_factory(architecture)(table.shape[0])
    model.load_state_dict(weights)
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    specials = _special_ids(checkpoint, tokenizer, type(model), path)
    return Trained(str(path), model.eval(), tokenizer, specials, hparams.get("_class_path", "?"), hparams)


def _special_ids(checkpoint: dict[str, Any], tokenizer: Tokenizer, family: type, path: Any) -> SpecialIds:
    """The special ids of the run's datamodule settings (recorded in the checkpoint), else the family's."""
    tokens, required = next(v for k, v in _DEFAULT_SPECIALS.items() if issubclass(family, k))
    data = checkpoint.get("data_config") or {}
    given = (data.get("init_args") or {}).get("special_tokens")
    if isinstance(given, dict):
        names = {f.name for f in fields(SpecialTokens)}
        tokens = SpecialTokens(**{k: v for k, v in given.items() if k in names})
    elif data.get("class_path"):
        tokens = _default_specials(data["class_path"]) or tokens
    try:
        return special_token_ids(tokenizer, tokens, required)
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e


def _default_specials(class_path: str) -> SpecialTokens | None:
    module, _, name = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters["special_tokens"]
    except (ImportError, AttributeError, KeyError, ValueError):
        return None
    return parameter.default if isinstance(parameter.default, SpecialTokens) else None


def as_batch(ids: list[int]) -> Tensor:
    return torch.tensor([ids])
