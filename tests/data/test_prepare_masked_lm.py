"""Masked-LM data prepared once (`lightning_tfm prepare`) reads back as the raw path builds it: the same ids,
the same truncation warnings, the same masked batches, and a stale folder refused."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datamodule_settings import build, merged

from lightning_tfm.data import MaskedLMDataModule
from lightning_tfm.data.prepare import prepare


def every(lengths) -> np.ndarray:
    """All of a dataset's lengths: an array as it is, prepared `RowLengths` read whole (it refuses `np.asarray`)."""
    return np.asarray(lengths[np.arange(len(lengths))])


def masked_lm(folder: Path, prepared: Path | None, **kw) -> MaskedLMDataModule:
    args = dict(train_path=str(folder / "train.txt"), val_path=str(folder / "val.txt.gz"), truncation={"max_len": 12},
                batching={"batch_size": 8}, tokenization={"vocab_size": 400, "save_dir": str(folder / "tok")},
                never_mask_most_frequent=5, prepared_dir=None if prepared is None else str(prepared))
    return build(MaskedLMDataModule, **merged(args, kw))


@pytest.fixture(scope="module")
def texts(data_dir, tmp_path_factory) -> Path:
    """Multi30k English captions: a plain training file with blank lines, a gzipped validation file."""
    folder = tmp_path_factory.mktemp("mlm")
    lines = (data_dir / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()[:600]
    (folder / "train.txt").write_text("\n".join(lines[:250] + ["", "   "] + lines[250:500]) + "\n", encoding="utf-8")
    with gzip.open(folder / "val.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[500:]) + "\n")
    return folder


def test_prepared_ids_and_batches_are_the_raw_ones(texts):
    raw, ready = masked_lm(texts, None), masked_lm(texts, texts / "p")
    warned = []
    for dm in (raw, ready):
        with pytest.warns(UserWarning, match=r"data.(train|val): truncated \d+ of (500|100) texts") as seen:
            dm.prepare_data()
            dm.setup("fit")
        warned.append(sorted(str(w.message) for w in seen if "truncated" in str(w.message)))
    assert warned[0] == warned[1] and len(warned[0]) == 2
    for split in ("train", "val"):
        a, b = raw.dataset(split), ready.dataset(split)
        assert len(a) == len(b) > 0 and np.array_equal(every(a.lengths()), every(b.lengths()))
        assert all(a[i]["ids"] == b[i]["ids"].tolist() for i in range(len(a)))
        assert np.array_equal(a.token_counts(raw.vocab_size), b.token_counts(ready.vocab_size, chunk=7))
    assert ready.never_masked() == raw.never_masked() and len(raw.never_masked()) == len(raw.special_ids.all()) + 5
    for loader in ("val_dataloader", "train_dataloader"):
        for x, y in zip(getattr(raw, loader)(), getattr(ready, loader)(), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert ready._rows == {}                                # prepared by streaming, read back from the rows
    manifest = json.loads((texts / "p" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["examples"] == 500 and manifest["splits"]["val"]["examples"] == 100
    assert manifest["settings"]["max_len"] == 12


def test_a_changed_setting_or_file_is_refused(texts, tmp_path):
    prepare(masked_lm(texts, texts / "p"), progress=False)          # up to date (or built) either way
    with pytest.raises(ValueError, match=r"max_len 12 -> 16.*--rebuild"):
        masked_lm(texts, texts / "p", truncation={"max_len": 16}).dataset("train")
    changed = tmp_path / "changed"
    shutil.copytree(texts, changed, ignore=shutil.ignore_patterns("p"))
    shutil.copytree(texts / "p", tmp_path / "p")
    with gzip.open(changed / "val.txt.gz", "at", encoding="utf-8") as f:    # the tokenizer stays the same
        f.write("one more caption\n")
    with pytest.raises(ValueError, match=r"val.txt.gz changed since it was prepared; run lightning_tfm prepare"):
        masked_lm(changed, tmp_path / "p").dataset("train")


def test_predict_reads_raw_text_beside_prepared_splits(texts, tmp_path):
    (tmp_path / "fill.txt").write_text("a man in a <mask> shirt\n", encoding="utf-8")
    dm = masked_lm(texts, texts / "p", predict_path=str(tmp_path / "fill.txt"))
    item = dm.dataset("predict")[0]
    assert item["text"] == "a man in a <mask> shirt" and dm.mask_id in item["ids"]
