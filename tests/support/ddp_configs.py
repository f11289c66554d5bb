"""Tiny configs for the DDP tests: a real config shrunk to one small layer, with every rank's weights saved."""

from pathlib import Path

import yaml
from commands import ROOT
from datamodule_settings import merged

SST2, MT = ROOT / "configs/classification/sst2_small.yaml", ROOT / "configs/translation/multi30k_small.yaml"
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp"]


def tiny_config(base: Path, tmp_path: Path, run: Path, data_args: dict, **trainer) -> Path:
    """`base` with a 1-layer d_model 32 model, no dropout (so runs can be compared), the given data and
    trainer settings, and every rank's final weights saved by the `SaveRankWeights` probe."""
    config = yaml.safe_load(base.read_text())
    model = config["model"]["init_args"]["model"]["init_args"]
    model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0)
    if "head_dropout" in config["model"]["init_args"]:
        config["model"]["init_args"]["head_dropout"] = 0.0
    config["data"]["init_args"] = merged(config["data"]["init_args"], data_args)
    config["trainer"].update(default_root_dir=str(run), enable_progress_bar=False, enable_model_summary=False,
                             **trainer)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "filename": "last", "enable_version_counter": False}},
        {"class_path": "probes.SaveRankWeights", "init_args": {"folder": str(run)}},
    ]
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
