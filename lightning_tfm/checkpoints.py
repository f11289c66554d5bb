"""Model weights on disk: safetensors export and loading, and safe loading of Lightning checkpoints
(`weights_only=True`, so a checkpoint from a stranger cannot run code)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)`, onto the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, not a torch checkpoint, or holds objects other than tensors and
            plain containers (a pickle that would run code is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is truncated or is not a torch checkpoint (not a zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = found[0] if found else "it holds an object torch will not load safely"
        raise ValueError(f"checkpoint {path} holds objects that are not plain data and was refused, since loading "
                         f"it could run code ({reason})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is truncated or is not a torch checkpoint: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


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
