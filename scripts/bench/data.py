"""Data pipeline family: tokens/s of our DataModules (tokenize + batch) on the shipped corpora, against our
training consumption at this run's sizes; a ratio above 1 means the pipeline keeps up."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from lightning_tfm.callbacks import count_tokens
from lightning_tfm.data.datamodules import ClassificationDataModule, LanguageModelDataModule, TranslationDataModule
from lightning_tfm.data.settings import Batching, Tokenization, Truncation

from .timing import Bench, Record


def bench_data(b: Bench, data: Path, training: dict[str, float], repeats: int) -> None:
    """Tokenize the training split and batch one epoch of it, from a fresh DataModule whose tokenizer was
    trained beforehand (training the tokenizer is a one-off and is not timed). Tokens are counted as the
    `TokensPerSecond` callback counts them (real tokens), against our training rate at this run's sizes."""
    s, shakespeare = b.s, data / "tiny_shakespeare/input.txt"
    lm_batches = max(1, int(0.9 * shakespeare.stat().st_size) // (s.batch * s.seq))   # the 90% split about once
    corpora = {
        "decoder": ("tiny_shakespeare char", lambda tok, d: LanguageModelDataModule(
            str(shakespeare), block_size=s.seq, batches_per_epoch=lm_batches,
            tokenization=Tokenization(path=tok, save_dir=d, kind="char"), batching=Batching(batch_size=s.batch))),
        "classifier": ("sst2 bpe", lambda tok, d: ClassificationDataModule(
            str(data / "sst2/train.tsv"), val_path=None, tokenization=Tokenization(tok, d, vocab_size=s.vocab),
            batching=Batching(batch_size=s.batch), truncation=Truncation(s.cls_seq, longer="cut"))),
        "seq2seq": ("multi30k bpe", lambda tok, d: TranslationDataModule(
            str(data / "multi30k/train"), val_path=None, test_path=None,
            tokenization=Tokenization(tok, d, vocab_size=s.vocab),
            batching=Batching(max_tokens=max(s.batch * s.seq, 256), batch_size=None),
            truncation=Truncation(max_len=256))),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family, (corpus, make) in corpora.items():
            d = str(Path(tmp) / family)
            make(None, d).tokenizer                              # train and save it once
            b.log(f"data {corpus}: tokenizer trained")
            rates = [b.rate(lambda: sum(count_tokens(x) for x in make(f"{d}/tokenizer.json", d).train_dataloader()))
                     for _ in range(repeats)]
            model = training.get(family)
            b.add(Record(f"data {corpus} (tokenize+batch) vs {family} train", statistics.median(rates), model,
                         "tok/s", statistics.median(rates) / model if model else None, min(rates), max(rates),
                         note="peer = our model's training tok/s; ratio > 1: the pipeline keeps up"))
