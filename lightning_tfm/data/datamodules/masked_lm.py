"""Masked-LM pretraining data (BERT, Devlin et al. 2019, §3.1): unlabeled texts, one example per line of a
plain text file or per row of one column of a TSV/CSV/JSONL table, each encoded as `cls tokens sep`, read raw or
from prepared rows (`data/prepare.py`), and BERT's 15% / 80-10-10 corruption (`data.masking.mask_tokens`) applied
when a batch is collated (the datasets, the sampler and the collate are in `masked_lm_data.py`).

Masks are drawn from a generator seeded with (seed, split, epoch, batch number): training sees new masks
every epoch, validation and test see the same masks every time, so their loss is comparable across epochs.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader

from lightning_tfm.data.datamodules.base import TextDataModule
from lightning_tfm.data.datamodules.masked_lm_data import (
    MaskedLMDataset,
    MaskSeedBatchSampler,
    PreparedMaskedLMDataset,
    collate_fill_mask,
    collate_masked_lm,
    encode_with_masks,
)
from lightning_tfm.data.datamodules.splits import carve_validation, check_file
from lightning_tfm.data.prepare import Example, open_split
from lightning_tfm.data.readers import Row, is_table, read_lines, read_table
from lightning_tfm.data.settings import Batching, Tokenization, Truncation
from lightning_tfm.data.streams import iter_lines
from lightning_tfm.data.tokenize_workers import Framing, frame_fields
from lightning_tfm.data.tokenizers import SpecialTokens

#: BERT's roles, as ClassificationDataModule's: a pretrained tokenizer serves fine-tuning as is
_SPECIAL_TOKENS = SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>", mask="<mask>")
_STREAMS = {"train": 0, "val": 1, "test": 2}  # one mask stream per split, so no two splits share masks


class MaskedLMDataModule(TextDataModule):
    """Unlabeled texts for masked-LM pretraining of an encoder, SST-2's training sentences by default.

    A split is a plain text file with one example per line (stripped; blank lines skipped), or a `.tsv`/`.csv`/
    `.jsonl` table of which `text_column` is read (empty cells skipped); either may be compressed (`.gz`, `.xz`,
    `.zst`). Each example is `cls + tokens + sep`, cut to `truncation.max_len` with a warning (by default). The
    tokenizer is trained on the training split only. Masking happens in the collate function (see the module
    docstring); special tokens and padding are never chosen.

    Batches: "ids" (B, T) int64, the corrupted inputs; "mask" (B, T) bool (True = real token); "labels" (B, T)
    int64, the original id at chosen positions and -100 elsewhere; "index" (B,) int64, each example's position
    in its split. T is a multiple of 8. Predict batches (lines to fill in, each with at least one mask token,
    e.g. "a <mask> film") hold "ids" and "mask" with the mask tokens in place, "index", and "texts".

    Args:
        train_path: training texts: a plain text file or a table.
        val_path: validation texts, or None (see val_fraction).
        test_path: test texts, or None.
        predict_path: texts to fill in, one per line (or table row), each with the mask token; None for none.
        text_column: the column read from tables; ignored for plain text files.
        val_fraction: when val_path is None, hold out this random fraction of the training examples (drawn
            with seed) as validation; the tokenizer sees only the rest. Ignored when val_path is set.
        mask_prob: chance that an ordinary token is chosen (BERT: 0.15).
        replace_prob: chance that a chosen token becomes the mask token (BERT: 0.8).
        random_prob: chance that a chosen token becomes a random ordinary token (BERT: 0.1); the rest are kept.
        never_mask_most_frequent: the training split's k most frequent tokens are never chosen nor drawn as
            random replacements, like word2vec's subsampling of frequent words: the loss then teaches content
            words and topics instead of "the" and commas. 0 (BERT) treats every ordinary token alike.
        tokenization: the tokenizer (`settings.Tokenization`).
        special_tokens: pad, cls, sep and mask are required; the default matches ClassificationDataModule's, so
            a pretrained tokenizer serves fine-tuning as is.
        batching: batch sizes (`settings.Batching`).
        truncation: most tokens per example, cls and sep included, and what becomes of a longer one
            (`settings.Truncation`; a cut keeps the sep).
        seed: seed of the batch order, the masks and the val_fraction split.
        prepared_dir: read the train, val and test ids from rows prepared in this folder (`lightning_tfm prepare
            --config CONFIG`, or the first `fit`), memory-mapped, so a corpus larger than memory trains with flat
            memory; a plain text file is streamed while it is prepared. A change to the raw files, the tokenizer or
            the settings (text_column, val_fraction and seed, truncation) is refused until the data is prepared
            again. A predict_path file is always read raw. None reads and tokenizes the raw files.
    """

    tokenizer_home = "runs/tokenizers/masked_lm"
    required_specials = ("pad", "cls", "sep", "mask")
    row_names = {"text": "text"}

    def __init__(self, train_path: str = "../shared/data/sst2/train.tsv",
                 val_path: str | None = "../shared/data/sst2/dev.tsv", test_path: str | None = None,
                 predict_path: str | None = None, text_column: str = "sentence", val_fraction: float = 0.0,
                 mask_prob: float = 0.15, replace_prob: float = 0.8, random_prob: float = 0.1,
                 never_mask_most_frequent: int = 0,
                 tokenization: Tokenization = Tokenization(), special_tokens: SpecialTokens = _SPECIAL_TOKENS,
                 batching: Batching = Batching(), truncation: Truncation = Truncation(longer="cut"),
                 seed: int = 0, prepared_dir: str | None = None) -> None:
        super().__init__(tokenization, special_tokens, batching, seed)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}, must be in [0, 1)")
        if truncation.max_len < 3:
            raise ValueError(f"data.truncation.max_len={truncation.max_len}, must be >= 3 (cls, one token, sep)")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob={mask_prob}, must be in (0, 1]")
        if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1.0:
            raise ValueError(f"data.replace_prob={replace_prob} and data.random_prob={random_prob} must be >= 0 "
                             "with a sum <= 1")
        if never_mask_most_frequent < 0:
            raise ValueError(f"data.never_mask_most_frequent={never_mask_most_frequent}, must be >= 0")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.predict_path, self.text_column, self.val_fraction = predict_path, text_column, val_fraction
        self.truncation = truncation
        self.mask_prob, self.replace_prob, self.random_prob = mask_prob, replace_prob, random_prob
        self.never_mask_most_frequent = never_mask_most_frequent
        self.prepared_dir = prepared_dir
        self._rows: dict[str, list[Row]] = {}

    @property
    def mask_id(self) -> int:
        """Id of the mask token."""
        return self.special_ids.mask

    def never_masked(self) -> list[int]:
        """Ids that are never chosen: the special tokens and the `never_mask_most_frequent` most frequent tokens
        of the training split (ties broken by id, so every process and every run picks the same ones)."""
        specials = self.special_ids.all()
        if not self.never_mask_most_frequent:
            return specials
        counts = self.dataset("train").token_counts(self.vocab_size)
        counts[specials] = 0
        ranked = np.lexsort((np.arange(len(counts)), -counts))          # by count, then by id
        ranked = ranked[counts[ranked] > 0]
        return specials + ranked[: self.never_mask_most_frequent].tolist()

    def training_files(self) -> list[str]:
        return [self.train_path]

    def training_texts(self) -> Iterator[str]:
        for row in self._split_rows("train"):
            yield row[self.text_column]

    def tokenizer_source(self) -> dict[str, Any]:
        carve = self.val_fraction if self.val_path is None else 0.0
        return {**super().tokenizer_source(), "column": self.text_column if is_table(self.train_path) else None,
                "val_fraction": carve, "seed": self.seed if carve else None}

    def build_dataset(self, split: str) -> MaskedLMDataset | PreparedMaskedLMDataset:
        if not self.has_split(split):
            raise ValueError(f"data.{split}_path is not set")
        if self.prepared_dir is not None and split != "predict":
            return PreparedMaskedLMDataset(open_split(self, split))
        rows = self._split_rows(split)
        texts = [row[self.text_column] for row in rows]
        if split == "predict":
            return self._fill_mask_dataset(rows, texts)
        framed = frame_fields([self.encode(texts)], [self.framing(split, "text")], "int64")[0]
        if framed.too_long is not None:
            raise self.too_long(split, "text", rows[framed.too_long[0]].where, framed.too_long[1])
        if framed.cut:
            self.truncated(split, "text", len(framed.cut), len(rows), rows[framed.cut[0]].where)
        return MaskedLMDataset(framed.rows(), texts)

    def predict_dataloader(self) -> DataLoader:
        """Batches in input order (no length sorting), so predictions come out in the order of the file."""
        dataset = self.dataset("predict")
        collate = functools.partial(collate_fill_mask, pad_id=self.pad_id)
        return self.bucketed_loader(dataset, dataset.lengths(), collate, shuffle=False, pool_size=1)

    # --- prepared rows (data/prepare.py's Preparable): one "text" field, `cls tokens sep` ------------------

    def prepared_fields(self) -> tuple[str, ...]:
        return ("text",)

    def prepared_values(self) -> dict[str, list[str] | None]:
        return {}

    def prepared_settings(self) -> dict[str, Any]:
        carve = self.val_fraction if self.val_path is None else 0.0
        return {"text_column": self.text_column, "val_fraction": carve, "seed": self.seed if carve else None,
                "max_len": self.truncation.max_len, "truncate": self.truncation.cut,
                "special_tokens": self.special_tokens.tokens()}

    def raw_examples(self, split: str) -> Iterator[Example]:
        """The split's texts as the raw path reads them; a plain text file (not carved by val_fraction) is
        streamed line by line, so preparing it holds no more than a chunk."""
        carved = split in ("train", "val") and self.val_path is None and self.val_fraction > 0
        path = getattr(self, f"{split}_path")
        if carved or split in self._rows or is_table(path):
            for row in self._split_rows(split):
                yield Example((row[self.text_column],), row.line)
            return
        kept = 0
        for line, text in enumerate(iter_lines(check_file(f"{split}_path", path)), 1):
            if text.strip():
                kept += 1
                yield Example((text.strip(),), line)
        if not kept:
            raise ValueError(f"data.{split}_path={path} holds no text")

    def keeps_text(self, split: str) -> bool:
        return False          # the masks are drawn on ids; only predict shows texts, and it is read raw

    def framing(self, split: str, field: str) -> Framing:
        """`cls tokens sep`, at most max_len: cut with a warning (masked-LM pretraining loses only the tail) or
        refused (`truncation`)."""
        return Framing((self.special_ids.cls,), (self.special_ids.sep,), self.truncation.max_len,
                       self.truncation.cut)

    # --- internals ---------------------------------------------------------------------------------------

    def _read(self, key: str, path: str) -> list[Row]:
        """Non-empty texts of a plain text file (one a line) or of a table's text column, as rows."""
        path = str(check_file(f"{key}_path", path))   # or its .gz/.xz/.zst
        if is_table(path):
            rows = read_table(path, [self.text_column])
        else:
            rows = [Row(path, n, {self.text_column: line.strip()}) for n, line in enumerate(read_lines(path), 1)]
        if key == "predict":
            return rows
        rows = [row for row in rows if row[self.text_column]]
        if not rows:
            raise ValueError(f"data.{key}_path={path} holds no text")
        return rows

    def _split_rows(self, split: str) -> list[Row]:
        """The split's rows; a val_fraction split is carved from the training file once (seeded)."""
        if split not in self._rows:
            if split in ("train", "val") and self.val_path is None and self.val_fraction > 0:
                rows = self._read("train", self.train_path)
                self._rows["train"], self._rows["val"] = carve_validation(rows, self.val_fraction, self.seed)
            else:
                self._rows[split] = self._read(split, getattr(self, f"{split}_path"))
        return self._rows[split]

    def _fill_mask_dataset(self, rows: list[Row], texts: list[str]) -> MaskedLMDataset:
        """Texts to fill in: each needs a mask token and must fit in max_len (nothing is cut silently)."""
        specials, mask_token = self.special_ids, self.special_tokens.mask
        ids = []
        for row, text in zip(rows, texts):
            tokens = encode_with_masks(self.tokenizer, text, specials.mask)
            if specials.mask not in tokens:
                raise ValueError(f"{row.where}: no {mask_token} in {text!r}; mark each token to fill in with "
                                 f"{mask_token}")
            if len(tokens) + 2 > self.truncation.max_len:
                raise ValueError(f"{row.where}: {len(tokens) + 2} tokens with cls and sep, more than "
                                 f"data.truncation.max_len={self.truncation.max_len}; shorten the text")
            ids.append([specials.cls, *tokens, specials.sep])
        return MaskedLMDataset(ids, texts)

    def loader(self, split: str, shuffle: bool, pool_size: int = 16384) -> DataLoader:
        dataset = self.dataset(split)
        specials = self.special_ids
        collate = functools.partial(collate_masked_lm, pad_id=specials.pad, mask_id=specials.mask,
                                    special_ids=self.never_masked(), vocab_size=self.vocab_size,
                                    mask_prob=self.mask_prob, replace_prob=self.replace_prob,
                                    random_prob=self.random_prob)
        loader = self.bucketed_loader(dataset, dataset.lengths(), collate, shuffle, pool_size)
        # the same bucketed batches, each index paired with its batch's mask seed (see MaskSeedBatchSampler)
        batches = MaskSeedBatchSampler(loader.batch_sampler, self.seed, _STREAMS[split], per_epoch=shuffle)
        return self.data_loader(dataset, batch_sampler=batches, collate_fn=collate)
