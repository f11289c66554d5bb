"""Training configs read for drawing, the way `lightning_tfm fit --config A --config B` combines them: YAML files
merged in order, keys looked up by dotted path, and `class_path` specs resolved to classes with importlib. Every
error names the files and the key."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def read_configs(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The YAML files merged in order, later files overriding earlier ones (`merge`).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not YAML, or not a mapping at the top.
    """
    merged: dict[str, Any] = {}
    for path in paths:
        merged = merge(merged, read_yaml(path))
    return merged


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """One config file as a dict (an empty file gives {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} holds a {type(config).__name__}, not a mapping of keys")
    return config


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base`, dicts key by key and anything else replaced.

    A spec that names another `class_path` replaces the earlier spec whole: the earlier class's init_args
    would not fit the new class (jsonargparse keeps only those the new class also takes; we keep none).
    """
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not _swaps_class(old, value):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def _swaps_class(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return "class_path" in new and new["class_path"] != old.get("class_path")


def lookup(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value at dotted `key` ("model.init_args.optimizer"), or `default` where any part is missing."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def class_spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(class_path, init_args) of a spec written as "module.Class" or {class_path: ..., init_args: {...}}.

    Args:
        spec: the YAML value.
        where: the files and key it came from, for the error message.
    """
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ValueError(f"{where}.init_args must be a mapping of argument names, got {init_args!r}")
        return spec["class_path"], dict(init_args)
    raise ValueError(f"{where} must be a class path or {{class_path: ..., init_args: ...}}, got {spec!r}")


def import_class(class_path: str, where: str) -> Any:
    """The object `class_path` names ("package.module.Name"), imported; a clear error if there is none."""
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"{where}: class_path={class_path!r} is not a dotted path such as package.module.Class")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import class_path={class_path!r}: {e}") from e


def describe(paths: Sequence[str | os.PathLike]) -> str:
    """The files of a merged config as error messages and titles name them: "a.yaml + b.yaml"."""
    return " + ".join(str(path) for path in paths)
