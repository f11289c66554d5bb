import csv
import functools
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from datamodule_settings import build

from lightning_tfm.blocks import LearnedPositions
from lightning_tfm.data import MaskedLMDataModule, SpecialTokens, Truncation, train_tokenizer
from lightning_tfm.models import EncoderOnly
from lightning_tfm.models.presets import TinyEncoder
from lightning_tfm.tasks import MaskedLanguageModelModule, masked_lm_loss

IGNORE = -100


def batch_with_masks(vocab_size: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of cls (2) + ordinary tokens + sep (3) + padding (0); labels at 7 chosen positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (3, 12), generator=g)
    lengths = [12, 9, 6]
    ids[:, 0] = 2
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 3
        ids[row, n:] = 0
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    labels = torch.full_like(ids, IGNORE)
    for row, t in [(0, 1), (0, 5), (0, 10), (1, 2), (1, 3), (2, 1), (2, 4)]:
        labels[row, t] = ids[row, t]
        ids[row, t] = 4                                          # the mask token
    return {"ids": ids, "mask": mask, "labels": labels}


def test_loss_is_the_mean_over_chosen_positions_only():
    torch.manual_seed(0)
    labels = batch_with_masks()["labels"]
    logits = torch.randn(3, 12, 50)
    loss, n = masked_lm_loss(logits, labels)
    chosen = (labels != IGNORE).nonzero().tolist()
    want = sum(-logits[b, t].log_softmax(-1)[labels[b, t]].item() for b, t in chosen) / len(chosen)
    assert n == 7 and math.isclose(loss.item(), want, rel_tol=1e-6)
    changed = logits.clone()
    changed[labels == IGNORE] = torch.randn_like(changed[labels == IGNORE]) * 10   # every unchosen position
    assert masked_lm_loss(changed, labels)[0].item() == loss.item()
    changed[0, 5] += torch.randn(50)                                               # one chosen position
    assert masked_lm_loss(changed, labels)[0].item() != loss.item()


def test_module_loss_equals_the_loss_of_the_full_logits():
    """The module projects only the chosen positions to the vocabulary; that must equal scoring them all."""
    torch.manual_seed(0)
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=50).eval()
    batch = batch_with_masks()
    loss, correct, n = task._loss(batch)
    logits = task(batch["ids"], batch["mask"])                                     # (B, T, V)
    full, n_full = masked_lm_loss(logits, batch["labels"])
    chosen = batch["labels"] != IGNORE
    assert n == n_full == 7 and torch.allclose(loss, full, atol=1e-6)
    assert torch.equal(correct, logits[chosen].argmax(-1) == batch["labels"][chosen])


def test_no_chosen_token_gives_zero_loss_and_finite_gradients():
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=50)
    batch = batch_with_masks()
    batch["labels"].fill_(IGNORE)
    loss, _, n = task._loss(batch)
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_head_output_is_the_token_embedding():
    torch.manual_seed(0)
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=50)
    embedding = task.model.embedding.tokens.weight
    assert task.head.output.weight is embedding
    head_only = sum(p.numel() for name, p in task.head.named_parameters() if name != "output.weight")
    assert sum(p.numel() for p in task.parameters()) == task.model.num_parameters() + head_only   # counted once
    before = embedding.detach().clone()
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-4
    task._loss(batch_with_masks())[0].backward()
    optimizer.step()
    assert task.head.output.weight is task.model.embedding.tokens.weight and not torch.equal(embedding, before)
    fresh = MaskedLanguageModelModule(TinyEncoder, vocab_size=50)
    fresh.load_state_dict(task.state_dict())
    assert fresh.head.output.weight is fresh.model.embedding.tokens.weight
    assert torch.equal(fresh.head.output.weight, embedding)


def test_metrics_cover_the_whole_set_weighted_by_tokens():
    torch.manual_seed(0)
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=50).eval()
    batches = [batch_with_masks(seed=1), batch_with_masks(seed=2)]
    batches[1]["labels"][0] = IGNORE                                  # 4 chosen tokens in the second batch
    losses, right, count = [], 0, 0
    with torch.no_grad():
        for batch in batches:
            task.validation_step(batch, 0)
            logits = task(batch["ids"], batch["mask"])
            chosen = batch["labels"] != IGNORE
            losses += (-logits[chosen].log_softmax(-1).gather(1, batch["labels"][chosen][:, None])).flatten().tolist()
            right += int((logits[chosen].argmax(-1) == batch["labels"][chosen]).sum())
            count += int(chosen.sum())
    assert count == 7 + 4
    mean = sum(losses) / count                                        # over tokens, not the mean of batch means
    assert math.isclose(task.val_loss.compute().item(), mean, rel_tol=1e-5)
    assert math.isclose(task.val_acc.compute().item(), right / count, rel_tol=1e-6)
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    task.on_validation_epoch_end()
    assert math.isclose(logged["val_ppl"], math.exp(mean), rel_tol=1e-5) and logged["val_loss"] == pytest.approx(mean)
    assert task.val_loss.update_count == 0                           # reset for the next epoch


def test_predict_fills_each_mask_with_the_best_ordinary_token():
    specials = SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>", mask="<mask>")
    tokenizer = train_tokenizer(["a good film", "the bad film", "a film"] * 20, "bpe", 40, specials)
    ids = {t: tokenizer.token_to_id(t) for t in ["<cls>", "<sep>", "<mask>", "▁good", "▁a", "▁film"]}
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=tokenizer.get_vocab_size() + 3).eval()
    task.tokenizer, task.mask_id = tokenizer, ids["<mask>"]
    task.special_ids = [0, 1, ids["<cls>"], ids["<sep>"], ids["<mask>"]]
    with torch.no_grad():                         # make the output bias decide: specials and unknown rows first
        task.head.output.bias.fill_(0.0)
        task.head.output.bias[task.special_ids] = 1e4
        task.head.output.bias[-3:] = 1e4                              # rows the tokenizer has no token for
        task.head.output.bias[ids["▁good"]] = 1e3
    row = [ids["<cls>"], ids["▁a"], ids["<mask>"], ids["▁film"], ids["<sep>"]]
    batch = {"ids": torch.tensor([row, row[:3] + [ids["<sep>"], 0]]),
             "mask": torch.tensor([[True] * 5, [True] * 4 + [False]])}
    assert task.predict_step(batch, 0) == ["a good film", "a good"]


# the shared data beside the checkout, as in tests/data/conftest.py
DATA = Path(os.environ.get("LIGHTNING_TFM_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def sst2_sentences(split: str, n: int) -> list[str]:
    """The first n sentences of an SST-2 split, read as the shared data README does."""
    with open(DATA / "sst2" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return [s.strip() for s, _ in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]]


def test_training_lowers_masked_loss_on_held_out_text_below_the_unigram_baseline(tmp_path):
    """300 steps of a one-layer char-level encoder on 3000 SST-2 training sentences (a plain text file, one a
    line), scored on the 872 dev sentences.

    Untrained, the tied head predicts about uniformly (loss ~ ln V). Trained, the loss falls below the
    cross-entropy of the training unigram distribution, which is the best any context-free guess can do:
    the model uses the context around each mask.
    """
    (tmp_path / "train.txt").write_text("\n".join(sst2_sentences("train", 3000)) + "\n", encoding="utf-8")
    data = build(MaskedLMDataModule, train_path=str(tmp_path / "train.txt"), val_path=str(DATA / "sst2" / "dev.tsv"),
                 tokenization={"save_dir": str(tmp_path / "tok"), "kind": "char"}, truncation={"max_len": 32},
                 batching={"batch_size": 64})
    with pytest.warns(UserWarning, match=r"data\.(train|val): truncated \d+ of \d+ texts to "
                                                 r"data\.truncation\.max_len=32"):
        data.setup("fit")
    V = data.vocab_size
    counts = Counter(t for x in data.dataset("train").ids for t in x[1:-1])
    total = sum(counts.values())
    specials = set(data.special_ids.all())
    dev = [t for x in data.dataset("val").ids for t in x[1:-1] if t not in specials]   # what masking can choose
    unigram = -sum(math.log((counts[t] + 1) / (total + V)) for t in dev) / len(dev)   # add-one smoothed
    torch.manual_seed(0)
    encoder = functools.partial(EncoderOnly, d_model=32, n_layers=1, n_heads=4, d_ff=128, dropout=0.0, n_segments=0,
                                positions=functools.partial(LearnedPositions, max_len=32))
    task = MaskedLanguageModelModule(encoder, V, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=100, use_distributed_sampler=False, default_root_dir=tmp_path)
    before = trainer.validate(task, datamodule=data, verbose=False)[0]
    trainer.fit(task, datamodule=data)
    after = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert abs(before["val_loss"] - math.log(V)) < 0.1 and before["val_acc"] < 0.05
    assert after["val_loss"] < unigram - 0.1 < math.log(V) - 1.0
    assert after["val_acc"] > 0.15 and after["val_ppl"] == pytest.approx(math.exp(after["val_loss"]), rel=1e-4)


def test_data_must_fit_the_model():
    task = MaskedLanguageModelModule(TinyEncoder, vocab_size=50)                  # positions up to 128
    datamodule = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab_size=lambda: 50), truncation=Truncation(256))
    with pytest.raises(ValueError, match=r"data\.truncation\.max_len=256 is longer than the model's positions "
                                         r"\(max_len=128\)"):
        task.check_data(datamodule)
    with pytest.raises(ValueError, match="does not know the mask token's id"):
        task.predict_step(batch_with_masks(), 0)
