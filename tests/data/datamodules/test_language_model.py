from types import SimpleNamespace

import pytest
import torch
from datamodule_settings import build, merged
from lightning.pytorch.trainer.states import TrainerFn

from lightning_tfm.data import LanguageModelDataModule


def make(train, tok, **kw) -> LanguageModelDataModule:
    return build(LanguageModelDataModule,
                 **merged(dict(train_path=str(train), tokenization={"save_dir": str(tok)}, block_size=32,
                           batching={"batch_size": 8}, batches_per_epoch=5), kw))


@pytest.fixture(scope="module")
def lm(shakespeare_small, tmp_path_factory):
    dm = make(shakespeare_small, tmp_path_factory.mktemp("tok"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_nanogpt_split_and_vocabulary_on_the_full_file(data_dir, tmp_path):
    dm = make(data_dir / "tiny_shakespeare" / "input.txt", tmp_path)
    dm.setup("fit")
    # tiny_shakespeare/SOURCE.md: 1,003,854 train and 111,540 val characters, 65 distinct characters
    assert len(dm.dataset("train").tokens) == 1_003_854 and len(dm.dataset("val").tokens) == 111_540
    assert dm.vocab_size == 65 + 1 and dm.special_ids.unk == 0 and dm.pad_id is None


def test_training_blocks_are_random_windows_of_the_stream(lm, shakespeare_small):
    text = shakespeare_small.read_text(encoding="utf-8")[:90_000]
    tokens = lm.dataset("train").tokens
    assert lm.tokenizer.decode(tokens.tolist()) == text
    batches = list(lm.train_dataloader())
    assert len(batches) == 5
    offsets = set()
    for batch in batches:
        assert set(batch) == {"ids"} and batch["ids"].shape == (8, 33) and batch["ids"].dtype == torch.long
        for row in batch["ids"].tolist():
            start = text.find(lm.tokenizer.decode(row))  # one character per token
            assert start >= 0 and tokens[start:start + 33].tolist() == row
            offsets.add(start)
    assert len(offsets) > 35  # 40 draws from ~90k offsets: nearly all distinct


def test_offsets_depend_on_seed_epoch_and_rank(lm):
    def first_batch(loader):
        return next(iter(loader))["ids"]

    a, b = lm.train_dataloader(), lm.train_dataloader()
    assert torch.equal(first_batch(a), first_batch(b))
    a.batch_sampler.sampler.set_epoch(1)                  # where Lightning calls it
    assert not torch.equal(first_batch(a), first_batch(b))
    b.batch_sampler.sampler.set_epoch(1)
    assert torch.equal(first_batch(a), first_batch(b))
    b.batch_sampler.batches.sampler.rank = 1              # ResumableBatches > BatchSampler > RandomOffsetSampler
    assert not torch.equal(first_batch(a), first_batch(b))


def test_validation_windows_predict_every_token_once_in_order(lm):
    tokens = lm.dataset("val").tokens
    blocks = torch.cat([b["ids"] for b in lm.val_dataloader()])                    # (n, 33)
    n = (len(tokens) - 1) // 32
    assert blocks.shape == (n, 33)
    assert torch.equal(blocks[:, 1:].reshape(-1), tokens[1: 1 + n * 32])            # targets: each token once
    assert torch.equal(blocks[:, :-1].reshape(-1), tokens[: n * 32])


def test_separate_files_and_a_subword_tokenizer(shakespeare_small, tmp_path):
    text = shakespeare_small.read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:80_000], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[80_000:], encoding="utf-8")
    dm = make(tmp_path / "train.txt", tmp_path / "tok", val_path=str(tmp_path / "val.txt"),
              tokenization={"kind": "byte_bpe", "vocab_size": 500})
    dm.setup("fit")
    assert dm.vocab_size == 500
    val = dm.dataset("val").tokens
    assert dm.tokenizer.decode(val.tolist()) == text[80_000:]
    assert len(val) < 0.6 * len(text[80_000:])


def test_prompts_for_generation_keep_file_order(lm, tmp_path):
    prompts = ["ROMEO:", "First Citizen:  Before", "What, ho!"] * 4
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    dm = make(lm.train_path, lm.tokenization.save_dir, predict_path=str(tmp_path / "prompts.txt"),
              batching={"batch_size": 5})
    batches = list(dm.predict_dataloader())
    assert [len(b["prompts"]) for b in batches] == [5, 5, 2]
    assert [t for b in batches for t in b["texts"]] == prompts
    assert [i for b in batches for i in b["index"].tolist()] == list(range(12))
    assert [dm.tokenizer.decode(p) for b in batches for p in b["prompts"]] == prompts
    (tmp_path / "prompts.txt").write_text("ROMEO:\n\nJULIET:\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.txt:2: empty prompt"):
        make(lm.train_path, lm.tokenization.save_dir, predict_path=str(tmp_path / "prompts.txt")).setup("predict")


def test_errors(lm, tmp_path):
    with pytest.raises(ValueError, match=r"data\.val has \d+ tokens, fewer than data\.block_size \+ 1 = 20001"):
        make(lm.train_path, lm.tokenization.save_dir, block_size=20_000).setup("fit")
    with pytest.raises(ValueError, match=r"data\.block_size=0, must be >= 1"):
        make(lm.train_path, lm.tokenization.save_dir, block_size=0)
    with pytest.raises(FileNotFoundError, match=r"data\.test_path=.*missing\.txt does not exist"):
        make(lm.train_path, lm.tokenization.save_dir, test_path=str(tmp_path / "missing.txt")).setup("test")


def test_resuming_mid_epoch_with_another_number_of_processes_is_refused(shakespeare_small, tmp_path):
    dm = build(LanguageModelDataModule, train_path=str(shakespeare_small), tokenization={"save_dir": str(tmp_path)})
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, state=SimpleNamespace(fn=TrainerFn.FITTING))
    with pytest.raises(ValueError, match=r"stopped 5 batches into epoch 1 of a run with 2 processes, and this run "
                                         r"has 1: .* resume on 2 devices, or from a checkpoint written at the end"):
        dm.load_state_dict({"epoch": 1, "batches_done": 5, "world_size": 2})
    dm.load_state_dict({"epoch": 2, "batches_done": 0, "world_size": 2})     # an epoch's start: nothing to skip
    dm.load_state_dict({"epoch": 1, "batches_done": 5})                      # checkpoints from before the record
    dm.load_state_dict({"epoch": 1, "batches_done": 5, "world_size": 1})
    dm.trainer.state.fn = TrainerFn.VALIDATING                               # validate only reads the weights
    dm.load_state_dict({"epoch": 1, "batches_done": 5, "world_size": 2})
