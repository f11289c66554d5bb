import inspect
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from datamodule_settings import build, merged

import lightning_tfm.data.datamodules.base as base
from lightning_tfm.data import TranslationDataModule, load_tokenizer
from lightning_tfm.data.readers import read_lines

ROOT = Path(__file__).resolve().parents[3]


def make(d: Path, tok: Path, **kw) -> TranslationDataModule:
    args = dict(train_path=str(d / "train"), val_path=str(d / "val"), test_path=str(d / "test2016"),
                tokenization={"save_dir": str(tok), "vocab_size": 1000}, batching={"max_tokens": 512})
    return build(TranslationDataModule, **merged(args, kw))


@pytest.fixture(scope="module")
def dm(multi30k_small, tmp_path_factory):
    dm = make(multi30k_small, tmp_path_factory.mktemp("tok"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_defaults_point_at_the_shared_multi30k():
    if "LIGHTNING_TFM_DATA" in os.environ:
        pytest.skip("data folder overridden")
    defaults = inspect.signature(TranslationDataModule).parameters
    for key, suffix in (("train_path", "en"), ("val_path", "de"), ("test_path", "en")):
        assert (ROOT / f"{defaults[key].default}.{suffix}").is_file()


def test_train_batches(dm, multi30k_small):
    sources, refs = read_lines(multi30k_small / "train.en"), read_lines(multi30k_small / "train.de")
    ids, tok = dm.special_ids, dm.tokenizer
    assert (dm.pad_id, ids.unk, dm.bos_id, dm.eos_id) == (0, 1, 2, 3) and dm.vocab_size == 1000
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"src", "src_mask", "tgt", "tgt_mask", "index", "sources", "refs"}
        src, tgt, smask, tmask = batch["src"], batch["tgt"], batch["src_mask"], batch["tgt_mask"]
        assert src.dtype == tgt.dtype == torch.long and smask.dtype == tmask.dtype == torch.bool
        assert src.shape[1] % 8 == 0 and tgt.shape[1] % 8 == 0
        assert src.numel() <= 512 and tgt.numel() <= 512
        assert (src[~smask] == 0).all() and (tgt[~tmask] == 0).all()
        assert (tgt[:, 0] == ids.bos).all()
        rows = torch.arange(len(src))
        assert (tgt[rows, tmask.sum(1) - 1] == ids.eos).all() and (src[rows, smask.sum(1) - 1] == ids.eos).all()
        for row, i in enumerate(batch["index"].tolist()):
            assert batch["refs"][row] == refs[i] and batch["sources"][row] == sources[i]
            assert tok.decode(tgt[row][tmask[row]].tolist()) == refs[i]
            assert tok.decode(src[row][smask[row]].tolist()) == sources[i]
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(2000))


def test_val_and_test_batches_keep_refs(dm, multi30k_small):
    dm.setup("test")
    refs = read_lines(multi30k_small / "test2016.de")
    batches = list(dm.test_dataloader())
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(200))
    assert {r for b in batches for r in b["refs"]} == set(refs)
    assert sum(len(b["index"]) for b in dm.val_dataloader()) == 200


def test_direction_flips_with_one_override(multi30k_small, tmp_path):
    flipped = make(multi30k_small, tmp_path, src_lang="de", tgt_lang="en")
    batch = next(iter(flipped.val_dataloader()))
    english = read_lines(multi30k_small / "val.en")
    assert [english[i] for i in batch["index"].tolist()] == batch["refs"]


def test_tokenizer_is_trained_once_then_reused(dm, multi30k_small, monkeypatch):
    path = Path(dm.tokenization.save_dir) / "tokenizer.json"
    assert json.loads(path.with_name("tokenizer_source.json").read_text())["vocab_size"] == 1000

    def fail(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(base, "train_tokenizer", fail)
    again = make(multi30k_small, dm.tokenization.save_dir)
    assert again.tokenizer.to_str() == dm.tokenizer.to_str()
    from_path = make(multi30k_small, "unused", tokenization={"path": str(path)})
    assert from_path.tokenizer.to_str() == dm.tokenizer.to_str()
    with pytest.raises(AssertionError, match="retrained"):
        make(multi30k_small, dm.tokenization.save_dir, tokenization={"vocab_size": 900}).tokenizer  # settings changed


def test_too_long_raises_naming_file_and_line(dm, multi30k_small):
    short = make(multi30k_small, dm.tokenization.save_dir, truncation={"max_len": 10})
    lengths = [len(ids) for ids in dm.encode(read_lines(multi30k_small / "train.en"))]
    first = next(i for i, n in enumerate(lengths) if n + 1 > 10) + 1
    with pytest.raises(ValueError, match=rf"train\.en:{first}: source has {lengths[first - 1] + 1} tokens with its "
                                         r"special tokens, more than data\.truncation\.max_len=10; set "
                                         r"data\.truncation\.longer=cut"):
        short.setup("fit")


def test_truncate_warns_and_keeps_eos(dm, multi30k_small):
    short = make(multi30k_small, dm.tokenization.save_dir, truncation={"max_len": 10, "longer": "cut"})
    with pytest.warns(UserWarning) as caught:
        dataset = short.dataset("train")
    messages = [str(w.message) for w in caught]
    assert any(re.fullmatch(r"data\.train: truncated \d+ of 2000 sources to data\.truncation\.max_len=10 tokens "
                            r"\(first at .*train\.en:\d+\)", m) for m in messages)
    assert any(re.fullmatch(r"data\.train: truncated \d+ of 2000 targets .*train\.de:\d+\)", m) for m in messages)
    assert max(map(len, dataset.src + dataset.tgt)) == 10
    assert all(s[-1] == 3 for s in dataset.src) and all(t[0] == 2 and t[-1] == 3 for t in dataset.tgt)


def test_file_errors(dm, tmp_path):
    (tmp_path / "x.en").write_text("a\nb\n")
    (tmp_path / "x.de").write_text("a\n")
    with pytest.raises(ValueError, match=r"x\.en has 2 lines but .*x\.de has 1"):
        make(tmp_path, dm.tokenization.save_dir, train_path=str(tmp_path / "x")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"data\.val_path=.*nope\.en does not exist"):
        make(tmp_path, dm.tokenization.save_dir, val_path=str(tmp_path / "nope")).setup("validate")
    with pytest.raises(FileNotFoundError, match=r"data\.tokenization\.path=.*missing\.json does not exist; "
                                                  r"leave it unset"):
        make(tmp_path, dm.tokenization.save_dir, tokenization={"path": str(tmp_path / "missing.json")}).vocab_size
    with pytest.raises(ValueError, match="data.src_lang and data.tgt_lang are both 'en'"):
        build(TranslationDataModule, src_lang="en", tgt_lang="en")


def test_tokenizer_without_bos_is_rejected(dm, tmp_path):
    tok = load_tokenizer(Path(dm.tokenization.save_dir) / "tokenizer.json")
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<s>"]
    del data["model"]["vocab"]["<s>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no token '<s>' for special_tokens\.bos"):
        make(tmp_path, "unused", tokenization={"path": str(tmp_path / "tokenizer.json")}).vocab_size


@pytest.mark.parametrize("suffix", ["tsv", "jsonl"])
def test_table_pairs(dm, multi30k_small, tmp_path, suffix):
    en, de = read_lines(multi30k_small / "val.en")[:50], read_lines(multi30k_small / "val.de")[:50]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "tsv":
        path.write_text("de\ten\n" + "".join(f"{d}\t{e}\n" for e, d in zip(en, de)), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"en": e, "de": d}) + "\n" for e, d in zip(en, de)), encoding="utf-8")
    table = make(multi30k_small, dm.tokenization.save_dir, val_path=str(path))
    got = {i: r for b in table.val_dataloader() for i, r in zip(b["index"].tolist(), b["refs"])}
    assert [got[i] for i in range(50)] == de


def test_predict_file_keeps_input_order(dm, multi30k_small, tmp_path):
    lines = read_lines(multi30k_small / "test2016.en")[:37]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pred = make(multi30k_small, dm.tokenization.save_dir, predict_path=str(tmp_path / "in.txt"),
                batching={"max_tokens": 128})
    batches = list(pred.predict_dataloader())
    assert set(batches[0]) == {"src", "src_mask", "index", "sources"}
    assert [i for b in batches for i in b["index"].tolist()] == list(range(37))
    assert [s for b in batches for s in b["sources"]] == lines


@pytest.mark.parametrize("split", ["train", "val"])
def test_ddp_ranks_get_equal_batch_counts_and_each_pair_exactly_once(dm, multi30k_small, split):
    loaders = []
    for rank in range(3):
        ranked = make(multi30k_small, dm.tokenization.save_dir)
        ranked.trainer = SimpleNamespace(world_size=3, global_rank=rank)  # what Lightning attaches under DDP
        loaders.append(ranked.train_dataloader() if split == "train" else ranked.val_dataloader())
    assert len({len(loader) for loader in loaders}) == 1
    seen = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(2000 if split == "train" else 200))   # no pair repeated, none dropped


class _Recorder(L.LightningModule):
    """Smallest module that consumes translation batches and remembers what it saw."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 4)
        self.seen: dict[str, list[list[int]]] = {}

    def _loss(self, batch):
        return self.emb(batch["src"])[batch["src_mask"]].sum() * 0 + self.emb(batch["tgt"]).mean()

    def training_step(self, batch, i):
        self.seen.setdefault(f"train{self.current_epoch}", []).append(batch["index"].tolist())
        return self._loss(batch)

    def validation_step(self, batch, i):
        self.seen.setdefault("val", []).append(batch["index"].tolist())

    def predict_step(self, batch, i):
        return batch["index"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_fit_and_predict(dm, multi30k_small, tmp_path):
    data = make(multi30k_small, dm.tokenization.save_dir, batching={"max_tokens": 2048})
    model = _Recorder(data.vocab_size)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert len(model.seen["train0"]) == len(model.seen["train1"]) == 3
    assert model.seen["train0"] != model.seen["train1"]  # Lightning called set_epoch on our batch sampler
    with pytest.warns(UserWarning, match="custom batch sampler"):
        predictions = trainer.predict(model, datamodule=data)
    assert [i for p in predictions for i in p] == list(range(200))  # test2016 slice, in order
