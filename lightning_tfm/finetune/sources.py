"""Where pretrained weights come from: a lightning_tfm checkpoint (`.ckpt`), a folder written by
`lightning_tfm export`, or a local Hugging Face folder (`save_pretrained`: config.json + safetensors, converted
by `from_huggingface`). Each gives the backbone's architecture as a `class_path` config, the weights under the
task's names ("model.*" for the backbone), and the tokenizer that produced the ids the weights were trained on.
Nothing is unpickled: checkpoints load with `weights_only=True`, the rest are safetensors, JSON and YAML."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from safetensors import safe_open
from torch import Tensor, nn

from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.models.hf_convert import from_huggingface

EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.json"


@dataclass
class PretrainedSource:
    """What a fine-tuning run takes from its pretrained source.

    Attributes:
        path: the checkpoint file or folder it was read from.
        kind: "checkpoint", "export" or "huggingface".
        architecture: the backbone as a class_path config (a factory vocab_size -> model, once instantiated).
        weights: every stored weight under the task's names, LoRA adapters already merged.
        tokenizer: the tokenizer's JSON (`Tokenizer.to_str()`), or None when the source has none.
        label_names: the classes of a classification source, else None.
        task: class path of the task that wrote it (None for Hugging Face folders).
    """

    path: Path
    kind: str
    architecture: dict[str, Any]
    weights: dict[str, Tensor]
    tokenizer: str | None = None
    label_names: list[str] | None = None
    task: str | None = None

    @property
    def vocab_size(self) -> int | None:
        table = self.weights.get("model.embedding.tokens.weight", self.weights.get("model.src_embedding.tokens.weight"))
        return None if table is None else table.shape[0]

    def build(self, vocab_size: int) -> nn.Module:
        """The backbone with this source's architecture (random weights; `load_pretrained` fills them)."""
        return architecture_factory(self.architecture)(vocab_size)


def read_source(path: str | Path) -> PretrainedSource:
    """Read a pretrained source, telling the three kinds apart by what the path holds.

    Raises:
        FileNotFoundError: nothing at `path`, or a folder that is neither an export nor a Hugging Face model.
        ValueError: a checkpoint that is damaged, unsafe, or was not written by a lightning_tfm task.
    """
    path = Path(path)
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file():
            return _read_export(path)
        if (path / "config.json").is_file():
            return _read_huggingface(path)
        raise FileNotFoundError(f"init_from={path} is a folder with neither {EXPORT_CONFIG} + {EXPORT_WEIGHTS} "
                                "(lightning_tfm export) nor config.json (Hugging Face save_pretrained)")
    if not path.exists():
        raise FileNotFoundError(f"init_from={path} does not exist")
    return _read_checkpoint(path)


def read_tokenizer(path: str | Path) -> str | None:
    """Only the tokenizer of a source (JSON), without converting or loading its weights where it is a file of
    its own; None when the source has none. Raises as `read_source` for a path that is no source."""
    path = Path(path)
    if path.is_dir() and ((path / EXPORT_CONFIG).is_file() or (path / "config.json").is_file()):
        file = path / EXPORT_TOKENIZER
        return file.read_text(encoding="utf-8") if file.is_file() else None
    return read_source(path).tokenizer


def architecture_factory(config: dict[str, Any]) -> Callable[[int], nn.Module]:
    """A class_path config (as checkpoints store it) -> the factory vocab_size -> model, via jsonargparse, so
    the same types and checks apply as in YAML."""
    from jsonargparse import ArgumentParser

    config = {**config, "init_args": {k: v for k, v in config.get("init_args", {}).items() if k != "vocab_size"}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[int], nn.Module])
    try:
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes   # renamed in 4.49
        return instantiate(parser.parse_object({"model": config})).model
    except Exception as e:            # jsonargparse wraps its errors in several types
        raise ValueError(f"cannot rebuild the stored architecture {config.get('class_path')}: {e}") from e


def merge_adapters(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold every LoRA adapter (`X.lora_a`, `X.lora_b`, `X.lora_scale`) into its weight `X.weight`:
    W + scale B A, the same function with no adapters (`LoRALinear.merged` does this to a module)."""
    merged = {k: v for k, v in weights.items() if ".lora_" not in k}
    for key in weights:
        if key.endswith(".lora_a"):
            stem = key.removesuffix(".lora_a")
            a, b, scale = weights[key], weights[f"{stem}.lora_b"], weights[f"{stem}.lora_scale"]
            weight = merged[f"{stem}.weight"]
            merged[f"{stem}.weight"] = (weight.float() + scale.float() * (b.float() @ a.float())).to(weight.dtype)
    return merged


def _read_checkpoint(path: Path) -> PretrainedSource:
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    architecture = hparams.get("model")
    if not isinstance(architecture, dict) or "class_path" not in architecture:
        raise ValueError(f"checkpoint {path} does not record its model's architecture as a class_path config "
                         "(hyper_parameters['model']); it was not written by a lightning_tfm task")
    return PretrainedSource(path, "checkpoint", architecture, merge_adapters(checkpoint["state_dict"]),
                            checkpoint.get("tokenizer"), checkpoint.get("label_names"), hparams.get("_class_path"))


def _read_export(path: Path) -> PretrainedSource:
    config = yaml.safe_load((path / EXPORT_CONFIG).read_text(encoding="utf-8"))
    task = config["model"]
    weights, metadata = read_exported_weights(path / EXPORT_WEIGHTS)
    tokenizer = (path / EXPORT_TOKENIZER).read_text(encoding="utf-8") if (path / EXPORT_TOKENIZER).is_file() else None
    labels = json.loads(metadata["label_names"]) if "label_names" in metadata else None
    return PretrainedSource(path, "export", task["init_args"]["model"], weights, tokenizer, labels,
                            task["class_path"])


def read_exported_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The weights of an export, with tied weights (stored once) back under each of their names."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        weights = {key: f.get_tensor(key) for key in f.keys()}
    for alias, name in json.loads(metadata.get("tied", "{}")).items():
        weights[alias] = weights[name]
    return weights, metadata


def _read_huggingface(path: Path) -> PretrainedSource:
    model = from_huggingface(path)
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    weights |= {f"head.{k}": v for k, v in model.classification_head.items()}   # loads where the head fits
    tokenizer_file = path / "tokenizer.json"
    tokenizer = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    return PretrainedSource(path, "huggingface", model.architecture, weights, tokenizer)


def tie_groups(weights: dict[str, Tensor]) -> dict[str, str]:
    """{alias: name} for tensors stored under several names (tied embeddings), so each is written once."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases = {}
    for key, tensor in weights.items():
        ident = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                 tuple(tensor.shape))
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases

