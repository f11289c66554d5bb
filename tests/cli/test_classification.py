"""`lightning_tfm fit`, `test` and `predict` for classification, run as a subprocess from the repository root
on a slice of SST-2, with every output below pytest's tmp_path.

The classifier is fitted once for this file (tiny model, 20 steps) and its checkpoints are shared by the tests.
`test` on the dev slice from best.ckpt must reproduce the validation accuracy that chose best.ckpt.
"""

import json
from pathlib import Path

import pytest
from cli_runs import SST2, TINY, check_fit
from commands import best_score, lightning_tfm, metrics

from lightning_tfm.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def sst2_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sst2")
    lightning_tfm("fit", "--config", SST2, "--trainer.default_root_dir", run, *TINY,
                  "--data.train_path", data / "sst2_train.tsv", "--data.val_path", data / "sst2_dev.tsv",
                  "--data.tokenization.vocab_size", 1000, "--data.batching.batch_size", 32,
                  "--trainer.val_check_interval", 10)
    return run


def test_classification_fit_logs_accuracy_and_f1(sst2_run):
    rows = check_fit(sst2_run, "val_acc", "max", ("val_loss", "val_acc", "val_f1"))
    assert [r["step"] for r in rows] == [9, 19]                    # val_check_interval 10
    for row in rows:
        assert 0 <= row["val_f1"] <= 1 and 0 <= row["val_acc"] <= 1
    assert load_checkpoint(sst2_run / "checkpoints/best.ckpt")["label_names"] == ["0", "1"]


def test_classification_test_from_checkpoint_reproduces_best_val_acc(data, sst2_run, tmp_path):
    lightning_tfm("test", "--config", SST2, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  sst2_run / "checkpoints/best.ckpt", "--data.train_path", data / "sst2_train.tsv",
                  "--data.test_path", data / "sst2_dev.tsv", "--data.tokenization.vocab_size", 300,
                  "--data.batching.batch_size", 32, "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    assert row["test_acc"] == pytest.approx(best_score(sst2_run / "checkpoints/best.ckpt"), abs=1e-6)
    assert 0 <= row["test_f1"] <= 1
    assert not (tmp_path / "tokenizer").exists()


def test_classification_predict_writes_label_names_and_probabilities(data, sst2_run, tmp_path):
    sentences = ["a gorgeous , witty , seductive movie . ", "dull and lifeless ", "it 's a film "]
    (tmp_path / "in.tsv").write_text("sentence\n" + "\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    lightning_tfm("predict", "--config", SST2, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  sst2_run / "checkpoints/best.ckpt", "--data.train_path", data / "sst2_train.tsv",
                  "--data.predict_path", tmp_path / "in.tsv", "--predictions.path", out,
                  "--trainer.enable_progress_bar", "false")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(sentences)
    for r in records:
        probs = r["probabilities"]
        assert set(probs) == {"0", "1"} and sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(probs, key=probs.get) and r["probability"] == probs[r["label"]]
