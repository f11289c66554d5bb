"""DDP for real, on this CPU: two processes over gloo, started by the CLI (`--trainer.devices=2
--trainer.strategy=ddp`) or by torchrun as two one-process "nodes" on loopback.

Checked: (a) both ranks end with identical weights; (b) those weights match one process that accumulates the
same two batches per step (DDP averages the two ranks' gradients, accumulation sums half of each: the same
update, and since halving is exact in floating point, bitwise the same); (c) validation metrics (accuracy,
F1, loss; BLEU) logged by the DDP run equal a one-process `validate` of the same checkpoint, so each example
counted exactly once, though the odd number of validation batches was evened out by splitting one; (d) with
that odd number nothing hangs (each command has a timeout); predictions come back once each, in order; one
W&B run per job.
"""

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import ROOT, cli_env, lightning_tfm, metrics
from ddp_configs import DDP, MT, SST2, tiny_config

from lightning_tfm.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def sst2_slices(data, tmp_path_factory) -> Path:
    """40 dev rows: validation batches of 16, 16 and 8, so the second is split in two for 2 DDP ranks."""
    out = tmp_path_factory.mktemp("ddp_data")
    rows = (data / "sst2_dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "dev40.tsv").write_text("".join(rows[:41]), encoding="utf-8")
    return out


def sst2_args(data: Path, slices: Path) -> dict:
    return {"train_path": str(data / "sst2_train.tsv"), "val_path": str(slices / "dev40.tsv"),
            "tokenization": {"vocab_size": 1000}, "batching": {"batch_size": 16}}


@pytest.fixture(scope="module")
def ddp_run(data, sst2_slices, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    run = tmp / "ddp"
    config = tiny_config(SST2, tmp, run, sst2_args(data, sst2_slices), max_steps=10, val_check_interval=10)
    lightning_tfm("fit", "--config", config, *DDP, timeout=300, extra_env={"WANDB_MODE": "offline"})
    return run, config


def test_ddp_writes_one_wandb_run_from_rank_0(ddp_run):
    run, _ = ddp_run
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


def validate_alone(config: Path, checkpoint: Path, out: Path) -> dict[str, float]:
    """The metrics of a one-process `validate` of `checkpoint`."""
    lightning_tfm("validate", "--config", config, "--trainer.default_root_dir", out, "--ckpt_path", checkpoint,
                  "--trainer.devices", 1)
    (row,) = metrics(out)
    return row


def test_ddp_ranks_end_with_identical_weights(ddp_run):
    ddp_run, _ = ddp_run
    rank0 = torch.load(ddp_run / "weights.rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / "weights.rank1.pt", weights_only=True)
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name


def test_ddp_matches_one_process_accumulating_the_same_global_batches(ddp_run, data, sst2_slices, tmp_path):
    ddp_run, _ = ddp_run
    single = tmp_path / "single"
    config = tiny_config(SST2, tmp_path, single, sst2_args(data, sst2_slices), max_steps=10,
                         accumulate_grad_batches=2, limit_val_batches=0)
    lightning_tfm("fit", "--config", config, "--trainer.devices", 1)
    ddp = torch.load(ddp_run / "weights.rank0.pt", weights_only=True)
    one = torch.load(single / "weights.rank0.pt", weights_only=True)
    worst = max((ddp[name] - one[name]).abs().max().item() for name in ddp)
    moved = max((ddp[name] - load_checkpoint(ddp_run / "checkpoints/last.ckpt")["state_dict"][name]).abs().max()
                for name in ddp)
    assert moved == 0                                          # the checkpoint holds rank 0's final weights
    assert worst < 1e-6, f"DDP and one process differ by {worst:.2e} after 10 steps"   # measured: 0


def test_ddp_validation_counts_each_example_once(ddp_run, tmp_path):
    run, config = ddp_run
    (logged,) = [r for r in metrics(run) if "val_acc" in r]
    alone = validate_alone(config, run / "checkpoints/last.ckpt", tmp_path)
    for key in ("val_acc", "val_f1", "val_loss"):
        assert logged[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-7), key
    correct = logged["val_acc"] * 40
    assert correct == pytest.approx(round(correct), abs=1e-4)           # k of 40 examples, not of 48


def test_ddp_predict_writes_every_prediction_once_in_input_order(ddp_run, sst2_slices, tmp_path):
    run, config = ddp_run
    outputs = {}
    for devices in (2, 1):
        outputs[devices] = tmp_path / f"predictions{devices}.jsonl"
        lightning_tfm("predict", "--config", config, "--trainer.default_root_dir", tmp_path / str(devices),
                      "--ckpt_path", run / "checkpoints/last.ckpt", "--data.predict_path", sst2_slices / "dev40.tsv",
                      "--predictions.path", outputs[devices], "--trainer.accelerator", "cpu", "--trainer.devices",
                      devices, "--trainer.strategy", "ddp" if devices == 2 else "auto", timeout=300)
    lines = outputs[2].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40 and lines == outputs[1].read_text(encoding="utf-8").splitlines()


def test_ddp_bleu_is_corpus_bleu_of_the_whole_validation_set(data, tmp_path):
    run = tmp_path / "mt"
    # 24 validation pairs in batches of at most 128 padded tokens: an odd number of batches
    config = tiny_config(MT, tmp_path, run, {"train_path": str(data / "mt_train"), "val_path": str(data / "mt_val"),
                                             "tokenization": {"vocab_size": 1000}, "batching": {"max_tokens": 128}},
                         max_steps=4, max_epochs=1, limit_train_batches=4, max_time=None)
    lightning_tfm("fit", "--config", config, *DDP, "--model.init_args.max_extra_len", 8, timeout=300)
    (logged,) = [r for r in metrics(run) if "val_bleu" in r]
    alone = validate_alone(config, run / "checkpoints/last.ckpt", tmp_path / "alone")
    assert logged["val_bleu"] == pytest.approx(alone["val_bleu"], abs=1e-6)
    assert logged["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_loopback_train_together(data, sst2_slices, tmp_path):
    run = tmp_path / "nodes"
    config = tiny_config(SST2, tmp_path, run, sst2_args(data, sst2_slices), max_steps=4, val_check_interval=4,
                         num_nodes=2, devices=1, accelerator="cpu", strategy="ddp")
    script = Path(sys.executable).with_name("lightning_tfm")
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(script),
                   "fit", "--config", str(config)]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    rank0 = torch.load(run / "weights.rank0.pt", weights_only=True)
    rank1 = torch.load(run / "weights.rank1.pt", weights_only=True)
    assert all(torch.equal(t, rank1[k]) for k, t in rank0.items())
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 4
    (row,) = [r for r in metrics(run) if "val_acc" in r]                # one validation, logged once
    assert math.isfinite(row["val_loss"]) and 0 <= row["val_acc"] <= 1
