"""Every override in configs/variants/, on top of its base config, goes through the `lightning_tfm` parser and
builds the model it describes, without training: the attention block it names in each layer, and an untrained
forward pass over a full context. A typo in a variant config fails here. The overrides only make sense on
their base (`fit --config BASE --config OVERRIDE`); tests/cli/test_configs.py checks the stand-alone configs.

The command runs in this process with `run=False` (LightningCLI parses and instantiates, then stops), on the
slices of the real data, with every output below tmp_path.
"""

import pytest
import torch
import yaml
from commands import ROOT
from lightning.pytorch import LightningModule

from lightning_tfm import cli

VARIANTS = ROOT / "configs" / "variants"
# a run's prefix -> (its base config, the training slice standing in for the real data)
BASES = {"lm": ("shakespeare_base", "lm_train.txt"), "long": ("long_context_base", "lm_train.txt"),
         "cls": ("sst2_base", "sst2_train.tsv")}
OVERRIDES = sorted(p for p in VARIANTS.glob("*.yaml") if not p.stem.endswith("_base"))


def build(args: list[str], monkeypatch) -> LightningModule:
    """`lightning_tfm ARGS` through cli.main, but instantiating only; returns the task module."""
    built = []

    class Instantiate(cli.TransformerCLI):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **{**kw, "run": False})
            built.append(self.model)

    monkeypatch.setattr(cli, "TransformerCLI", Instantiate)
    monkeypatch.setattr("sys.argv", ["lightning_tfm"])          # pytest's own arguments are not ours
    monkeypatch.setenv("WANDB_MODE", "disabled")
    precision = torch.get_float32_matmul_precision()        # main() sets it; keep other tests unaffected
    try:
        cli.main([str(a) for a in args])
    finally:
        torch.set_float32_matmul_precision(precision)
    return built[0]


def expected_attention(model_args: dict, n_layers: int) -> list[str]:
    """The attention class name of each layer, read from the override's model arguments (the base's is full
    attention): `attention_pattern` tiled over the layers, else `attention` in every layer."""
    names = [a if isinstance(a, str) else a["class_path"] for a in model_args.get("attention_pattern") or []]
    if not names:
        attention = model_args.get("attention", "lightning_tfm.blocks.MultiHeadAttention")
        names = [attention if isinstance(attention, str) else attention["class_path"]]
    return [names[i % len(names)].rsplit(".", 1)[1] for i in range(n_layers)]


def test_every_run_prefix_has_a_base():
    assert OVERRIDES and {p.stem.split("_")[0] for p in OVERRIDES} <= set(BASES)
    assert {p.stem for p in VARIANTS.glob("*_base.yaml")} == {base for base, _ in BASES.values()}


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: p.stem)
def test_variant_builds_the_attention_it_names(override, data, tmp_path, monkeypatch):
    base, train = BASES[override.stem.split("_")[0]]
    spec = yaml.safe_load(override.read_text())
    assert spec["trainer"]["default_root_dir"] == f"runs/variants/{override.stem}"   # no two runs share a folder
    monkeypatch.chdir(ROOT)
    task = build(["--config", VARIANTS / f"{base}.yaml", "--config", override, "--trainer.default_root_dir",
                  tmp_path, "--data.train_path", data / train, "--data.tokenization.vocab_size", 500], monkeypatch)
    layers = task.model.stack.layers
    model_args = spec["model"]["init_args"]["model"]["init_args"]
    assert [type(layer.attention).__name__ for layer in layers] == expected_attention(model_args, len(layers))
    attention = model_args.get("attention")
    for key, value in (attention["init_args"] if isinstance(attention, dict) else {}).items():
        for layer in layers:       # the arguments a block keeps under their own name (window, n_memory, ...)
            assert getattr(layer.attention, key, value) == value, key
    if "feedforward" in model_args:                                   # only ever set to null: all-attention
        assert model_args["feedforward"] is None and all(layer.feedforward is None for layer in layers)

    T = 64 if override.stem.startswith("cls") else task.model.max_len       # SST-2 sentences are short
    ids = torch.randint(0, task.model.embedding.tokens.weight.shape[0], (2, T))
    with torch.no_grad():
        out = task.model(ids)
    assert out.shape[:2] == (2, T) and torch.isfinite(out).all()
