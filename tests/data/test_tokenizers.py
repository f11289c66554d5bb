import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lightning_tfm.data.readers import read_lines
from lightning_tfm.data.tokenizers import (
    SpecialTokens,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

SPECIALS = SpecialTokens()  # <pad> <unk> <s> </s>
TRICKY = ["  two leading spaces", "trailing space ", "A  double  gap", " x"]


@pytest.fixture(scope="module")
def sentences(multi30k_small):
    """2000 English and 2000 German Multi30k training sentences."""
    return read_lines(multi30k_small / "train.en") + read_lines(multi30k_small / "train.de")


@pytest.fixture(scope="module")
def trained(sentences):
    return {kind: train_tokenizer(sentences, kind, vocab_size=1500)
            for kind in ("bpe", "wordpiece", "unigram", "byte_bpe")}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "byte_bpe"])
def test_subword_round_trip_on_real_sentences(trained, sentences, kind):
    tokenizer = trained[kind]
    texts = sentences + TRICKY
    decoded = [tokenizer.decode(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, d in zip(texts, decoded) if t != d] == []
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(sentences))
    assert n_tokens < 0.4 * sum(map(len, sentences))  # subwords, not characters


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "byte_bpe"])
def test_specials_come_first_and_vocab_size_is_respected(trained, kind):
    tokenizer = trained[kind]
    assert [tokenizer.token_to_id(t) for t in SPECIALS.tokens()] == [0, 1, 2, 3]
    assert tokenizer.get_vocab_size() <= 1500
    if kind != "unigram":  # unigram pruning may stop a little short
        assert tokenizer.get_vocab_size() == 1500
    assert special_token_ids(tokenizer, SPECIALS, ["pad", "unk", "bos", "eos"]).all() == [0, 1, 2, 3]


def test_wordpiece_text_starting_with_hashes_is_not_a_continuation(sentences):
    tokenizer = train_tokenizer(sentences[:500] + ["#hashtag ##double ###triple"] * 5, "wordpiece", vocab_size=600)
    for text in ["##not a continuation", "a ## b", "x###y ##"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_byte_bpe_round_trips_text_it_never_saw(trained, data_dir):
    tokenizer = trained["byte_bpe"]
    wiki = read_lines(data_dir / "wikitext2_eval_only" / "wiki.valid.raw")[:200]
    texts = ["日本語 ✓ naïve — “quotes”", "\n\nnew lines\n"] + wiki
    assert [t for t in texts if tokenizer.decode(tokenizer.encode(t).ids) != t] == []
    assert tokenizer.token_to_id("<unk>") not in tokenizer.encode(texts[0]).ids


def test_unseen_characters_become_unk(trained):
    ids = trained["bpe"].encode("a ✓ b").ids
    assert 1 in ids  # <unk>


def test_char_tokenizer_is_nanogpt_vocabulary_after_the_specials(shakespeare_small):
    text = shakespeare_small.read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text.splitlines(keepends=True), "char", special_tokens=SpecialTokens(
        pad=None, bos=None, eos=None))
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}  # nanoGPT data/shakespeare_char/prepare.py
    ids = tokenizer.encode(text).ids
    assert ids == [stoi[c] + 1 for c in text]      # shifted by the one special token, <unk> = 0
    assert tokenizer.get_vocab_size() == len(chars) + 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("a\u00e9b").ids == [stoi["a"] + 1, 0, stoi["b"] + 1]


def test_save_load_round_trip(trained, tmp_path, sentences):
    path = save_tokenizer(trained["wordpiece"], tmp_path / "nested" / "tokenizer.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temporary left behind
    loaded = load_tokenizer(path)
    assert [e.ids for e in loaded.encode_batch(sentences[:50])] == [e.ids for e in
                                                                    trained["wordpiece"].encode_batch(sentences[:50])]
    assert loaded.decode(loaded.encode(TRICKY[0]).ids) == TRICKY[0]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*missing\.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match=r"bad\.json: not a tokenizer\.json the `tokenizers` library can read"):
        load_tokenizer(tmp_path / "bad.json")


def test_users_own_tokenizer_json_with_bert_style_specials(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "hello": 5, "world": 6}
    theirs = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    theirs.pre_tokenizer = pre_tokenizers.Whitespace()
    theirs.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    theirs.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    bert = SpecialTokens(pad="[PAD]", unk="[UNK]", bos=None, eos=None, cls="[CLS]", sep="[SEP]", mask="[MASK]")
    ids = special_token_ids(loaded, bert, ["pad", "cls", "sep", "mask"])
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask, ids.bos) == (0, 1, 2, 3, 4, None)
    assert loaded.encode("hello there world").ids == [5, 1, 6]
    with pytest.raises(ValueError, match=r"no token '<s>' for special_tokens\.bos; its special tokens are "
                                         r"\['\[PAD\]', '\[UNK\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        special_token_ids(loaded, SpecialTokens(pad="[PAD]", unk="[UNK]"), ["pad", "bos"])


def test_required_role_that_is_none(trained):
    with pytest.raises(ValueError, match=r"special_tokens\.cls is None, but a cls token is required here; "
                                         r"set it, e\.g\. special_tokens\.cls='<cls>'"):
        special_token_ids(trained["bpe"], SPECIALS, ["pad", "cls"])


def test_train_argument_errors(sentences):
    with pytest.raises(ValueError, match=r"kind='sentencepiece', must be one of"):
        train_tokenizer(sentences, "sentencepiece")
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small for kind='byte_bpe' with 4 special tokens; "
                                         r"use at least 260"):
        train_tokenizer(sentences, "byte_bpe", vocab_size=200)
    with pytest.raises(ValueError, match=r"kind='wordpiece' needs special_tokens\.unk"):
        train_tokenizer(sentences, "wordpiece", special_tokens=SpecialTokens(unk=None))


def test_multi30k_joint_vocabulary_trains_on_the_full_split(data_dir):
    texts = read_lines(data_dir / "multi30k" / "train.en") + read_lines(data_dir / "multi30k" / "train.de")
    tokenizer = train_tokenizer(texts, "bpe", vocab_size=8000)
    assert tokenizer.get_vocab_size() == 8000
    sample = texts[::97]
    assert [t for t in sample if tokenizer.decode(tokenizer.encode(t).ids) != t] == []
