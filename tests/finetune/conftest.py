"""A small WordPiece tokenizer for the fine-tuning tests."""

import pytest

from lightning_tfm.data import SpecialTokens, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["a good film", "a bad film", "the plot is thin", "wonderful acting", "dull and long"] * 20
    return train_tokenizer(texts, "wordpiece", 60, SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>",
                                                                 mask="<mask>"))
