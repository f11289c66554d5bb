"""Translation data: line-aligned source/target files (or TSV/JSONL pairs), one joint tokenizer, and
token-budget batches of (src, tgt) with the raw strings kept for BLEU and for prediction.

A shared source/target BPE vocabulary trained on both sides of the training split and batches "containing
approximately 25000 source tokens and 25000 target tokens" follow Vaswani et al. 2017, §5.1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tfm.data.datamodules.base import TextDataModule
from lightning_tfm.data.datamodules.splits import check_file
from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.prepare import Example, PreparedSplit, open_split
from lightning_tfm.data.readers import BlankLines, is_table, read_lines, read_pairs, read_table
from lightning_tfm.data.settings import Batching, Tokenization, Truncation
from lightning_tfm.data.shards import RowLengths
from lightning_tfm.data.streams import iter_pairs
from lightning_tfm.data.tokenize_workers import Framing, frame
from lightning_tfm.data.tokenizers import SpecialTokens


@dataclass
class _Texts:
    """One split's raw text and where each pair came from (for `path:line` errors)."""

    sources: list[str]
    targets: list[str] | None
    src_file: str
    tgt_file: str
    lines: list[int]


class TranslationDataset(Dataset):
    """Tokenized pairs; item i is {"index", "src", "tgt" (None without targets), "source", "ref"}."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]] | None, texts: _Texts) -> None:
        self.src, self.tgt, self.texts = src, tgt, texts

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "src": self.src[i], "tgt": None if self.tgt is None else self.tgt[i],
                "source": self.texts.sources[i],
                "ref": None if self.texts.targets is None else self.texts.targets[i]}

    def lengths(self) -> np.ndarray:
        """Each pair's longer side, in tokens (what a batch's budget counts)."""
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt or self.src)], dtype=np.int64)


class PreparedTranslationDataset(Dataset):
    """Pairs read from prepared rows (`lightning_tfm prepare`): the items of `TranslationDataset`, with the raw
    strings where the split kept them (val and test) and empty strings for the training split."""

    def __init__(self, split: PreparedSplit) -> None:
        self.src, self.tgt, self.texts = split.tokens["src"], split.tokens["tgt"], split.texts

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        source = self.texts["src"].text(i) if self.texts else ""
        ref = self.texts["tgt"].text(i) if self.texts else ""
        return {"index": i, "src": self.src[i].astype(np.int64), "tgt": self.tgt[i].astype(np.int64),
                "source": source, "ref": ref}

    def lengths(self) -> RowLengths:
        """Each pair's longer side, read from the offsets indexes a pool at a time (never one array)."""
        return RowLengths(self.src, self.tgt, combine=np.maximum)


def collate_translation(items: list[dict[str, Any]], pad_id: int, pad_to_multiple: int = 8) -> dict[str, Any]:
    """Batch of pairs: src/src_mask (B, S), tgt/tgt_mask (B, T) (bos ... eos), index (B,), sources, refs."""
    src, src_mask = pad_batch([it["src"] for it in items], pad_id, pad_to_multiple)
    batch: dict[str, Any] = {"src": src, "src_mask": src_mask,
                             "index": torch.tensor([it["index"] for it in items]),
                             "sources": [it["source"] for it in items]}
    if items[0]["tgt"] is not None:
        batch["tgt"], batch["tgt_mask"] = pad_batch([it["tgt"] for it in items], pad_id, pad_to_multiple)
        batch["refs"] = [it["ref"] for it in items]
    return batch


class TranslationDataModule(TextDataModule):
    """Source/target pairs for sequence-to-sequence training, Multi30k En→De by default.

    A split is either a path prefix P, read as the line-aligned files `P.<src_lang>` and `P.<tgt_lang>`, or a
    `.tsv`/`.csv`/`.jsonl` file whose columns are named `src_lang` and `tgt_lang`. Every file may be compressed
    (`.gz`, `.xz`, `.zst`), and `P.en` finds `P.en.gz` when there is no `P.en`. Flipping the direction is one
    override (`--data.src_lang de --data.tgt_lang en`).

    One tokenizer is trained on the source and target sides of the training split. Each source is its
    tokens + eos (fairseq's convention; the eos tells the encoder where the sentence ends), each target is
    bos + tokens + eos, so a decoder reads `tgt[:, :-1]` and predicts `tgt[:, 1:]`.

    Batches: "src" (B, S) int64 and "src_mask" (B, S) bool (True = real token); "tgt" (B, T) int64 and
    "tgt_mask" (B, T) bool; "index" (B,) int64, each example's position in its split; "sources" and "refs",
    the raw source and target strings (refs feed sacreBLEU). S and T are multiples of 8. Predict batches
    have no "tgt"/"tgt_mask"/"refs" when they come from a source-only `predict_path` file.

    Args:
        train_path: training split: a path prefix or a table file (see above).
        val_path: validation split, or None for no validation.
        test_path: test split, or None.
        predict_path: a plain text file of source sentences, one a line, to translate; None predicts the test split.
        src_lang: source language code: the suffix of the source files, or the source column.
        tgt_lang: target language code.
        blank_lines: what a pair with a blank (empty or whitespace-only) source or target is in the train, val
            and test splits: "drop" leaves such pairs out with one warning counting them and naming the first
            file and line; "error" stops at the first, naming its file and line. Predict files are read as they
            are, one output per line.
        tokenization: the joint tokenizer (`settings.Tokenization`).
        special_tokens: pad, unk, bos and eos are required.
        batching: batch sizes (`settings.Batching`); max_tokens is counted on a pair's longer side.
        truncation: most tokens in a source or a target, its special tokens included, and what becomes of a
            longer one (`settings.Truncation`; a cut keeps the eos).
        seed: seed of the batch order.
        prepared_dir: read the train, val and test splits from rows prepared in this folder (`lightning_tfm
            prepare --config CONFIG`, or the first `fit`), memory-mapped, instead of reading and tokenizing the
            raw files each run; the raw files stay the source of truth and a change to them, to the tokenizer or
            to the settings above is refused until the data is prepared again. None reads the raw files.
    """

    tokenizer_home = "runs/tokenizers/translation"
    required_specials = ("pad", "bos", "eos")
    row_names = {"src": "source", "tgt": "target"}

    def __init__(self, train_path: str = "../shared/data/multi30k/train",
                 val_path: str | None = "../shared/data/multi30k/val",
                 test_path: str | None = "../shared/data/multi30k/test2016", predict_path: str | None = None,
                 src_lang: str = "en", tgt_lang: str = "de", blank_lines: BlankLines = "drop",
                 tokenization: Tokenization = Tokenization(), special_tokens: SpecialTokens = SpecialTokens(),
                 batching: Batching = Batching(max_tokens=4096, batch_size=None),
                 truncation: Truncation = Truncation(max_len=256), seed: int = 0,
                 prepared_dir: str | None = None) -> None:
        super().__init__(tokenization, special_tokens, batching, seed)
        if src_lang == tgt_lang:
            raise ValueError(f"data.src_lang and data.tgt_lang are both {src_lang!r}; they must differ")
        if truncation.max_len < 3:
            raise ValueError(f"data.truncation.max_len={truncation.max_len}, must be >= 3 (bos, one token, eos)")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.predict_path = predict_path
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.truncation, self.blank_lines = truncation, blank_lines
        self.prepared_dir = prepared_dir
        self._texts: dict[str, _Texts] = {}

    def training_files(self) -> list[str]:
        return self._files(self.train_path)

    def training_texts(self) -> Iterator[str]:
        if self.prepared_dir is not None:         # streamed: the corpus may not fit in memory
            for example in self.raw_examples("train"):
                yield from example.texts
            return
        texts = self._read("train")
        yield from texts.sources
        yield from texts.targets or []

    def tokenizer_source(self) -> dict[str, Any]:
        return {**super().tokenizer_source(), "columns": [self.src_lang, self.tgt_lang]}

    def has_split(self, split: str) -> bool:
        if split == "predict":
            return (self.predict_path or self.test_path) is not None
        return super().has_split(split)

    def build_dataset(self, split: str) -> TranslationDataset | PreparedTranslationDataset:
        if not self.has_split(split):
            raise ValueError(f"data.{split}_path is not set" + (" (nor data.test_path)" if split == "predict" else ""))
        if self.prepared_dir is not None and (split != "predict" or self.predict_path is None):
            return PreparedTranslationDataset(open_split(self, "test" if split == "predict" else split))
        texts = self._read(split)
        src = self._fit(split, "src", self.encode(texts.sources), texts.src_file, texts.lines)
        tgt = None
        if texts.targets is not None:
            tgt = self._fit(split, "tgt", self.encode(texts.targets), texts.tgt_file, texts.lines)
        return TranslationDataset(src, tgt, texts)

    # --- prepared rows (data/prepare.py's Preparable) -----------------------------------------------------

    def prepared_fields(self) -> tuple[str, ...]:
        return ("src", "tgt")

    def prepared_values(self) -> dict[str, list[str] | None]:
        return {}

    def prepared_settings(self) -> dict[str, Any]:
        return {"src_lang": self.src_lang, "tgt_lang": self.tgt_lang, "max_len": self.truncation.max_len,
                "truncate": self.truncation.cut, "blank_lines": self.blank_lines,
                "special_tokens": self.special_tokens.tokens()}

    def source_files(self, split: str) -> list[str]:
        return [str(check_file(f"{split}_path", name)) for name in self._files(getattr(self, f"{split}_path"))]

    def raw_examples(self, split: str) -> Iterator[Example]:
        files = self.source_files(split)
        if is_table(files[0]):        # tables are read whole (their quoting spans lines)
            langs = [self.src_lang, self.tgt_lang]
            for row in read_table(files[0], langs, text_columns=langs, blank_lines=self.blank_lines):
                yield Example((row[self.src_lang], row[self.tgt_lang]), row.line)
            return
        for pair in iter_pairs(files[0], files[1], self.blank_lines):
            yield Example((pair.source, pair.target), pair.line)

    def keeps_text(self, split: str) -> bool:
        return split != "train"           # BLEU scores the raw references; predictions show the sources

    def framing(self, split: str, field: str) -> Framing:
        """A source is its tokens + eos, a target bos + tokens + eos; at most max_len each."""
        special = self.special_ids
        prefix = (special.bos,) if field == "tgt" else ()
        return Framing(prefix, (special.eos,), self.truncation.max_len, self.truncation.cut)

    # --- internals ---------------------------------------------------------------------------------------

    def _files(self, path: str) -> list[str]:
        return [path] if is_table(path) else [f"{path}.{self.src_lang}", f"{path}.{self.tgt_lang}"]

    def _read(self, split: str) -> _Texts:
        """The split's texts, read once: the tokenizer and the dataset share them, and a warning about blank
        lines comes once."""
        if split not in self._texts:
            self._texts[split] = self._read_files(split)
        return self._texts[split]

    def _read_files(self, split: str) -> _Texts:
        if split == "predict" and self.predict_path is not None:
            path = str(check_file("predict_path", self.predict_path))
            sources = read_lines(path)
            return _Texts(sources, None, path, path, list(range(1, len(sources) + 1)))
        key = "test" if split == "predict" else split
        path = getattr(self, f"{key}_path")
        files = [str(check_file(f"{key}_path", name)) for name in self._files(path)]   # or their .gz/.xz/.zst
        langs = [self.src_lang, self.tgt_lang]
        if is_table(path):
            rows = read_table(files[0], langs, text_columns=langs, blank_lines=self.blank_lines)
            return _Texts([r[self.src_lang] for r in rows], [r[self.tgt_lang] for r in rows], files[0], files[0],
                          [r.line for r in rows])
        pairs = read_pairs(files[0], files[1], self.blank_lines)
        return _Texts([p.source for p in pairs], [p.target for p in pairs], files[0], files[1],
                      [p.line for p in pairs])

    def _fit(self, split: str, field: str, seqs: list[list[int]], file: str, lines: list[int]) -> list[list[int]]:
        """Add the special tokens and enforce max_len (`framing`): truncate with one warning per split, or raise."""
        framed = frame(seqs, self.framing(split, field), "int64")
        if framed.too_long is not None:
            raise self.too_long(split, field, f"{file}:{lines[framed.too_long[0]]}", framed.too_long[1])
        if framed.cut:
            self.truncated(split, field, len(framed.cut), len(seqs), f"{file}:{lines[framed.cut[0]]}")
        return framed.rows()

    def loader(self, split: str, shuffle: bool, pool_size: int = 16384) -> DataLoader:
        dataset = self.dataset(split)
        lengths = dataset.lengths()
        collate = functools.partial(collate_translation, pad_id=self.pad_id)
        return self.bucketed_loader(dataset, lengths, collate, shuffle, pool_size)
