"""`export_checkpoint`: the folder reloads into the same function (LoRA merged, tied weights restored), with
its tokenizer, label names and a config that names the folder itself."""

import json

import pytest
import torch
import yaml
from checkpoint_files import TINY_DECODER, TINY_ENCODER, write_checkpoint
from safetensors import safe_open

from lightning_tfm.finetune import FineTuning, LoRA, read_source
from lightning_tfm.finetune.export import export_checkpoint
from lightning_tfm.models.presets import TinyDecoder, TinyEncoder
from lightning_tfm.tasks import ClassificationModule, LanguageModelModule

DATA = {"class_path": "lightning_tfm.data.ClassificationDataModule",
        "init_args": {"train_path": "gone/train.csv", "text_column": "review", "label_column": "stars",
                      "tokenizer_path": "gone/tokenizer.json", "max_len": 64}}


def test_a_lora_classifier_exports_merged_and_reloads_to_the_same_outputs(tmp_path, tokenizer):
    torch.manual_seed(0)
    lora = FineTuning(lora=LoRA(rank=2, alpha=4.0, targets=("qkv", "fc2")))
    task = ClassificationModule(TinyEncoder, 60, n_classes=3, pooling="mean", finetune=lora).eval()
    with torch.no_grad():
        for name, p in task.named_parameters():
            if "lora_b" in name:
                p.normal_()
    task.tokenizer = tokenizer
    path = write_checkpoint(task, tmp_path / "best.ckpt", TINY_ENCODER, label_names=["bad", "good", "ok"],
                            data_config=DATA)
    config_file = export_checkpoint(path, tmp_path / "export")

    with safe_open(str(tmp_path / "export/model.safetensors"), framework="pt") as f:
        assert not any(".lora_" in key for key in f.keys())
        assert json.loads(f.metadata()["label_names"]) == ["bad", "good", "ok"]
    assert (tmp_path / "export/tokenizer.json").read_text() == tokenizer.to_str()
    config = yaml.safe_load(config_file.read_text())
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "lightning_tfm.tasks.classification.ClassificationModule"
    assert init["init_from"] == str(tmp_path / "export") and init["finetune"] is None
    assert init["pooling"] == "mean" and init["model"] == TINY_ENCODER and "n_classes" not in init
    data = config["data"]["init_args"]
    assert data["label_names"] == ["bad", "good", "ok"] and data["tokenization"]["path"] is None
    assert data["text_column"] == "review"

    path.unlink()                                   # nothing of the run is needed any more
    again = ClassificationModule(vocab_size=60, n_classes=3, pooling="mean", init_from=init["init_from"]).eval()
    ids = torch.randint(0, 60, (4, 10))
    torch.testing.assert_close(again(ids), task(ids))
    assert again.tokenizer.to_str() == tokenizer.to_str()


def test_tied_weights_are_stored_once_and_come_back_under_both_names(tmp_path):
    torch.manual_seed(0)
    lm = LanguageModelModule(TinyDecoder, 60).eval()
    assert lm.model.output.weight is lm.model.embedding.tokens.weight
    export_checkpoint(write_checkpoint(lm, tmp_path / "lm.ckpt", TINY_DECODER), tmp_path / "export")
    with safe_open(str(tmp_path / "export/model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        tied = json.loads(f.metadata()["tied"])
    assert len(tied) == 1 and set(tied) | set(tied.values()) == {"model.embedding.tokens.weight",
                                                                   "model.output.weight"}
    assert set(tied) & stored == set()
    source = read_source(tmp_path / "export")
    assert source.kind == "export" and torch.equal(source.weights["model.output.weight"],
                                                   lm.model.output.weight)


def test_a_checkpoint_not_from_a_task_cannot_be_exported(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"was not written by a lightning_tfm task run from the CLI"):
        export_checkpoint(tmp_path / "x.ckpt", tmp_path / "out")
