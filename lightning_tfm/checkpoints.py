"""Model weights on disk: safetensors export and loading (no pickle, so loading runs no code)."""

from __future__ import annotations

import os

from safetensors.torch import load_model, save_model
from torch import nn


def to_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's weights to a safetensors file.

    Tied weights (a shared embedding and output projection) are stored once; `load_safetensors` restores both
    names. Non-persistent buffers (sinusoid tables) are not stored: the model rebuilds them.

    Args:
        model: any of our models.
        path: the file to write, conventionally `*.safetensors`.
    """
    save_model(model, os.fspath(path))


def load_safetensors(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights written by `to_safetensors` into a model built with the same architecture, in place.

    Args:
        model: a model of the same architecture (build it from the same config).
        path: the safetensors file.
    Returns:
        the same model, for chaining.
    Raises:
        FileNotFoundError: path does not exist.
        RuntimeError: a weight is missing, unexpected, or has another shape (safetensors' strict check).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_safetensors: {path} does not exist")
    device = next(model.parameters()).device
    load_model(model, os.fspath(path), strict=True, device=str(device))
    return model
