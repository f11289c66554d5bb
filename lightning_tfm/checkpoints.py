"""Model weights on disk: safetensors export and loading, safe loading of Lightning checkpoints
(`weights_only=True`, so a checkpoint from a stranger cannot run code), and checkpoint averaging."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
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


def average_checkpoints(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict[str, Any]:
    """Average the weights of several checkpoints of one run into a new checkpoint, as the paper did (§6.1:
    the last 5 checkpoints for the base models, the last 20 for the big ones).

    The output is the newest input (by global step) with its `state_dict` replaced by the element-wise mean and
    its optimizer and scheduler states dropped, so it evaluates and predicts like any other checkpoint and
    carries the same tokenizer. It is written to a temporary file and renamed, so a crash never leaves half a
    file behind.

    Args:
        paths: two or more checkpoints of the same model.
        output: the file to write.
    Returns:
        the averaged checkpoint.
    Raises:
        ValueError: fewer than two paths, or checkpoints whose weights differ in names, shapes or dtypes.
    """
    if len(paths) < 2:
        raise ValueError(f"average_checkpoints: need at least two checkpoints, got {len(paths)}")
    checkpoints = sorted(((load_checkpoint(p), Path(p)) for p in paths), key=lambda c: c[0].get("global_step", 0))
    newest, newest_path = checkpoints[-1]
    total = {name: tensor.double() if tensor.is_floating_point() else tensor
             for name, tensor in _weights(newest, newest_path).items()}
    for checkpoint, path in checkpoints[:-1]:
        weights = _weights(checkpoint, path)
        if weights.keys() != total.keys():
            raise ValueError(f"{path} and {newest_path} hold different weights: "
                             f"{sorted(weights.keys() ^ total.keys())[:5]}")
        for name, tensor in weights.items():
            if tensor.shape != total[name].shape or tensor.dtype != newest["state_dict"][name].dtype:
                raise ValueError(f"{path}: weight {name} is {tuple(tensor.shape)} {tensor.dtype}, but "
                                 f"{tuple(total[name].shape)} {newest['state_dict'][name].dtype} in {newest_path}")
            if tensor.is_floating_point():
                total[name] += tensor
    dtypes = {name: tensor.dtype for name, tensor in newest["state_dict"].items()}
    averaged = {name: (t / len(checkpoints)).to(dtypes[name]) if t.is_floating_point() else t
                for name, t in total.items()}
    result = {k: v for k, v in newest.items() if k not in ("optimizer_states", "lr_schedulers")}
    result["state_dict"] = averaged
    result["averaged_from"] = [str(p) for _, p in checkpoints]
    save_atomically(result, output)
    return result


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, flushed to disk, then renamed over `path`: a crash
    at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing local files with `save_atomically`. (Lightning's own writes a
    temporary file in the system's temp folder and moves it, which is a copy, not a rename, when that folder is
    on another filesystem.) The CLI installs it in place of the default `TorchCheckpointIO`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)


def _weights(checkpoint: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"checkpoint {path} has no state_dict")
    return checkpoint["state_dict"]
