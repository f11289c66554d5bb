"""Factories as the plain `class_path` configs that jsonargparse reads back and LightningCLI stores in
checkpoints: a class, or a `functools.partial` of one with keyword arguments, becomes
{"class_path": "module.Class", "init_args": {...}}. Checkpoints then hold only plain data, which loads with
`torch.load(weights_only=True)`."""

from __future__ import annotations

from functools import partial
from typing import Any

_SCALARS = (type(None), bool, int, float, str)


def class_path(cls: type) -> str:
    """The import path of a class, as YAML names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def as_config(value: Any) -> Any:
    """A factory (a class, or a partial of one with keyword arguments only), recursively in lists and dicts, as
    a class_path config; anything else unchanged (a lambda stays a lambda: see `is_plain`)."""
    if isinstance(value, partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": class_path(value.func),
                "init_args": {name: as_config(arg) for name, arg in value.keywords.items()}}
    if isinstance(value, type):
        return {"class_path": class_path(value)}
    if isinstance(value, (list, tuple)):
        return [as_config(item) for item in value]
    if isinstance(value, dict):
        return {key: as_config(item) for key, item in value.items()}
    return value


def is_plain(value: Any) -> bool:
    """Whether `value` is made of None, bools, numbers, strings, lists and string-keyed dicts only."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    return False
