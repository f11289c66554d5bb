import csv
import json
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from datamodule_settings import build, merged

from lightning_tfm.data import MaskedLMDataModule, SpecialTokens, train_tokenizer
from lightning_tfm.data.datamodules.masked_lm_data import encode_with_masks

IGNORE = -100


def make(train, tok, **kw) -> MaskedLMDataModule:
    return build(MaskedLMDataModule,
                 **merged(dict(train_path=str(train), val_path=None,
                           tokenization={"save_dir": str(tok), "vocab_size": 800}, batching={"batch_size": 64}), kw))


@pytest.fixture(scope="module")
def mlm(sst2_small, data_dir, tmp_path_factory):
    dm = make(sst2_small, tmp_path_factory.mktemp("tok"), val_path=str(data_dir / "sst2" / "dev.tsv"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def sentences(path):
    """The shared data README's stdlib loader for SST-2."""
    with open(path, encoding="utf-8", newline="") as f:
        return [s.strip() for s, _ in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]


def test_batches_are_cls_text_sep_with_bert_labels(mlm, sst2_small):
    texts, dataset, ids = sentences(sst2_small), mlm.dataset("train"), mlm.special_ids
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (0, 1, 2, 3, 4)
    seen = []
    for batch in mlm.train_dataloader():
        assert set(batch) == {"ids", "mask", "labels", "index"}
        x, real, labels = batch["ids"], batch["mask"], batch["labels"]
        assert x.shape[1] % 8 == 0 and len(x) <= 64 and labels.dtype == torch.long
        for row, i in enumerate(batch["index"].tolist()):
            original = torch.tensor(dataset.ids[i])
            n = len(original)
            assert original[0] == ids.cls and original[-1] == ids.sep
            assert mlm.tokenizer.decode(original[1:-1].tolist()) == texts[i]
            assert int(real[row].sum()) == n and (x[row, n:] == ids.pad).all()
            chosen = labels[row, :n] != IGNORE
            assert torch.equal(labels[row, :n][chosen], original[chosen])     # labels: the original ids
            assert torch.equal(x[row, :n][~chosen], original[~chosen])         # the rest is untouched
            # cls, sep and padding are never chosen
            assert not chosen[0] and not chosen[-1] and (labels[row, n:] == IGNORE).all()
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(3000))
    assert sum(len(b["index"]) for b in mlm.val_dataloader()) == 872


def test_bert_proportions_over_four_epochs(mlm):
    loader = mlm.train_dataloader()
    specials = torch.tensor(mlm.special_ids.all())
    n = Counter()
    for epoch in range(4):
        loader.batch_sampler.sampler.set_epoch(epoch)  # as Lightning does
        for batch in loader:
            x, labels = batch["ids"], batch["labels"]
            chosen = labels != IGNORE
            original = torch.where(chosen, labels, x)
            masked, kept = chosen & (x == mlm.mask_id), chosen & (x == labels)
            random = chosen & ~masked & ~kept
            assert not torch.isin(x[random], specials).any()  # random replacements are ordinary tokens
            n.update(ordinary=int((batch["mask"] & ~torch.isin(original, specials)).sum()), chosen=int(chosen.sum()),
                     masked=int(masked.sum()), kept=int(kept.sum()), random=int(random.sum()))
    assert n["ordinary"] > 150_000

    def close(count, total, p):  # within 5 binomial standard deviations
        return abs(count / total - p) < 5 * math.sqrt(p * (1 - p) / total)

    # a random draw equals the original with chance 1/795, which moves 0.01% of "random" to "kept"
    assert close(n["chosen"], n["ordinary"], 0.15)
    assert close(n["masked"], n["chosen"], 0.8) and close(n["random"], n["chosen"], 0.1)
    assert close(n["kept"], n["chosen"], 0.1)


class _Recorder(L.LightningModule):
    """Smallest module that consumes masked-LM batches and remembers their labels per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[str, list[torch.Tensor]] = {}

    def training_step(self, batch, i):
        self.seen.setdefault(f"train{self.current_epoch}", []).append(batch["labels"].clone())
        return self.w ** 2

    def validation_step(self, batch, i):
        self.seen.setdefault(f"val{self.current_epoch}", []).append(batch["labels"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_masks_repeat_and_training_masks_change_every_epoch(data_dir, tmp_path, num_workers):
    # one example, so the batch is the same every epoch and only the epoch can change its masks; with
    # workers, the epoch must reach the collate function in another process
    line = next(s for s in sentences(data_dir / "sst2" / "dev.tsv") if len(s) > 150)
    (tmp_path / "one.txt").write_text(line + "\n", encoding="utf-8")
    data = make(tmp_path / "one.txt", tmp_path / "tok", val_path=str(tmp_path / "one.txt"),
                tokenization={"kind": "char"}, batching={"batch_size": 1, "num_workers": num_workers},
                truncation={"max_len": 256})
    recorder = _Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(recorder, datamodule=data)
    train = [recorder.seen[f"train{e}"][0] for e in range(3)]
    val = [recorder.seen[f"val{e}"][0] for e in range(3)]
    assert all((t != IGNORE).sum() > 10 for t in train + val)
    assert torch.equal(val[0], val[1]) and torch.equal(val[0], val[2])
    assert not torch.equal(train[0], train[1]) and not torch.equal(train[1], train[2])
    assert not torch.equal(train[0], train[2])


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_do_not_depend_on_the_number_of_processes(mlm, split):
    def batches(dm):
        return list(dm.train_dataloader() if split == "train" else dm.val_dataloader())

    single = batches(mlm)
    ranked, first_seeds = [], []
    for rank in range(2):
        dm = make(mlm.train_path, mlm.tokenization.save_dir, val_path=mlm.val_path)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning attaches under DDP
        ranked.append(batches(dm))
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        first_seeds.append(next(iter(loader.batch_sampler))[0][0])    # (mask seed, index) of its first example
    split = []
    for b, batch in enumerate(single):  # global batch b is batch b // 2 of rank b % 2, with the same masks,
        theirs = ranked[b % 2][b // 2]  # except a batch split in two to even out an odd count (its first half)
        if not torch.equal(batch["index"], theirs["index"]):
            assert torch.equal(batch["index"][: len(theirs["index"])], theirs["index"])
            split.append(b)
            continue
        assert torch.equal(batch["ids"], theirs["ids"]) and torch.equal(batch["labels"], theirs["labels"])
    assert len(split) == len(single) % 2
    assert first_seeds[0] != first_seeds[1]                # the ranks' first batches draw different masks


def test_plain_text_lines_jsonl_column_and_val_fraction(mlm, sst2_small, tmp_path):
    texts = sentences(sst2_small)[:200]
    (tmp_path / "train.txt").write_text("\n".join(texts[:100]) + "\n\n   \n" + "\n".join(texts[100:]) + "\n",
                                        encoding="utf-8")
    dm = make(tmp_path / "train.txt", mlm.tokenization.save_dir,
              tokenization={"path": str(Path(mlm.tokenization.save_dir) / "tokenizer.json")}, val_fraction=0.1, seed=3)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert (len(train), len(val)) == (180, 20)
    assert sorted(train.texts + val.texts) == sorted(texts)                    # blank lines skipped
    assert [dm.tokenizer.decode(x) for x in val.ids] == val.texts
    again = make(tmp_path / "train.txt", mlm.tokenization.save_dir, val_fraction=0.1, seed=3,
                 tokenization={"path": str(Path(mlm.tokenization.save_dir) / "tokenizer.json")})
    assert again.dataset("val").texts == val.texts
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                                                enumerate(texts[:30])), encoding="utf-8")
    table = make(tmp_path / "train.txt", mlm.tokenization.save_dir, val_path=str(tmp_path / "val.jsonl"),
                 text_column="text",
                 tokenization={"path": str(Path(mlm.tokenization.save_dir) / "tokenizer.json")})
    assert table.dataset("val").texts == texts[:30]


def test_truncation_keeps_cls_and_sep(mlm, sst2_small):
    short = make(sst2_small, mlm.tokenization.save_dir, truncation={"max_len": 8})
    with pytest.warns(UserWarning) as caught:
        dataset = short.dataset("train")
    assert any(re.fullmatch(r"data\.train: truncated \d+ of 3000 texts to data\.truncation\.max_len=8 tokens "
                            r"\(first at "
                            r".*train\.tsv:\d+\)", str(w.message)) for w in caught)
    full = mlm.dataset("train").ids
    assert max(map(len, dataset.ids)) == 8
    assert all(x == y[:7] + [3] if len(y) > 8 else x == y for x, y in zip(dataset.ids, full))
    strict = make(sst2_small, mlm.tokenization.save_dir, truncation={"max_len": 8, "longer": "error"})
    first = next(i for i, ids in enumerate(full) if len(ids) > 8)
    with pytest.raises(ValueError, match=rf"train\.tsv:{first + 2}: text has {len(full[first])} tokens with its "
                                         r"special tokens, more than data\.truncation\.max_len=8"):
        strict.dataset("train")


@pytest.mark.parametrize("kind, with_mask, text, position", [
    ("bpe", "in <mask> film", "in the film", 1),
    ("wordpiece", "in <mask> film", "in the film", 1),
    ("unigram", "<mask> film", "the film", 0),
    ("byte_bpe", "in <mask> film", "in the film", 1),
    ("char", "in t<mask>e film", "in the film", 4),
])
def test_mask_in_typed_text_matches_a_masked_training_text(sst2_small, kind, with_mask, text, position):
    """`in <mask> film` encodes as `in the film` does after masking `the`: no stray space tokens."""
    specials = SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>", mask="<mask>")
    tokenizer = train_tokenizer(sentences(sst2_small)[:1000], kind, 500, specials)
    mask_id = tokenizer.token_to_id("<mask>")
    reference = tokenizer.encode(text, add_special_tokens=False).ids
    masked = reference[:position] + [mask_id] + reference[position + 1:]
    assert encode_with_masks(tokenizer, with_mask, mask_id) == masked


def test_predict_batches_keep_file_order_and_name_bad_lines(mlm, tmp_path):
    lines = ["a <mask> film", "<mask> is great .", "the <mask> <mask> of the year"] * 3
    (tmp_path / "fill.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pred = make(mlm.train_path, mlm.tokenization.save_dir, predict_path=str(tmp_path / "fill.txt"),
                batching={"batch_size": 4})
    batches = list(pred.predict_dataloader())
    assert set(batches[0]) == {"ids", "mask", "index", "texts"}
    assert [len(b["texts"]) for b in batches] == [4, 4, 1]
    assert [t for b in batches for t in b["texts"]] == lines
    assert [i for b in batches for i in b["index"].tolist()] == list(range(9))
    first = batches[0]["ids"][0][batches[0]["mask"][0]].tolist()
    assert first == [2, *pred.tokenizer.encode("a", add_special_tokens=False).ids, 4,
                     *pred.tokenizer.encode("film", add_special_tokens=False).ids, 3]
    assert [int((b["ids"] == 4).sum()) for b in batches] == [5, 5, 2]
    (tmp_path / "fill.txt").write_text("a <mask> film\njust text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fill\.txt:2: no <mask> in 'just text'; mark each token to fill in"):
        make(mlm.train_path, mlm.tokenization.save_dir, predict_path=str(tmp_path / "fill.txt")).setup("predict")
    (tmp_path / "fill.txt").write_text("a <mask> film " + "and more " * 20 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fill\.txt:1: \d+ tokens with cls and sep, more than "
                                         r"data\.truncation\.max_len=16"):
        make(mlm.train_path, mlm.tokenization.save_dir, predict_path=str(tmp_path / "fill.txt"),
             truncation={"max_len": 16}).setup("predict")


def test_errors(mlm, tmp_path):
    with pytest.raises(ValueError, match=r"data\.mask_prob=0\.0, must be in \(0, 1\]"):
        make(mlm.train_path, tmp_path, mask_prob=0.0)
    with pytest.raises(ValueError, match=r"data\.replace_prob=0\.8 and data\.random_prob=0\.3 must be >= 0 with a "
                                         r"sum <= 1"):
        make(mlm.train_path, tmp_path, random_prob=0.3)
    with pytest.raises(ValueError, match=r"data\.truncation\.max_len=2, must be >= 3 \(cls, one token, sep\)"):
        make(mlm.train_path, tmp_path, truncation={"max_len": 2})
    with pytest.raises(ValueError, match=r"train\.tsv:1: no column 'text' in the header; available columns: "
                                         r"\['sentence', 'label'\]"):
        make(mlm.train_path, tmp_path, text_column="text").vocab_size
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank\.txt holds no text, only whitespace \(4 bytes\)"):
        make(tmp_path / "blank.txt", tmp_path).vocab_size
    with pytest.raises(FileNotFoundError, match=r"data\.test_path=.*missing\.txt does not exist"):
        make(mlm.train_path, mlm.tokenization.save_dir, test_path=str(tmp_path / "missing.txt")).setup("test")


def test_val_fraction_holds_out_the_rows_classification_holds_out(ag_news_small, tmp_path):
    """configs/pretrain/ag_news_mlm_small.yaml relies on this: pretraining never sees the fine-tuning's val rows."""
    from lightning_tfm.data import ClassificationDataModule

    ours = make(ag_news_small, tmp_path, val_fraction=0.1, text_column="text", seed=5)
    theirs = build(ClassificationDataModule, train_path=str(ag_news_small), val_path=None, val_fraction=0.1,
                   text_column="text", tokenization={"save_dir": str(tmp_path)}, seed=5)
    lines = [r.line for r in ours._split_rows("val")]
    assert len(lines) == 200 and lines == [r.line for r in theirs._split_rows("val")]


def test_the_most_frequent_tokens_are_never_masked_nor_drawn_as_replacements(sst2_small, tmp_path):
    dm = make(sst2_small, tmp_path, never_mask_most_frequent=20, mask_prob=0.5)
    dm.prepare_data()
    dm.setup("fit")
    specials = set(dm.special_ids.all())
    counts = Counter(t for ids in dm.dataset("train").ids for t in ids if t not in specials)
    frequent = {t for t, _ in counts.most_common(20)}
    assert set(dm.never_masked()) == specials | frequent and len(dm.never_masked()) == len(specials) + 20
    chosen, replaced = Counter(), Counter()
    for batch in dm.train_dataloader():
        labels, x = batch["labels"], batch["ids"]
        chosen.update(labels[labels != IGNORE].tolist())
        swapped = (labels != IGNORE) & (x != labels) & (x != dm.mask_id)
        replaced.update(x[swapped].tolist())
    assert not frequent & set(chosen) and not frequent & set(replaced)
    assert sum(chosen.values()) > 5000 and len(replaced) > 100          # everything else is still masked
    with pytest.raises(ValueError, match="never_mask_most_frequent=-1"):
        make(sst2_small, tmp_path, never_mask_most_frequent=-1)
