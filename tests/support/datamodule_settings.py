"""DataModules built in tests as a config builds them: a grouped setting (`tokenization`, `batching`,
`truncation`) given as a dict changes only those fields of the DataModule's default, as a YAML key or a
`--data.batching.max_tokens` override does."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


def build(cls: type, **settings: Any) -> Any:
    """`cls(**settings)`, each dict-valued grouped setting merged onto the default of that argument."""
    parameters = inspect.signature(cls).parameters
    for name, value in settings.items():
        default = parameters[name].default if name in parameters else None
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            settings[name] = dataclasses.replace(default, **value)
    return cls(**settings)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`{**base, **overrides}`, except that two dicts under one key merge (as two YAML configs do)."""
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out
