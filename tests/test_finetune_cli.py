"""Fine-tuning through the CLI as a user does it, with YAML only: a Hugging Face folder's first-step loss equals
transformers' own on the same batch; and masked-LM pretraining -> fine-tuning with LoRA on a CSV of one's own
(any column names, named labels) -> export -> predict on a machine without the run."""

import csv
import json
import re
import shutil

import pytest
import torch
import yaml
from commands import lightning_tfm, metrics

from lightning_tfm.data import SpecialTokens, train_tokenizer


def write_yaml(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_fine_tuning_a_hugging_face_gpt2_starts_at_transformers_loss(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    text = (data / "lm_train.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text], "char", special_tokens=SpecialTokens(pad=None, bos=None, eos=None))
    hf_dir = tmp_path / "gpt2"
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    run = tmp_path / "run"
    config_file = write_yaml(tmp_path / "gpt2_finetune.yaml", {
        "seed_everything": 0,
        "model": {"class_path": "lightning_tfm.tasks.LanguageModelModule",
                  "init_args": {"init_from": str(hf_dir),
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}},
        "data": {"class_path": "lightning_tfm.data.LanguageModelDataModule",
                 "init_args": {"train_path": str(data / "lm_train.txt"), "block_size": 32,
                               "batching": {"batch_size": 4}, "batches_per_epoch": 2}},
        "trainer": {"default_root_dir": str(run), "max_steps": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "limit_val_batches": 0,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run), "name": "logs"}},
                    "callbacks": [{"class_path": "probes.SaveFirstBatch", "init_args": {"folder": str(run)}}]}})
    proc = lightning_tfm("fit", "--config", config_file)
    assert f"init_from {hf_dir} (huggingface): loaded" in proc.stderr + proc.stdout
    first_loss = next(row["train_loss"] for row in metrics(run) if row.get("step") == 0 and "train_loss" in row)

    ids = torch.load(run / "first_batch.pt", weights_only=True)["ids"]          # (B, block + 1)
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    with torch.no_grad():   # transformers shifts the labels itself: predicts ids[:, 1:] from ids[:, :-1], as ours
        want = reference(input_ids=ids, labels=ids).loss
    assert abs(first_loss - want.item()) < 1e-4 * want.item(), (first_loss, want.item())


def reviews_csv(source, target):
    """SST-2 rows rewritten as a user's own CSV: columns review,sentiment with named labels."""
    with open(source, encoding="utf-8") as f, open(target, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["review", "sentiment"])
        for line in list(f)[1:]:
            sentence, label = line.rstrip("\n").rsplit("\t", 1)
            writer.writerow([sentence.strip(), "positive" if label == "1" else "negative"])
    return target


def test_pretrain_fine_tune_a_csv_with_lora_export_and_predict_without_the_run(data, in_process, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    lightning_tfm("fit", "--config", "configs/pretrain/sst2_mlm_small.yaml", "--trainer.default_root_dir",
                  work / "mlm", "--data.train_path", data / "sst2_train.tsv", "--data.val_path",
                  data / "sst2_dev.tsv", "--data.tokenization.vocab_size", 400, "--trainer.max_steps", 3,
                  "--trainer.val_check_interval", 3, "--trainer.enable_progress_bar", "false")
    train = reviews_csv(data / "sst2_train.tsv", work / "reviews_train.csv")
    dev = reviews_csv(data / "sst2_dev.tsv", work / "reviews_dev.csv")
    proc = lightning_tfm("fit", "--config", "configs/finetune/custom_csv.yaml", "--trainer.default_root_dir",
                         work / "ft", "--model.init_args.init_from", work / "mlm/checkpoints/best.ckpt",
                         "--data.train_path", train, "--data.val_path", dev, "--trainer.max_steps", 4,
                         "--trainer.val_check_interval", 4, "--trainer.enable_progress_bar", "false")
    log = proc.stdout + proc.stderr
    assert "loaded 28 weights, 2 new, 6 dropped" in log
    assert "new (initialised here): head.classifier.weight, head.classifier.bias" in log
    total, trainable = (int(n.replace(",", "")) for n in
                        re.search(r"ClassificationModule: ([\d,]+) parameters, ([\d,]+) trainable",
                                                log).groups())
    # LoRA rank 8 on qkv, out, fc1, fc2 of 2 layers (d_model 128, d_ff 512) and a 2-class head
    adapters = 2 * 8 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert trainable == adapters + 2 * 128 + 2 and total > 10 * trainable

    in_process("export", work / "ft/checkpoints/best.ckpt", "--output", tmp_path / "exported")   # no Trainer
    shutil.rmtree(work)                                # the runs, the tokenizer and the training CSVs are gone
    new = tmp_path / "new.csv"
    new.write_text('review\nan utterly charming and moving film\n"a dull, lifeless and tedious mess"\n')
    out = tmp_path / "predictions.jsonl"
    lightning_tfm("predict", "--config", tmp_path / "exported/config.yaml", "--data.predict_path", new,
                  "--predictions.path", out, "--trainer.default_root_dir", tmp_path / "predict")
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predictions) == 2
    for p in predictions:
        assert p["label"] in ("negative", "positive") and set(p["probabilities"]) == {"negative", "positive"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5 and p["probability"] == max(p["probabilities"].values())


def test_a_multi_label_jsonl_of_sentence_pairs_needs_only_settings(data, tmp_path):
    """Any column names, pairs, several labels per example: the task follows the data (linked multi_label)."""
    sentences = [line.rsplit("\t", 1)[0].strip() for line in (data / "sst2_train.tsv").read_text().splitlines()[1:]]
    tags = ["long", "short", "question"]
    rows = []
    for i, (a, b) in enumerate(zip(sentences[::2], sentences[1::2])):
        labels = [t for t, keep in zip(tags, (len(a) > 30, len(b) < 20, i % 3 == 0)) if keep]
        rows.append(json.dumps({"premise": a, "hypothesis": b, "topics": ",".join(labels)}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:400]) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(rows[400:]) + "\n")
    run = tmp_path / "run"
    lightning_tfm("fit", "--config", "configs/classification/sst2_small.yaml", "--trainer.default_root_dir", run,
                  "--data.train_path", tmp_path / "train.jsonl", "--data.val_path", tmp_path / "dev.jsonl",
                  "--data.text_column", "premise", "--data.text_pair_column", "hypothesis",
                  "--data.label_column", "topics", "--data.label_delimiter", ",", "--data.tokenization.vocab_size", 300,
                  "--model.init_args.model.init_args.n_segments", 2,
                  "--trainer.max_steps", 3, "--trainer.val_check_interval", 3, "--trainer.enable_progress_bar",
                  "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                  "--trainer.logger.init_args.save_dir", run, "--trainer.logger.init_args.name", "logs")
    assert any("val_acc" in row for row in metrics(run))
    (tmp_path / "new.jsonl").write_text(json.dumps({"premise": "a fine film", "hypothesis": "why?"}) + "\n")
    out = tmp_path / "predictions.jsonl"
    lightning_tfm("predict", "--config", "configs/classification/sst2_small.yaml", "--ckpt_path",
                  run / "checkpoints/last.ckpt", "--data.predict_path", tmp_path / "new.jsonl",
                  "--data.text_column", "premise", "--data.text_pair_column", "hypothesis",
                  "--data.label_column", "topics", "--data.label_delimiter", ",", "--data.train_path",
                  tmp_path / "train.jsonl", "--predictions.path", out)
    (prediction,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(prediction["probabilities"]) == set(tags) and set(prediction["labels"]) <= set(tags)
