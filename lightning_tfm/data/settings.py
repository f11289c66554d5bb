"""The grouped settings every text DataModule takes: how its tokenizer is made (`Tokenization`), how examples
are grouped into batches (`Batching`) and how long one may be (`Truncation`).

Each is one key in YAML with a few fields under it, and one of them can be overridden alone on the command
line (`--data.batching.max_tokens 4096`) while the rest keep the DataModule's defaults. In Python a setting
is one object and replaces the DataModule's default whole: `Batching(max_tokens=4096)` also means the
dataclass's `batch_size=32`; start from the DataModule's default with `dataclasses.replace` to change one field.


    data:
      class_path: lightning_tfm.data.TranslationDataModule
      init_args:
        tokenization: {kind: bpe, vocab_size: 8000, save_dir: runs/multi30k/tokenizer}
        batching: {max_tokens: 2048}
        truncation: {max_len: 256, longer: error}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_tfm.data.tokenizers import TokenizerKind


@dataclass(frozen=True)
class Tokenization:
    """The tokenizer a DataModule trains on its training split, or loads.

    Args:
        path: an existing tokenizer.json used as it is; None trains one on the training split.
        save_dir: where a trained tokenizer is saved, and reused while its training data and settings are
            unchanged; None for `runs/tokenizers/<the task>`.
        kind: "bpe", "wordpiece", "unigram", "byte_bpe" or "char".
        vocab_size: vocabulary size to train, special tokens included (ignored by "char").
    """

    path: str | None = None
    save_dir: str | None = None
    kind: TokenizerKind = "bpe"
    vocab_size: int = 8000

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"data.tokenization.vocab_size={self.vocab_size}, must be >= 1")


@dataclass(frozen=True)
class Batching:
    """How a DataModule groups examples into batches.

    Args:
        max_tokens: padded tokens per batch, counted on the longest example (for a pair, its longer side), with
            examples of similar length batched together; None for fixed-size batches.
        batch_size: most examples per batch (every batch but the last has exactly this many when max_tokens is
            None); None for no cap (then max_tokens is required).
        num_workers: DataLoader worker processes (0 loads in the training process).
    """

    max_tokens: int | None = None
    batch_size: int | None = 32
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is None and self.batch_size is None:
            raise ValueError("data.batching.max_tokens and data.batching.batch_size are both None; set one (or both)")
        for key, value in (("max_tokens", self.max_tokens), ("batch_size", self.batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"data.batching.{key}={value}, must be >= 1 or None")
        if self.num_workers < 0:
            raise ValueError(f"data.batching.num_workers={self.num_workers}, must be >= 0")


@dataclass(frozen=True)
class Truncation:
    """How long an example may be, and what becomes of a longer one.

    Args:
        max_len: most tokens in an example (each side of a translation pair), its special tokens included.
        longer: "error" stops at the first longer example, naming its file and line; "cut" shortens each to
            max_len (keeping its closing special token; of a text pair, the longer text loses tokens first)
            with one warning per split counting them and naming the first.
    """

    max_len: int = 128
    longer: Literal["error", "cut"] = "error"

    @property
    def cut(self) -> bool:
        """Whether longer examples are shortened rather than refused."""
        return self.longer == "cut"
