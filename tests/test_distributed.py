"""DDP for real, on this CPU: two processes over gloo, started by the CLI (`--trainer.devices=2
--trainer.strategy=ddp`) or by torchrun as two one-process "nodes" on loopback.

Checked: (a) both ranks end with identical weights; (b) those weights match one process that accumulates the
same two batches per step (DDP averages the two ranks' gradients, accumulation sums half of each: the same
update, and since halving is exact in floating point, bitwise the same); (c) validation metrics (accuracy,
F1, loss; BLEU) logged by the DDP run equal a one-process `validate` of the same checkpoint, so each example
counted exactly once, with the repeated batch that evens out the ranks left out; (d) with an odd number of
validation batches nothing hangs (each command has a timeout); predictions come back once each, in order;
one W&B run per job.
"""

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from commands import ROOT, cli_env, lightning_tfm, metrics

from lightning_tfm.blocks.attention_variants import OnlineKMeans
from lightning_tfm.checkpoints import load_checkpoint

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
    config["data"]["init_args"].update(data_args)
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


@pytest.fixture(scope="module")
def sst2_slices(data, tmp_path_factory) -> Path:
    """40 dev rows: 3 validation batches of 16, so one DDP rank gets a repeat."""
    out = tmp_path_factory.mktemp("ddp_data")
    rows = (data / "sst2_dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "dev40.tsv").write_text("".join(rows[:41]), encoding="utf-8")
    return out


def sst2_args(data: Path, slices: Path) -> dict:
    return {"train_path": str(data / "sst2_train.tsv"), "val_path": str(slices / "dev40.tsv"),
            "tokenizer_vocab_size": 1000, "batch_size": 16}


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
                                             "tokenizer_vocab_size": 1000, "max_tokens": 128},
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


def test_auxiliary_losses_and_per_step_updates_agree_under_ddp_and_gradient_accumulation(data, tmp_path):
    """A decoder with adaptive spans (span penalty in the loss, spans clamped after each optimizer step) trained
    by two DDP ranks ends where one process accumulating the same two batches per step ends."""
    span = {"class_path": "lightning_tfm.blocks.attention_variants.AdaptiveSpanAttention",
            "init_args": {"max_span": 16, "ramp": 4, "init_span": 0.0, "span_penalty": 0.5}}
    data_args = {"train_path": str(data / "mt_train"), "val_path": str(data / "mt_val"),
                 "tokenizer_vocab_size": 1000, "max_tokens": 256}
    weights = {}
    for name, trainer, launch in (("ddp", {}, DDP), ("one", {"accumulate_grad_batches": 2}, ["--trainer.devices", 1])):
        run = tmp_path / name
        config = tiny_config(MT, tmp_path, run, data_args, max_steps=4, max_epochs=1, limit_val_batches=0,
                             max_time=None, log_every_n_steps=1, **trainer)
        settings = yaml.safe_load(config.read_text())
        settings["model"]["init_args"]["model"]["init_args"]["decoder_attention"] = span
        config.write_text(yaml.safe_dump(settings))
        lightning_tfm("fit", "--config", config, *launch, timeout=300)
        weights[name] = torch.load(run / "weights.rank0.pt", weights_only=True)
        assert any("train_span_penalty" in row for row in metrics(run))
    spans = [key for key in weights["ddp"] if key.endswith("self_attention.span")]
    assert spans and all(0 <= weights["ddp"][key].min() and weights["ddp"][key].max() <= 1 for key in spans)
    assert any((weights["ddp"][key] == 0).any() for key in spans)      # pushed below 0 by the penalty, clamped back
    worst = max((weights["ddp"][key] - weights["one"][key]).abs().max().item() for key in weights["ddp"])
    assert worst < 1e-6, f"DDP and accumulation differ by {worst:.2e}"


def test_routing_centroids_identical_across_ddp_ranks(data, tmp_path):
    """Routing attention's k-means statistics are summed over the ranks before each centroid update, so both DDP
    ranks end with the same centroids (each rank updates its own copy after the last step), and they moved."""
    routing = {"class_path": "lightning_tfm.blocks.attention_variants.RoutingAttention",
               "init_args": {"n_clusters": 2, "window": 2, "decay": 0.5, "commitment": 0.01}}
    data_args = {"train_path": str(data / "mt_train"), "val_path": str(data / "mt_val"),
                 "tokenizer_vocab_size": 1000, "max_tokens": 256}
    run = tmp_path / "routing"
    config = tiny_config(MT, tmp_path, run, data_args, max_steps=3, max_epochs=1, limit_val_batches=0,
                         max_time=None, log_every_n_steps=1)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["init_args"]["model"]["init_args"]["attention"] = routing
    config.write_text(yaml.safe_dump(settings))
    lightning_tfm("fit", "--config", config, *DDP, timeout=300)
    rank0 = torch.load(run / "weights.rank0.pt", weights_only=True)     # state_dict: buffers included
    rank1 = torch.load(run / "weights.rank1.pt", weights_only=True)
    centroids = [key for key in rank0 if key.endswith("kmeans.centroids")]
    assert len(centroids) == 2                                          # the encoder's and the decoder's layer
    initial = OnlineKMeans(n_heads=2, n_clusters=2, dim=16, seed=0).centroids
    for key in centroids:
        assert torch.equal(rank0[key], rank1[key]), key
        assert (rank0[key] - initial).abs().max() > 1e-3, key
    assert any("train_routing_commitment" in row for row in metrics(run))
