"""Training, saving and loading Hugging Face `tokenizers`, and finding their special token ids.

Five kinds, all trained from an iterator of training texts:

- "bpe": byte-pair encoding over characters (Sennrich et al. 2016), the paper's shared source/target
  vocabulary (Vaswani et al. 2017, §5.1).
- "wordpiece": WordPiece (Schuster & Nakajima 2012; BERT), continuation pieces prefixed with "##".
- "unigram": the unigram language model of SentencePiece (Kudo 2018).
- "byte_bpe": BPE over the 256 bytes (GPT-2, Radford et al. 2019): no unknown tokens, any text round-trips.
- "char": one token per distinct character of the training text (char-rnn, nanoGPT's shakespeare_char).

The three subword kinds over characters mark word starts SentencePiece-style: a normalizer writes spaces
as "▁" and prepends one "▁", and the Metaspace decoder undoes it, so `decode(encode(s)) == s` for any `s`
whose characters were seen in training (leading, repeated and trailing spaces included). Deviation: the
original BERT WordPiece splits punctuation and lowercases, which cannot be decoded back to the text.
No normalizer changes characters (no NFKC, no lowercasing), again so decoding gives the text back.
No post-processor adds special tokens: datamodules add bos/eos/cls/sep themselves, the same way for a
trained tokenizer and for a user's tokenizer.json (encode with `add_special_tokens=False`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TokenizerKind = Literal["bpe", "wordpiece", "unigram", "byte_bpe", "char"]
_SPACE = "▁"  # U+2581, SentencePiece's word-start mark
_EXAMPLES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "cls": "<cls>", "sep": "<sep>",
             "mask": "<mask>"}


@dataclass(frozen=True)
class SpecialTokens:
    """The strings that play each special role; None means the role is not used.

    A trained tokenizer gets them as its first ids, in this order (pad, unk, bos, eos, cls, sep, mask),
    skipping None and repeats. For a loaded tokenizer.json they name tokens it must already have, e.g.
    `pad: "[PAD]"` for a BERT vocabulary.

    Args:
        pad: pads batches to a common length; never a training target.
        unk: replaces characters unseen in training (not needed by "byte_bpe").
        bos: begins a target sequence (decoder input).
        eos: ends a sequence; what a decoder learns to emit to stop.
        cls: first token of a classification input; its final state feeds the classifier (BERT).
        sep: ends each segment of a classification input (BERT).
        mask: replaces tokens chosen for masked-LM training (BERT).
    """

    pad: str | None = "<pad>"
    unk: str | None = "<unk>"
    bos: str | None = "<s>"
    eos: str | None = "</s>"
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None

    def tokens(self) -> list[str]:
        """The distinct special strings in role order."""
        out: list[str] = []
        for f in fields(self):
            token = getattr(self, f.name)
            if token is not None and token not in out:
                out.append(token)
        return out


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special roles in one tokenizer; None where the role is unused."""

    pad: int | None = None
    unk: int | None = None
    bos: int | None = None
    eos: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None

    def all(self) -> list[int]:
        """Every special id present, without repeats (e.g. to keep them out of masked-LM masking)."""
        return sorted({getattr(self, f.name) for f in fields(self)} - {None})


def train_tokenizer(texts: Iterable[str], kind: TokenizerKind = "bpe", vocab_size: int = 8000,
                    special_tokens: SpecialTokens = SpecialTokens()) -> Tokenizer:
    """Train a tokenizer of the given kind on `texts` (iterated once).

    Args:
        texts: training texts, e.g. the source and target sides of the training split.
        kind: "bpe", "wordpiece", "unigram", "byte_bpe" or "char" (see the module docstring).
        vocab_size: final size including special tokens. Ignored by "char", whose vocabulary is the special
            tokens plus every distinct character of `texts`.
        special_tokens: the special strings, which get ids 0, 1, ... in role order.

    Raises:
        ValueError: unknown kind, vocab_size too small for the specials (and the 256 bytes of "byte_bpe"),
            or no unk token for a kind that needs one.
    """
    specials = special_tokens.tokens()
    if kind not in ("bpe", "wordpiece", "unigram", "byte_bpe", "char"):
        raise ValueError(f"train_tokenizer: kind={kind!r}, must be one of bpe, wordpiece, unigram, byte_bpe, char")
    if kind != "byte_bpe" and special_tokens.unk is None:
        raise ValueError(f"train_tokenizer: kind={kind!r} needs special_tokens.unk for characters unseen in "
                         "training; set it (e.g. '<unk>') or use kind='byte_bpe'")
    floor = len(specials) + (256 if kind == "byte_bpe" else 1)
    if kind != "char" and vocab_size < floor:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too small for kind={kind!r} with "
                         f"{len(specials)} special tokens; use at least {floor}")
    if kind == "char":
        return _char_tokenizer(texts, specials, special_tokens.unk)
    if kind == "byte_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=special_tokens.unk))
        tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=special_tokens.unk, continuing_subword_prefix="##"))
        # Every word piece starts with "▁", so "##" at a token's start can only be the continuation mark.
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace(Regex("^##"), ""),
            decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)])
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                            continuing_subword_prefix="##")
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                          unk_token=special_tokens.unk)
    if kind != "byte_bpe":
        # Spaces -> "▁" plus one leading "▁" (Llama's normalizer), then split before each "▁"; the decoder
        # turns "▁" back into spaces and drops the first, so leading and repeated spaces survive.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _char_tokenizer(texts: Iterable[str], specials: list[str], unk: str | None) -> Tokenizer:
    """BPE with no merges over the sorted distinct characters: one token per character, fused on decode."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(chars):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tokenizer.add_special_tokens(specials)
    tokenizer.decoder = decoders.Fuse()  # without a decoder, decode() would join the characters with spaces
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write `tokenizer.json` atomically (a temporary file renamed into place), creating parent directories.

    Atomic so that several processes saving the same tokenizer never leave a half-written file to a reader.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` written by `save_tokenizer` or by any `tokenizers`/transformers tool.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a tokenizer.json the installed `tokenizers` can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for bad JSON or an unknown schema
        raise ValueError(f"{path}: not a tokenizer.json the `tokenizers` library can read ({e})") from e


def special_token_ids(tokenizer: Tokenizer, special_tokens: SpecialTokens,
                      required: Iterable[str] = ()) -> SpecialIds:
    """Look up the id of each special role.

    Args:
        tokenizer: a trained or loaded tokenizer.
        special_tokens: the strings for each role.
        required: roles the caller needs, e.g. ("pad", "bos", "eos") for translation.

    Raises:
        ValueError: a required role is None, or its string is not in the tokenizer's vocabulary
            (the message lists the tokenizer's special tokens).
    """
    ids = {}
    for f in fields(special_tokens):
        token = getattr(special_tokens, f.name)
        ids[f.name] = None if token is None else tokenizer.token_to_id(token)
    for role in required:
        if role not in ids:
            raise ValueError(f"unknown special role {role!r}; roles are {list(ids)}")
        token = getattr(special_tokens, role)
        if token is None:
            raise ValueError(f"special_tokens.{role} is None, but a {role} token is required here; "
                             f"set it, e.g. special_tokens.{role}={_EXAMPLES[role]!r}")
        if ids[role] is None:
            known = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
            raise ValueError(f"the tokenizer has no token {token!r} for special_tokens.{role}; "
                             f"its special tokens are {known}")
    return SpecialIds(**ids)
