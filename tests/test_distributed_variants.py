"""DDP with attention variants that update themselves once per optimizer step (two gloo processes on this CPU):
adaptive spans agree with one process accumulating the same batches, and routing's k-means centroids are
identical on both ranks. In their own file so they run beside tests/test_distributed.py, not after it."""

import torch
import yaml
from commands import lightning_tfm, metrics
from ddp_configs import DDP, MT, tiny_config

from lightning_tfm.blocks.attention_variants import OnlineKMeans


def test_auxiliary_losses_and_per_step_updates_agree_under_ddp_and_gradient_accumulation(data, tmp_path):
    """A decoder with adaptive spans (span penalty in the loss, spans clamped after each optimizer step) trained
    by two DDP ranks ends where one process accumulating the same two batches per step ends."""
    span = {"class_path": "lightning_tfm.blocks.attention_variants.AdaptiveSpanAttention",
            "init_args": {"max_span": 16, "ramp": 4, "init_span": 0.0, "span_penalty": 0.5}}
    data_args = {"train_path": str(data / "mt_train"), "val_path": str(data / "mt_val"),
                 "tokenization": {"vocab_size": 1000}, "batching": {"max_tokens": 256}}
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
                 "tokenization": {"vocab_size": 1000}, "batching": {"max_tokens": 256}}
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
