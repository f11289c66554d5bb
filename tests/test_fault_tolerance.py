"""Runs that crash and resume: a real SIGKILL mid-epoch, at an epoch's first and last batch and in the middle
of a checkpoint write, then `fit --ckpt_path last`, and the resumed run must train on exactly the batches the
uninterrupted run did (none twice, none skipped) and end with bitwise the same weights (same seed, one CPU
thread: the same operations in the same order). Also: a NaN loss stops training with a message naming the step
and leaves the last good checkpoint as the newest one. A damaged or unsafe checkpoint is refused while the
arguments are parsed, before any Trainer, so those run in this process (`in_process`, tests/conftest.py)."""

import signal
from pathlib import Path

import pytest
import torch
import yaml
from commands import ROOT, error_line, lightning_tfm

from lightning_tfm.checkpoints import load_checkpoint

LM = ROOT / "configs/lm/shakespeare_char_small.yaml"
MODEL = "--model.init_args.model.init_args"


def lm_config(tmp_path: Path, run: Path, data: Path, *probes: dict) -> Path:
    """The LM config, tiny, with dropout (so the random state matters) and last.ckpt every 5 steps."""
    config = yaml.safe_load(LM.read_text())
    model = config["model"]["init_args"]["model"]["init_args"]
    model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.1)
    model["positions"]["init_args"]["max_len"] = 32
    config["data"]["init_args"].update(train_path=str(data / "lm_train.txt"), block_size=32, batching={"batch_size": 8},
                                       batches_per_epoch=10)
    config["trainer"].update(default_root_dir=str(run), max_steps=20, limit_val_batches=4,
                             enable_progress_bar=False, enable_model_summary=False)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "filename": "last", "every_n_train_steps": 5,
                       "enable_version_counter": False}},
        {"class_path": "probes.RecordBatches", "init_args": {"folder": str(run)}},
        *probes,
    ]
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def batches(run: Path) -> list[str]:
    return (run / "batches.rank0.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run: 20 steps, 2 epochs of 10 batches, last.ckpt every 5 steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    lightning_tfm("fit", "--config", lm_config(run.parent, run, data))
    return run


# (probe, its step, the step of the last checkpoint it leaves): ModelCheckpoint runs after the other callbacks,
# so a kill at step 10 comes before the checkpoint of step 10 would be written
CRASHES = {
    "mid-epoch": ("SigkillAtStep", 17, 15),
    "first batch of an epoch, resumed from its last": ("SigkillAtStep", 11, 10),
    "last batch of an epoch, during the checkpoint write": ("SigkillDuringCheckpointWrite", 10, 5),
}


@pytest.mark.parametrize("crash", CRASHES, ids=list(CRASHES))
def test_sigkill_then_resume_trains_the_same_batches_to_the_same_weights(straight, crash, data, tmp_path):
    probe, step, saved = CRASHES[crash]
    crashed = tmp_path / "crashed"
    kill = {"class_path": f"probes.{probe}", "init_args": {"step": step}}
    proc = lightning_tfm("fit", "--config", lm_config(tmp_path, crashed, data, kill), ok=False)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(crashed / "checkpoints/last.ckpt")["global_step"] == saved
    if probe == "SigkillDuringCheckpointWrite":                 # the half-written file is beside, not over it
        assert [p.name for p in (crashed / "checkpoints").iterdir() if p.suffix == ".tmp"] != []
    before_crash = batches(crashed)
    assert len(before_crash) == step

    # the resumed run builds its training loader before the checkpoint's data state is restored (#20550)
    early = {"class_path": "probes.ReadStepsAtSetup"}
    lightning_tfm("fit", "--config", lm_config(tmp_path, crashed, data, early), "--ckpt_path", "last")
    after_resume = batches(crashed)[step:]
    assert [int(line.split()[0]) for line in after_resume] == list(range(saved, 20))
    assert before_crash[saved:] == after_resume[:step - saved]  # the batches lost with the process are trained
    assert before_crash[:saved] + after_resume == batches(straight)     # again, and no other
    ours = load_checkpoint(crashed / "checkpoints/last.ckpt")
    theirs = load_checkpoint(straight / "checkpoints/last.ckpt")
    assert ours["global_step"] == theirs["global_step"] == 20
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    run = tmp_path / "nan"
    poison = {"class_path": "probes.PoisonWeightsAtStep", "init_args": {"step": 12}}
    proc = lightning_tfm("fit", "--config", lm_config(tmp_path, run, data, poison), ok=False)
    assert error_line(proc).startswith("FloatingPointError: the training loss is nan at step 12 (epoch 1, batch 2)")
    good = load_checkpoint(run / "checkpoints/last.ckpt")
    assert good["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values() if t.is_floating_point())


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_resuming_from_a_damaged_checkpoint_is_a_clear_error(data, in_process, tmp_path, damage):
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        torch.save({"state_dict": {"w": torch.ones(10_000)}}, bad)
        bad.write_bytes(bad.read_bytes()[:2000])
    else:
        bad.write_text("weights: none\n")
    proc = in_process("fit", "--config", lm_config(tmp_path, tmp_path / "run", data), "--ckpt_path", bad, ok=False)
    assert error_line(proc) == f"ValueError: checkpoint {bad} is truncated or is not a torch checkpoint " \
        "(not a zip archive)"


def test_a_checkpoint_that_would_run_code_is_refused_by_the_cli(in_process, tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, evil)
    proc = in_process("test", "--config", LM, "--trainer.default_root_dir", tmp_path, "--ckpt_path", evil, ok=False)
    assert error_line(proc).startswith(f"ValueError: checkpoint {evil} holds objects that are not plain data and was "
                                       "refused, since loading it could run code")
    assert not marker.exists()
