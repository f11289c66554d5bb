import csv
import json

import pytest
import torch
from datamodule_settings import build, merged

from lightning_tfm.data import ClassificationDataModule


def make(train, tok, **kw) -> ClassificationDataModule:
    return build(ClassificationDataModule,
                 **merged(dict(train_path=str(train), val_path=None,
                           tokenization={"save_dir": str(tok), "vocab_size": 800}, batching={"batch_size": 64}), kw))


@pytest.fixture(scope="module")
def sst2(sst2_small, data_dir, tmp_path_factory):
    dm = make(sst2_small, tmp_path_factory.mktemp("tok"), val_path=str(data_dir / "sst2" / "dev.tsv"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def reference_rows(path, delimiter="\t"):
    """The shared data README's stdlib loader."""
    with open(path, encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        return [(s.strip(), y) for s, y in list(csv.reader(f, delimiter=delimiter, quoting=quoting))[1:]]


def test_sst2_batches(sst2, sst2_small):
    rows = reference_rows(sst2_small)
    ids = sst2.special_ids
    assert sst2.label_names == ["0", "1"] and sst2.n_classes == 2
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (0, 1, 2, 3, 4)
    seen = []
    for batch in sst2.train_dataloader():
        assert set(batch) == {"ids", "mask", "labels", "index"}
        x, mask = batch["ids"], batch["mask"]
        assert x.shape[1] % 8 == 0 and len(x) <= 64 and batch["labels"].dtype == torch.long
        assert (x[:, 0] == ids.cls).all() and (x[torch.arange(len(x)), mask.sum(1) - 1] == ids.sep).all()
        assert (x[~mask] == ids.pad).all()
        for row, i in enumerate(batch["index"].tolist()):
            sentence, label = rows[i]
            assert batch["labels"][row].item() == int(label)
            assert sst2.tokenizer.decode(x[row][mask[row]].tolist()) == sentence
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(3000))
    assert sum(len(b["labels"]) for b in sst2.val_dataloader()) == 872


def test_unseen_validation_label_names_file_and_line(sst2, tmp_path):
    val = tmp_path / "dev.tsv"
    val.write_text("sentence\tlabel\ngood \t1\nfine \tmaybe\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:3: label 'maybe' is not one of the known labels \['0', '1'\] "
                                         r"\(data\.label_names, or those of the training split .*train\.tsv\)"):
        make(sst2.train_path, sst2.tokenization.save_dir, val_path=str(val)).setup("validate")


def test_too_long_raises_naming_file_and_line(sst2):
    short = make(sst2.train_path, sst2.tokenization.save_dir, truncation={"max_len": 6, "longer": "error"})
    lengths = [len(short.tokenizer.encode(s, add_special_tokens=False).ids) for s, _ in reference_rows(sst2.train_path)]
    first = next(i for i, n in enumerate(lengths) if n + 2 > 6)
    with pytest.raises(ValueError, match=rf"train\.tsv:{first + 2}: input has {lengths[first] + 2} tokens with its "
                                         r"special tokens, more than data\.truncation\.max_len=6; set "
                                         r"data\.truncation\.longer=cut"):
        short.setup("fit")


def test_val_fraction_carves_a_seeded_disjoint_split(ag_news_small, tmp_path):
    dm = make(ag_news_small, tmp_path, val_fraction=0.1, text_column="text", seed=3)
    train, val = dm._split_rows("train"), dm._split_rows("val")
    assert (len(train), len(val)) == (1800, 200)
    assert sorted(r.line for r in train + val) == list(range(2, 2002))
    assert len(list(dm.training_texts())) == 1800  # the tokenizer never sees the carved-out rows
    again = make(ag_news_small, tmp_path, val_fraction=0.1, text_column="text", seed=3)
    assert [r.line for r in again._split_rows("val")] == [r.line for r in val]
    assert dm.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    texts = {r.line: r["text"] for r in val}
    lines = [r.line for r in val]
    for row, i in enumerate(batch["index"].tolist()):
        decoded = dm.tokenizer.decode(batch["ids"][row][batch["mask"][row]].tolist())
        assert decoded == texts[lines[i]][: len(decoded)]  # truncation keeps a prefix


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


PAIRS = [{"premise": "a man is playing a guitar on the stage", "hypothesis": "a man plays music", "label": "entail"},
         {"premise": "a dog runs", "hypothesis": "a cat sleeps on the warm sofa all day", "label": "contradict"},
         {"premise": "two people walk", "hypothesis": "people walk", "label": "entail"}] * 20


def test_text_pairs_get_segments_and_longest_first_truncation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    dm = make(tmp_path / "train.jsonl", tmp_path / "tok", text_column="premise", text_pair_column="hypothesis",
              tokenization={"kind": "char"}, truncation={"max_len": 32})
    with pytest.warns(UserWarning, match=r"data\.train: truncated 40 of 60 inputs"):
        dm.setup("fit")
    sp = dm.special_ids
    for batch in dm.train_dataloader():
        assert set(batch) == {"ids", "mask", "segments", "labels", "index"}
        for row, i in enumerate(batch["index"].tolist()):
            ids, seg = batch["ids"][row][batch["mask"][row]].tolist(), batch["segments"][row].tolist()
            a, b = dm.encode([PAIRS[i]["premise"], PAIRS[i]["hypothesis"]])
            first_sep = ids.index(sp.sep)
            got_a, got_b = ids[1:first_sep], ids[first_sep + 1:-1]
            assert got_a == a[: len(got_a)] and got_b == b[: len(got_b)] and ids[-1] == sp.sep
            room = 32 - 3
            if len(a) + len(b) <= room:
                assert (got_a, got_b) == (a, b)
            elif min(len(a), len(b)) <= room // 2:  # the longer text loses tokens, the shorter keeps all
                assert sorted([len(got_a), len(got_b)]) == [min(len(a), len(b)), room - min(len(a), len(b))]
            else:  # both cut to half, ties taken from the second text
                assert (len(got_a), len(got_b)) == (room - room // 2, room // 2)
            assert seg[: len(ids)] == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
            assert batch["labels"][row].item() == dm.label_names.index(PAIRS[i]["label"])


def test_multi_label_is_multi_hot(tmp_path):
    records = [{"text": "goal scored in the final", "tags": "sports"},
               {"text": "stocks fall after the match", "tags": "business, sports"},
               {"text": "nothing", "tags": ""}] * 10
    write_jsonl(tmp_path / "train.jsonl", records)
    dm = make(tmp_path / "train.jsonl", tmp_path / "tok", text_column="text", label_column="tags",
              label_delimiter=",", tokenization={"kind": "char"})
    assert dm.label_names == ["business", "sports"] and dm.multi_label
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    want = {"sports": [0.0, 1.0], "business, sports": [1.0, 1.0], "": [0.0, 0.0]}
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [want[records[i]["tags"]] for i in batch["index"].tolist()]


def test_predict_file_without_labels(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in ["good bad", "bad", "xoz"]])
    dm = make(tmp_path / "train.jsonl", tmp_path / "tok", text_column="text", tokenization={"kind": "char"},
              predict_path=str(tmp_path / "new.jsonl"))
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"ids", "mask", "index"} and batch["index"].tolist() == [0, 1, 2]
    assert batch["ids"][2, 1:4].tolist() == [dm.special_ids.unk, dm.tokenizer.token_to_id("o"), dm.special_ids.unk]


def test_argument_errors(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": ""}])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: the label column 'label' is empty"):
        make(tmp_path / "train.jsonl", tmp_path / "tok", text_column="text").label_names
    with pytest.raises(ValueError, match=r"data\.val_fraction=1\.0, must be in \[0, 1\)"):
        make(tmp_path / "train.jsonl", tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data\.batching\.max_tokens and data\.batching\.batch_size are both None"):
        make(tmp_path / "train.jsonl", tmp_path, batching={"batch_size": None})
    with pytest.raises(FileNotFoundError, match=r"data\.train_path=.*nope\.tsv does not exist"):
        make(tmp_path / "nope.tsv", tmp_path).label_names
