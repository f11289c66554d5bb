"""The self-attention blocks a training config builds, stack by stack, for `lightning_tfm plot patterns --config`:
the model's `attention`, or its `attention_pattern` repeated over the layers as the model tiles it, causal in a
decoder and bidirectional in an encoder, each distinct block built once for the picture's length."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tfm.blocks.attention import Attention, LayerPlace
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.viz.attention_patterns import NamedBlock, build_block, title
from lightning_tfm.viz.config_files import class_spec, describe, import_class, lookup, read_configs, read_yaml

MODEL_KEY = "model.init_args.model"
LONGEST = 256            # a longer picture shows no more: its cells would be finer than the PNG's pixels


@dataclass(frozen=True)
class _Stack:
    """Where one stack of a model family reads its self-attention: the first argument set (not None) wins."""

    name: str
    causal: bool
    attention: tuple[str, ...]
    pattern: str
    layers: tuple[str, ...]


_ONE_CAUSAL = [_Stack("", True, ("attention",), "attention_pattern", ("n_layers",))]
_ONE_BIDIRECTIONAL = [_Stack("", False, ("attention",), "attention_pattern", ("n_layers",))]
_STACKS = [
    (DecoderOnly, _ONE_CAUSAL),
    (EncoderOnly, _ONE_BIDIRECTIONAL),
    (EncoderDecoder, [_Stack("encoder", False, ("attention",), "attention_pattern", ("n_layers",)),
                      _Stack("decoder", True, ("decoder_attention", "attention"), "decoder_attention_pattern",
                             ("n_decoder_layers", "n_layers"))]),
]


def context_length(paths: Sequence[str | os.PathLike]) -> int:
    """The picture's default length for a config: its positions' max_len, at most LONGEST (LONGEST if unset)."""
    max_len = lookup(read_configs(paths), f"{MODEL_KEY}.init_args.positions.init_args.max_len")
    return min(max_len, LONGEST) if isinstance(max_len, int) and max_len > 0 else LONGEST


def config_blocks(paths: Sequence[str | os.PathLike], length: int, seed: int = 0) -> list[NamedBlock]:
    """One placed block per distinct self-attention spec of the config's model, titled with the config's name,
    the stack and the layers that use it.

    Args:
        paths: YAML files merged in order (a base config, then overrides).
        length: the picture's length T, given to the blocks as `max_len`.
        seed: seed of the blocks' initial weights.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: no model in the config, a model family without known stacks, an attention spec that is not an
            `Attention` subclass or cannot be built; the message names the files and the key.
    """
    config, source = read_configs(paths), describe(paths)
    spec = lookup(config, MODEL_KEY)
    if lookup(config, f"{MODEL_KEY}.class_path") is None and not isinstance(spec, str):
        raise ValueError(f"{source}: no {MODEL_KEY}.class_path; give the full training config, and a variant "
                         "override after its base (--config base.yaml --config variant.yaml)")
    class_path, init_args = class_spec(spec, f"{source}: {MODEL_KEY}")
    model_cls = import_class(class_path, f"{source}: {MODEL_KEY}.class_path")
    stacks = next((stacks for family, stacks in _STACKS if isinstance(model_cls, type)
                   and issubclass(model_cls, family)), None)
    if stacks is None:
        raise ValueError(f"{source}: {MODEL_KEY}.class_path={class_path} is not a DecoderOnly, EncoderOnly or "
                         "EncoderDecoder; cannot tell which attention blocks it builds")
    d_model, n_heads = (_argument(model_cls, init_args, (name,)) for name in ("d_model", "n_heads"))
    label = Path(paths[-1]).stem
    blocks = []
    for stack in stacks:
        blocks += _stack_blocks(stack, model_cls, init_args, f"{source}: {MODEL_KEY}.init_args", label,
                                (d_model, n_heads, length, seed))
    return blocks


def _stack_blocks(stack: _Stack, model_cls: type, init_args: dict[str, Any], where: str, label: str,
                  sizes: tuple[int, int, int, int]) -> list[NamedBlock]:
    """The distinct blocks of one stack, each placed at the first layer that uses it."""
    d_model, n_heads, length, seed = sizes
    n_layers = _argument(model_cls, init_args, stack.layers)
    pattern = _argument(model_cls, init_args, (stack.pattern,))
    if pattern is not None and (not isinstance(pattern, list) or not pattern):
        raise ValueError(f"{where}.{stack.pattern} must be a non-empty list of attention specs, got {pattern!r}")
    if pattern:
        specs = [(pattern[i % len(pattern)], f"{where}.{stack.pattern}[{i % len(pattern)}]") for i in range(n_layers)]
    else:
        key = next((name for name in stack.attention if _argument(model_cls, init_args, (name,)) is not None), None)
        if key is None:
            raise ValueError(f"{where}.{stack.attention[-1]} is null; name an attention block's class_path")
        specs = [(_argument(model_cls, init_args, (key,)), f"{where}.{key}")] * n_layers
    layers: dict[str, list[int]] = {}
    for i, (spec, _) in enumerate(specs):
        layers.setdefault(json.dumps(spec, sort_keys=True, default=str), []).append(i)
    blocks = []
    for group in layers.values():
        spec, key = specs[group[0]]
        place = LayerPlace(index=group[0], n_layers=n_layers, causal=stack.causal, max_len=length)
        cls, args = _attention_class(spec, key)
        extra = " ".join(part for part in (label + ":", stack.name, _layers_text(group)) if part)
        try:
            block = build_block(cls, args, d_model, n_heads, place, seed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: cannot build {cls.__name__} with init_args {args}: {e}") from e
        blocks.append((title(cls, args, stack.causal, extra), block))
    return blocks


def _attention_class(spec: Any, key: str) -> tuple[type[Attention], dict[str, Any]]:
    """The class and init_args of an attention spec (a class when it is the model's default)."""
    if isinstance(spec, type):
        cls, args = spec, {}
    else:
        class_path, args = class_spec(spec, key)
        cls = import_class(class_path, key)
    if not (isinstance(cls, type) and issubclass(cls, Attention)):
        raise ValueError(f"{key}: {getattr(cls, '__qualname__', cls)!s} is not an Attention subclass "
                         "(lightning_tfm.blocks.attention.Attention); name an attention block's class_path")
    return cls, args


def _argument(model_cls: type, init_args: dict[str, Any], names: tuple[str, ...]) -> Any:
    """The first of `names` set (not None) in init_args or, failing that, in the model's signature defaults."""
    defaults = inspect.signature(model_cls).parameters
    for name in names:
        value = init_args.get(name, defaults[name].default if name in defaults else None)
        if value is not None and value is not inspect.Parameter.empty:
            return value
    return None


def _layers_text(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(map(str, layers))


def group_configs(paths: Sequence[str | os.PathLike]) -> list[list[str | os.PathLike]]:
    """Config files cut into models: a file that names its model's class (model.init_args.model.class_path)
    starts a new model, and the overrides after it (a variant's file) merge into that one. So `base variant`
    is one model and `base a base b` two; a leading override merges into nothing and is reported by
    `config_blocks`."""
    groups: list[list[str | os.PathLike]] = []
    for path in paths:
        if not groups or lookup(read_yaml(path), f"{MODEL_KEY}.class_path") is not None:
            groups.append([])
        groups[-1].append(path)
    return groups
