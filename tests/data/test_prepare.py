"""Prepared rows (`lightning_tfm prepare`): the same examples as the raw path, written once, refused when stale,
and every damaged file named."""

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datamodule_settings import build, merged

from lightning_tfm.data import ClassificationDataModule, LanguageModelDataModule, TranslationDataModule
from lightning_tfm.data.prepare import prepare
from lightning_tfm.data.shards import RowLengths, Rows, RowWriter, token_dtype


def every(lengths) -> np.ndarray:
    """All of a dataset's lengths: an array as it is, prepared `RowLengths` read whole (it refuses `np.asarray`)."""
    return np.asarray(lengths[np.arange(len(lengths))])

# the corpus below has two blank lines: the raw path's warning about them is checked once, in `prepared`
pytestmark = pytest.mark.filterwarnings("ignore:left out 2 of 2000 pairs")


def make(d: Path, tok: Path, prepared: Path | None, **kw) -> TranslationDataModule:
    args = dict(train_path=str(d / "train"), val_path=str(d / "val"), test_path=str(d / "test2016"),
                tokenization={"save_dir": str(tok), "vocab_size": 1000}, batching={"max_tokens": 512},
                prepared_dir=None if prepared is None else str(prepared))
    return build(TranslationDataModule, **merged(args, kw))


@pytest.fixture(scope="module")
def corpus(multi30k_small, tmp_path_factory) -> Path:
    """The small Multi30k slice with its German training side gzipped and two blank lines in it."""
    d = tmp_path_factory.mktemp("corpus")
    for name in os.listdir(multi30k_small):
        shutil.copy(multi30k_small / name, d / name)
    lines = (d / "train.de").read_text(encoding="utf-8").split("\n")
    lines[4], lines[70] = "", "   "
    with gzip.open(d / "train.de.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    (d / "train.de").unlink()
    return d


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, Path]:
    tok, out = tmp_path_factory.mktemp("tok"), tmp_path_factory.mktemp("prepared")
    with pytest.warns(UserWarning, match=r"left out 2 of 2000 pairs .* \(the first at .*train.de.gz:5\)"):
        report = prepare(make(corpus, tok, out), workers=2, progress=False)
    assert report.startswith("prepared 2,398 examples")
    return tok, out


def test_prepared_examples_are_the_raw_ones(corpus, prepared):
    tok, out = prepared
    raw, ready = make(corpus, tok, None), make(corpus, tok, out)
    for split in ("train", "val", "test"):
        a, b = raw.dataset(split), ready.dataset(split)
        assert len(a) == len(b) > 0
        assert np.array_equal(every(a.lengths()), every(b.lengths()))
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert list(x["src"]) == y["src"].tolist() and list(x["tgt"]) == y["tgt"].tolist()
            if split != "train":
                assert (x["source"], x["ref"]) == (y["source"], y["ref"])
    batch = next(iter(ready.val_dataloader()))
    assert batch["src"].dtype.is_floating_point is False and batch["refs"][0]


def test_manifest_records_the_sources_tokenizer_and_counts(corpus, prepared):
    tok, out = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert [Path(s["path"]).name for s in train["sources"]] == ["train.en", "train.de.gz"]
    assert train["examples"] == 1998 and sum(train["lengths_histogram"].values()) == 1998
    assert train["fields"]["src"]["dtype"] == "uint16" and train["texts"] == {}
    assert len(manifest["tokenizer_sha256"]) == 64 and manifest["settings"]["max_len"] == 256


def test_a_second_run_does_nothing_and_a_changed_input_is_refused(corpus, prepared, tmp_path):
    tok, out = prepared
    stamp = (out / "train.src.bin").stat().st_mtime_ns
    assert prepare(make(corpus, tok, out), progress=False).endswith("up to date, nothing to do")
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"max_len 256 -> 128.*--rebuild"):
        prepare(make(corpus, tok, out, truncation={"max_len": 128}), progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        make(corpus, tmp_path / "tok", out, tokenization={"vocab_size": 500}).dataset("val")
    changed = tmp_path / "c"
    shutil.copytree(corpus, changed)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (changed / "val.en").write_text((changed / "val.en").read_text().replace("A ", "The ", 1))
    dm = make(changed, tok, copy)
    with pytest.raises(ValueError, match=r"val.en changed since it was prepared; run lightning_tfm prepare"):
        dm.dataset("val")
    assert prepare(dm, rebuild=True, progress=False).startswith("prepared")
    assert dm.dataset("val")[0]["source"].startswith("The ")


def test_damaged_files_are_named(corpus, prepared, tmp_path):
    tok, out = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / "val.tgt.bin").read_bytes()
    (copy / "val.tgt.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"val.tgt.bin has \d+ bytes but its manifest says \d+"):
        make(corpus, tok, copy).dataset("val")
    (copy / "val.tgt.bin").unlink()
    with pytest.raises(ValueError, match=r"val.tgt.bin is missing"):
        make(corpus, tok, copy).dataset("val")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: not a readable manifest"):
        make(corpus, tok, copy).dataset("val")
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"holds no manifest.json; run lightning_tfm prepare"):
        make(corpus, tok, copy).dataset("val")


def test_fit_prepares_a_missing_folder_itself(corpus, prepared, tmp_path):
    tok, _ = prepared
    dm = make(corpus, tok, tmp_path / "fresh", val_path=None, test_path=None)
    dm.prepare_data()
    assert (tmp_path / "fresh" / "manifest.json").is_file() and len(dm.dataset("train")) == 1998


def test_wide_token_ids_and_text_rows_round_trip(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    ids = RowWriter(tmp_path, "x", token_dtype(100_000))
    ids.add([[0, 99_999, 70_000], [], [5]])
    text = RowWriter(tmp_path, "t", "uint8")
    text.add(["Grüße".encode(), b""])
    assert not (tmp_path / "x.bin").exists()           # nothing under the real names before finish
    rows, texts = Rows(tmp_path, "x", ids.finish()), Rows(tmp_path, "t", text.finish())
    assert [r.tolist() for r in (rows[0], rows[1], rows[2])] == [[0, 99_999, 70_000], [], [5]]
    assert rows.lengths().tolist() == [3, 0, 1] and texts.text(0) == "Grüße" and texts.text(1) == ""
    other = RowWriter(tmp_path, "y", "uint16")
    other.add([[1], [2, 3], [4, 5, 6, 7]])
    pair = Rows(tmp_path, "y", other.finish())
    at = np.array([2, 0, 2])
    assert RowLengths(rows, pair, combine=np.maximum)[at].tolist() == [4, 3, 4]
    assert RowLengths(rows, pair, combine=np.add)[at].tolist() == [5, 4, 5] and len(RowLengths(rows)) == 3
    with pytest.raises(TypeError, match="read a pool at a time"):
        np.asarray(RowLengths(rows))                      # never one array of the corpus's lengths
    narrow = RowWriter(tmp_path, "n", "uint16")
    with pytest.raises(ValueError, match="70000 does not fit in uint16"):
        narrow.add([[70_000]])
    narrow.abandon()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.idx", "x.bin", "x.idx", "y.bin", "y.idx"]


@pytest.mark.parametrize("kind", ["char", "byte_bpe"])
def test_language_model_streams_are_the_raw_ones(shakespeare_small, tmp_path, kind):
    """val split off the end by characters (nanoGPT's cut) and a separate test file; lines tokenized in chunks
    by worker processes give the ids of the whole text tokenized at once."""
    text = shakespeare_small.read_text(encoding="utf-8")
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(text[:5000].replace("\n", "\r\n").encode()))
    args = dict(train_path=str(shakespeare_small), test_path=str(tmp_path / "test.txt"),
                tokenization={"kind": kind, "vocab_size": 400, "save_dir": str(tmp_path / "tok")}, block_size=64)
    prepare(build(LanguageModelDataModule, **args, prepared_dir=str(tmp_path / "p")), workers=2, progress=False)
    raw, ready = build(LanguageModelDataModule, **args), build(LanguageModelDataModule, **args,
                                                               prepared_dir=str(tmp_path / "p"))
    for split in ("train", "val", "test"):
        a, b = raw.dataset(split), ready.dataset(split)
        assert len(a) == len(b) > 100 and isinstance(b.tokens, np.memmap)
        assert np.array_equal(a.tokens.numpy(), np.asarray(b.tokens))
        assert torch.equal(a[len(a) - 1]["ids"], b[len(b) - 1]["ids"]) and b[0]["ids"].dtype == torch.long


def test_max_len_errors_and_truncation_match_the_raw_path(corpus, prepared, tmp_path):
    tok, _ = prepared
    messages = []
    for folder in (None, tmp_path / "p"):
        dm = make(corpus, tok, folder, truncation={"max_len": 12})
        with pytest.raises(ValueError) as error:
            prepare(dm, progress=False) if folder else dm.dataset("train")
        messages.append(str(error.value))
    assert messages[0] == messages[1] and re.search(r"train.en:\d+: source has \d+ tokens with its special tokens, "
                                                    r"more than data.truncation.max_len=12", messages[0])
    warned = []
    for folder in (None, tmp_path / "q"):
        dm = make(corpus, tok, folder, truncation={"max_len": 12, "longer": "cut"})
        with pytest.warns(UserWarning, match=r"data.train: truncated \d+ of 1998 targets") as seen:
            prepare(dm, workers=2, progress=False) if folder else dm.dataset("train")
        warned.append(sorted(str(w.message) for w in seen if "data.train: truncated" in str(w.message)))
        assert max(len(r) for r in dm.dataset("train").tgt) == 12 if folder is None else \
            every(dm.dataset("train").lengths()).max() == 12
    assert warned[0] == warned[1] and len(warned[0]) == 2


def assert_same_items(raw, ready, splits):
    """Item by item (ids, segments, labels, index) and batch by batch, the prepared splits are the raw ones."""
    for split in splits:
        a, b = raw.dataset(split), ready.dataset(split)
        assert len(a) == len(b) > 0 and np.array_equal(every(a.lengths()), every(b.lengths()))
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert (x["index"], x["ids"], x["segments"], x["label"]) == \
                (y["index"], y["ids"].tolist(), y["segments"].tolist(), y["label"])
    for x, y in zip(raw.val_dataloader(), ready.val_dataloader(), strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_classification_splits_are_the_raw_ones(sst2_small, data_dir, tmp_path):
    """SST-2 with a seeded val_fraction split carved off train, dev.tsv as test, short max_len (so inputs are
    cut, with the same warnings); the prepared run learns its labels from the manifest and reads no raw row."""
    args = dict(train_path=str(sst2_small), val_path=None, val_fraction=0.1, seed=3,
                test_path=str(data_dir / "sst2" / "dev.tsv"), truncation={"max_len": 16},
                tokenization={"vocab_size": 600, "save_dir": str(tmp_path / "tok")})
    raw, ready = build(ClassificationDataModule, **args), build(ClassificationDataModule, **args,
                                                                prepared_dir=str(tmp_path / "p"))
    warned = []
    for dm in (raw, ready):
        with pytest.warns(UserWarning, match=r"data.(train|val|test): truncated \d+ of (2700|300|872) inputs") as seen:
            dm.prepare_data()
            dm.setup()
        warned.append(sorted(str(w.message) for w in seen if "truncated" in str(w.message)))
    assert warned[0] == warned[1] and len(warned[0]) == 3
    again = build(ClassificationDataModule, **args, prepared_dir=str(tmp_path / "p"))
    assert again.label_names == raw.label_names == ["0", "1"]
    assert_same_items(raw, again, ("train", "val", "test"))
    assert again._rows == {}                                    # neither the labels nor the rows came from raw
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["value_names"] == {"labels": ["0", "1"]} and manifest["settings"]["seed"] == 3
    assert manifest["splits"]["val"]["values"]["labels"]["rows"] == 300
    assert [Path(s["path"]).name for s in manifest["splits"]["val"]["sources"]] == ["train.tsv"]


PAIRS = [{"premise": "a man is playing a guitar on the stage", "hypothesis": "a man plays music", "tags": "music"},
         {"premise": "a dog runs", "hypothesis": "a cat sleeps on the warm sofa all day long", "tags": "animal,rest"},
         {"premise": "two people walk", "hypothesis": "people walk", "tags": ""}] * 20


def pairs_dm(folder: Path, prepared: Path | None, **kw) -> ClassificationDataModule:
    """Multi-label text pairs (an empty tag cell is an example with no label), cut longest-first at max_len."""
    args = dict(train_path=str(folder / "train.jsonl"), val_path=str(folder / "val.jsonl"), text_column="premise",
                text_pair_column="hypothesis", label_column="tags", label_delimiter=",",
                tokenization={"kind": "char", "save_dir": str(folder / "tok")}, truncation={"max_len": 32},
                batching={"batch_size": 16}, prepared_dir=None if prepared is None else str(prepared))
    return build(ClassificationDataModule, **merged(args, kw))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    for name, records in (("train", PAIRS), ("val", PAIRS[:9])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"data.(train|val): truncated (40 of 60|6 of 9) inputs"):
        prepare(pairs_dm(folder, folder / "p"), progress=False)
    return folder


@pytest.mark.filterwarnings("ignore:data.(train|val). truncated")
def test_classification_pairs_and_multi_labels_are_the_raw_ones(pairs):
    raw, ready = pairs_dm(pairs, None), pairs_dm(pairs, pairs / "p")
    assert_same_items(raw, ready, ("train", "val"))
    assert ready.dataset("train")[2]["label"] == [] and ready.dataset("train")[1]["label"] == [0, 2]
    assert ready.label_names == ["animal", "music", "rest"]
    messages = []
    for folder in (None, pairs / "short"):
        dm = pairs_dm(pairs, folder, truncation={"max_len": 20, "longer": "error"})
        with pytest.raises(ValueError) as error:
            prepare(dm, progress=False) if folder else dm.dataset("train")
        messages.append(str(error.value))
    assert messages[0] == messages[1] and re.fullmatch(r".*train.jsonl:1: input has 58 tokens with its special tokens, "
                                                       r"more than data.truncation.max_len=20; .*", messages[0])


def test_classification_refuses_changed_labels_and_files(pairs, tmp_path):
    with pytest.raises(ValueError, match=r"label_delimiter ',' -> ';'.*--rebuild"):
        prepare(pairs_dm(pairs, pairs / "p", label_delimiter=";"), progress=False)
    named = pairs_dm(pairs, pairs / "p", label_names=["animal", "music", "rest"])
    with pytest.raises(ValueError, match=r"label_names None -> \['animal', 'music', 'rest'\]; run lightning_tfm "):
        named.dataset("train")
    changed = tmp_path / "changed"
    shutil.copytree(pairs, changed, ignore=shutil.ignore_patterns("p", "short"))
    shutil.copytree(pairs / "p", tmp_path / "p")
    (changed / "train.jsonl").write_text((changed / "train.jsonl").read_text().replace('"music"', '"song"', 1))
    dm = pairs_dm(changed, tmp_path / "p")
    assert dm.label_names == ["animal", "music", "rest", "song"]      # a stale manifest's names are not used
    with pytest.raises(ValueError, match=r"train.jsonl changed since it was prepared; run lightning_tfm prepare"):
        dm.dataset("val")
