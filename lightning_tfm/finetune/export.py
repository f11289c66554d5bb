"""`lightning_tfm export`: a trained checkpoint -> a folder that predicts on any machine with lightning_tfm
installed, without the training run: model.safetensors (the whole task, LoRA adapters merged into their
weights, tied weights stored once), tokenizer.json, and config.yaml, a complete `lightning_tfm` config whose
`model.init_args.init_from` is the folder itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.finetune.sources import (
    EXPORT_CONFIG,
    EXPORT_TOKENIZER,
    EXPORT_WEIGHTS,
    merge_adapters,
    tie_groups,
)

FORMAT = "lightning_tfm-export-1"
# hyperparameters the CLI links from the data, and LightningCLI's bookkeeping
_NOT_TASK_ARGS = ("vocab_size", "n_classes", "multi_label", "_class_path", "_instantiator")


def export_checkpoint(checkpoint_path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the export folder for a checkpoint; returns its config.yaml.

    Raises:
        ValueError: the checkpoint is damaged or unsafe (see `load_checkpoint`), or was not written by a task.
    """
    checkpoint_path, output = Path(checkpoint_path), Path(output).resolve()
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "_class_path" not in hparams or not isinstance(hparams.get("model"), dict):
        raise ValueError(f"checkpoint {checkpoint_path} was not written by a lightning_tfm task run from the CLI "
                         "(its hyperparameters lack the task's class_path or the model's architecture)")
    weights = {k: v.contiguous() for k, v in merge_adapters(checkpoint["state_dict"]).items()}
    tied = tie_groups(weights)
    metadata = {"format": FORMAT, "tied": json.dumps(tied), "exported_from": str(checkpoint_path)}
    if checkpoint.get("label_names") is not None:
        metadata["label_names"] = json.dumps(list(checkpoint["label_names"]))
    output.mkdir(parents=True, exist_ok=True)
    _write(output / EXPORT_WEIGHTS, lambda tmp: save_file(
        {k: v for k, v in weights.items() if k not in tied}, str(tmp), metadata=metadata))
    if checkpoint.get("tokenizer") is not None:
        _write(output / EXPORT_TOKENIZER, lambda tmp: tmp.write_text(checkpoint["tokenizer"], encoding="utf-8"))
    config = _config(checkpoint, hparams, output)
    header = (f"# exported by `lightning_tfm export` from {checkpoint_path} (step {checkpoint.get('global_step')})\n"
              f"#   lightning_tfm predict --config {output / EXPORT_CONFIG} --data.predict_path FILE\n")
    _write(output / EXPORT_CONFIG, lambda tmp: tmp.write_text(
        header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8"))
    return output / EXPORT_CONFIG


def _config(checkpoint: dict[str, Any], hparams: dict[str, Any], output: Path) -> dict[str, Any]:
    """The task with its own architecture, starting from the export; the data settings of the training run
    with the tokenizer left to the CLI (it takes the export's) and the label set written out."""
    task = {"class_path": hparams["_class_path"],
            "init_args": {k: v for k, v in hparams.items() if k not in _NOT_TASK_ARGS}}
    task["init_args"].update(init_from=str(output), finetune=None)
    config: dict[str, Any] = {"model": task}
    data = checkpoint.get("data_config")
    if data is not None:
        data = {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}
        data["init_args"]["tokenization"] = {**(data["init_args"].get("tokenization") or {}), "path": None}
        if checkpoint.get("label_names") is not None and "label_column" in data["init_args"]:
            data["init_args"]["label_names"] = list(checkpoint["label_names"])
        config["data"] = data
    # outputs of a predict run (its resolved config.yaml) go below runs/, not into the current folder
    config["trainer"] = {"default_root_dir": f"runs/{output.name}", "accelerator": "auto", "logger": False,
                         "enable_checkpointing": False}
    return config


def _write(path: Path, write: Any) -> None:
    """Write through a temporary file renamed over `path`, so an interrupted export leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
