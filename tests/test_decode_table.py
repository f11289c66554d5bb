"""scripts/decode_table.py on a tiny random MarianMTModel and 20 real test sentences: every row is there, refused
rows say why, and ours decodes exactly what transformers decodes on the same weights; CTranslate2's conversion
scores targets as transformers does. Nothing here is timed; the speeds are only checked to exist."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import decode_systems  # noqa: E402
import decode_table  # noqa: E402
from commands import DATA as SHARED_DATA  # noqa: E402
from race_marian import TINY, build_marian, specials  # noqa: E402

from lightning_tfm.data.tokenizers import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from lightning_tfm.models.hf_convert import from_huggingface  # noqa: E402

DATA = SHARED_DATA / "multi30k"


def _head(src: Path, dst: Path, n: int) -> list[str]:
    with open(src, encoding="utf-8") as f:
        lines = list(itertools.islice(f, n))
    dst.write_text("".join(lines), encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BPE tokenizer trained on 300 training pairs, 20 test pairs, and a seeded TINY Marian folder."""
    root = tmp_path_factory.mktemp("decode_table")
    texts = []
    for side in ("en", "de"):
        texts += _head(DATA / f"train.{side}", root / f"train.{side}", 300)
        _head(DATA / f"test2016.{side}", root / f"test.{side}", 20)
    tokenizer = train_tokenizer(texts, "bpe", 400)
    tokenizer_path = save_tokenizer(tokenizer, root / "tokenizer.json")
    torch.manual_seed(0)
    build_marian(TINY, tokenizer.get_vocab_size(), *specials(tokenizer)).eval().save_pretrained(root / "marian")
    return {"root": root, "tokenizer": tokenizer_path, "marian": root / "marian"}


def test_table_has_every_row_and_ours_greedy_equals_transformers(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "out"
    record = decode_table.main(["--marian", str(tiny["marian"]), "--tokenizer", str(tiny["tokenizer"]),
                                "--test-prefix", str(tiny["root"] / "test"), "--greedy-sentences", "5",
                                "--threads", "1", "--out", str(out)])
    rows = record["rows"]
    assert [(r["system"], r["precision"]) for r in rows] == list(decode_table.ROWS)
    assert json.loads((out / "decode_table.json").read_text()) == json.loads(json.dumps(record))
    for row in rows:
        if "refused" in row:
            assert row["refused"].strip() and "beam4" not in row
            continue
        assert row["beam4"]["sentences"] == 20 and row["greedy_b1"]["sentences"] == 5
        assert row["beam4"]["sent_per_s"] > 0 and row["greedy_b1"]["tok_per_s"] > 0
        assert 0 <= row["beam4"]["bleu"] <= 100 and row["beam4"]["ratio"] > 0
    peer, ours = rows[0], rows[1]
    assert "refused" not in peer and "refused" not in ours          # fp32 runs everywhere
    assert peer["beam4"]["ratio"] == 1.0
    # the conversion is exact and greedy search has no length penalty, so the outputs are the same
    assert ours["greedy_b1"]["same_as_transformers"] == "5/5"
    assert ours["greedy_b1"]["new_tokens"] == peer["greedy_b1"]["new_tokens"]
    assert record["meta"]["threads"] == 1 and len(record["meta"]["load_after"]) == 3
    table = (out / "decode_table.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and all(f"| {s} | {p} |" in line for (s, p), line in
                                               zip(decode_table.ROWS, table[2:]))


def test_ctranslate2_conversion_scores_targets_as_transformers(tiny: dict[str, Path]) -> None:
    """Per-token log-probabilities of forced targets: a decoder started from the wrong input (the stock
    loader's zero embedding) or a dropped vocabulary row would change them."""
    pytest.importorskip("ctranslate2")
    tokenizer = load_tokenizer(tiny["tokenizer"])
    pad, bos, eos = specials(tokenizer)
    model = decode_systems.ct2_model(tiny["marian"], tokenizer, tiny["root"] / "ct2", "float32", threads=1)
    src = [e.ids + [eos] for e in tokenizer.encode_batch(["A dog runs.", "Two men sit on a bench."])]
    tgt = [e.ids + [eos] for e in tokenizer.encode_batch(["Ein Hund rennt.", "Zwei Männer sitzen."])]
    scored = model.score_batch([[tokenizer.id_to_token(i) for i in s] for s in src],
                               [[tokenizer.id_to_token(i) for i in t[:-1]] for t in tgt])
    peer = transformers.MarianMTModel.from_pretrained(tiny["marian"]).eval()
    for s, t, result in zip(src, tgt, scored):
        with torch.no_grad():
            logits = peer(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([[bos, *t[:-1]]])).logits
        want = logits.log_softmax(-1)[0].gather(-1, torch.tensor(t)[:, None])[:, 0]   # (T,) eos included
        torch.testing.assert_close(torch.tensor(result.log_probs), want, atol=1e-4, rtol=0)


def test_train_folder_saves_trained_weights_we_can_convert(tiny: dict[str, Path]) -> None:
    folder = decode_systems.train_folder(tiny["root"] / "train", tiny["tokenizer"], tiny["root"] / "trained",
                                         minutes=0.01, size=TINY)
    saved = transformers.MarianMTModel.from_pretrained(folder).eval()
    torch.manual_seed(0)                # train_marian's default seed: its initial weights (its step 0 has lr 0)
    initial = build_marian(TINY, saved.config.vocab_size, *specials(load_tokenizer(tiny["tokenizer"])))
    key = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(saved.state_dict()[key], initial.state_dict()[key])
    assert torch.equal(from_huggingface(folder).state_dict()["encoder.layers.0.feedforward.fc1.weight"],
                       saved.state_dict()[key])


def test_export_marian_gives_back_the_weights_ours_were_converted_from(tiny: dict[str, Path]) -> None:
    import export_marian

    original = transformers.MarianMTModel.from_pretrained(tiny["marian"]).state_dict()
    exported = export_marian.marian_state(from_huggingface(tiny["marian"]))
    assert len(exported) > 20
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
