"""Text classification data: TSV/CSV/JSONL tables with one text column or a pair of them, BERT-style inputs
`cls a sep [b sep]` with segment ids (Devlin et al. 2019, §3), labels learned from the training split, read
raw or from prepared rows (`data/prepare.py`; the datasets and collate are in `classification_data.py`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import DataLoader

from lightning_tfm.data.datamodules.base import TextDataModule
from lightning_tfm.data.datamodules.classification_data import (
    ClassificationDataset,
    PreparedClassificationDataset,
    collate_classification,
)
from lightning_tfm.data.datamodules.splits import carve_validation, check_file
from lightning_tfm.data.prepare import Example, open_split, recorded_names
from lightning_tfm.data.readers import BlankLines, Row, read_table
from lightning_tfm.data.settings import Batching, Tokenization, Truncation
from lightning_tfm.data.tokenize_workers import FramedIds, Framing, frame_fields
from lightning_tfm.data.tokenizers import SpecialTokens

#: BERT's roles; the mask token is kept so masked-LM pretraining and fine-tuning share one tokenizer
_SPECIAL_TOKENS = SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>", mask="<mask>")


class ClassificationDataModule(TextDataModule):
    """Labelled texts (or text pairs) for sequence classification, SST-2 by default.

    Each input is `cls + a + sep`, or `cls + a + sep + b + sep` with `text_pair_column` (e.g. premise /
    hypothesis), the longer text losing tokens first when the pair is over `max_len` (BERT's
    `_truncate_seq_pair`). Label names are the sorted distinct labels of the training split; a validation
    or test label never seen in training is an error naming its file and line. With `label_delimiter`,
    a label cell holds several labels (multi-label). AG News has no validation file: set `val_fraction`.
    The tokenizer's mask token is kept for masked-LM pretraining on the same texts (see `data.masking`).

    Batches: "ids" (B, T) int64, "mask" (B, T) bool (True = real token), "index" (B,) int64 (position in the
    split), "labels" (B,) int64 class indices, or (B, n_classes) float multi-hot with a label_delimiter;
    "segments" (B, T) int64 (0 = first text, 1 = second) only for pairs. Predict batches have no "labels"
    when the predict file has no label column. T is a multiple of 8.

    Args:
        train_path: training table (.tsv read without quoting, .csv with standard quoting, .jsonl), optionally
            compressed (.gz, .xz, .zst); `train.tsv` finds `train.tsv.gz` when there is no `train.tsv`.
        val_path: validation table, or None (see val_fraction).
        test_path: test table, or None.
        predict_path: table to classify, which needs only the text column(s); None predicts the test split.
        text_column: the column holding the text.
        text_pair_column: the column holding the second text of a pair, or None for single texts.
        label_column: the column holding the label.
        label_delimiter: splits a label cell into several labels (multi-label), e.g. ","; None for one label.
        label_names: the label set in class order; None learns it from the training split (sorted). Set it to
            predict without the training data (`lightning_tfm export` writes it).
        val_fraction: when val_path is None, hold out this random fraction of the training rows (drawn with
            seed) as validation; the tokenizer and label names see only the rest. Ignored when val_path is set.
        blank_lines: what a row whose text (or text pair) is blank (empty or only whitespace) is in the train,
            val and test splits: "drop" leaves such rows out with one warning counting them and naming the first
            file and line; "error" stops at the first, naming its file and line. Predict files are read as they
            are, one output per row.
        tokenization: the tokenizer (`settings.Tokenization`).
        special_tokens: pad, cls and sep are required; mask is kept for masked-LM pretraining.
        batching: batch sizes (`settings.Batching`).
        truncation: most tokens per input, special tokens included, and what becomes of a longer one
            (`settings.Truncation`; of a pair, the longer text loses tokens first).
        seed: seed of the batch order and of the val_fraction split.
        prepared_dir: read the train, val and test splits (token ids and label indices) from rows prepared in
            this folder (`lightning_tfm prepare --config CONFIG`, or the first `fit`), memory-mapped, instead of
            reading and tokenizing the raw tables each run; the label set comes from its manifest too. The raw
            files stay the source of truth: a change to them, to the tokenizer or to the settings above (columns,
            labels, val_fraction and seed, truncation, blank_lines) is refused until the data is prepared
            again. A predict_path file is always read raw. None reads the raw files.
    """

    tokenizer_home = "runs/tokenizers/classification"
    required_specials = ("pad", "cls", "sep")
    row_names = {"text": "input", "text_pair": "input"}

    def __init__(self, train_path: str = "../shared/data/sst2/train.tsv",
                 val_path: str | None = "../shared/data/sst2/dev.tsv", test_path: str | None = None,
                 predict_path: str | None = None, text_column: str = "sentence", text_pair_column: str | None = None,
                 label_column: str = "label", label_delimiter: str | None = None,
                 label_names: list[str] | None = None, val_fraction: float = 0.0,
                 blank_lines: BlankLines = "drop",
                 tokenization: Tokenization = Tokenization(), special_tokens: SpecialTokens = _SPECIAL_TOKENS,
                 batching: Batching = Batching(), truncation: Truncation = Truncation(longer="cut"),
                 seed: int = 0, prepared_dir: str | None = None) -> None:
        super().__init__(tokenization, special_tokens, batching, seed)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}, must be in [0, 1)")
        if truncation.max_len < (5 if text_pair_column else 3):
            raise ValueError(f"data.truncation.max_len={truncation.max_len} leaves no room for text after the "
                             "special tokens")
        if label_delimiter == "":
            raise ValueError("data.label_delimiter is '', use None for single-label data")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.predict_path = predict_path
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.label_column, self.label_delimiter = label_column, label_delimiter
        self.val_fraction, self.truncation, self.blank_lines = val_fraction, truncation, blank_lines
        self.prepared_dir = prepared_dir
        self._rows: dict[str, list[Row]] = {}
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise ValueError(f"data.label_names={label_names} repeats a label")
        self._given_labels = list(label_names) if label_names is not None else None
        self._label_names: list[str] | None = self._given_labels
        self._label_index: dict[str, int] | None = None

    @property
    def label_names(self) -> list[str]:
        """`label_names` as given, else the sorted distinct labels of the training split (as the manifest of
        up-to-date prepared data recorded them, or read now); class i is label_names[i]."""
        if self._label_names is None:
            recorded = recorded_names(self, "labels") if self.prepared_dir is not None else None
            self._label_names = recorded if recorded is not None else sorted(
                {name for row in self._split_rows("train") for name in self._labels(row)})
        return self._label_names

    @property
    def n_classes(self) -> int:
        """Number of classes, to link into the model's classification head."""
        return len(self.label_names)

    @property
    def multi_label(self) -> bool:
        """Whether a label cell can hold several labels (then "labels" is multi-hot)."""
        return self.label_delimiter is not None

    def training_files(self) -> list[str]:
        return [self.train_path]

    def training_texts(self) -> Iterator[str]:
        for row in self._split_rows("train"):
            yield row[self.text_column]
            if self.text_pair_column is not None:
                yield row[self.text_pair_column]

    def tokenizer_source(self) -> dict[str, Any]:
        carve = self.val_fraction if self.val_path is None else 0.0
        return {**super().tokenizer_source(), "columns": [self.text_column, self.text_pair_column],
                "val_fraction": carve, "seed": self.seed if carve else None}

    def has_split(self, split: str) -> bool:
        if split == "predict":
            return (self.predict_path or self.test_path) is not None
        return super().has_split(split)

    def build_dataset(self, split: str) -> ClassificationDataset | PreparedClassificationDataset:
        if not self.has_split(split):
            raise ValueError(f"data.{split}_path is not set" + (" (nor data.test_path)" if split == "predict" else ""))
        if self.prepared_dir is not None and (split != "predict" or self.predict_path is None):
            return PreparedClassificationDataset(open_split(self, "test" if split == "predict" else split),
                                                 self.multi_label)
        rows = self._split_rows(split)
        fields = list(zip(*(framed.rows() for framed in self._framed(split, rows))))    # per example, per field
        ids = [[i for part in parts for i in part] for parts in fields]
        segments = [[k for k, part in enumerate(parts) for _ in part] for parts in fields]
        labels = None
        if all(self.label_column in row.values for row in rows):
            labels = [self._label_indices(row) for row in rows]
            labels = labels if self.multi_label else [found[0] for found in labels]
        return ClassificationDataset(ids, segments, labels)

    # --- prepared rows (data/prepare.py's Preparable): "text" and "text_pair" ids, "labels" indices ----------

    def prepared_fields(self) -> tuple[str, ...]:
        return ("text", "text_pair") if self.text_pair_column else ("text",)

    def prepared_values(self) -> dict[str, list[str] | None]:
        return {"labels": self.label_names}

    def prepared_settings(self) -> dict[str, Any]:
        carve = self.val_fraction if self.val_path is None else 0.0
        return {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                "label_column": self.label_column, "label_delimiter": self.label_delimiter,
                "label_names": self._given_labels, "val_fraction": carve, "seed": self.seed if carve else None,
                "max_len": self.truncation.max_len, "truncate": self.truncation.cut, "blank_lines": self.blank_lines,
                "special_tokens": self.special_tokens.tokens()}

    def raw_examples(self, split: str) -> Iterator[Example]:
        """The split's rows as the raw path reads them (a val_fraction split carved alike), with label indices."""
        columns = self._columns(labeled=False)
        for row in self._split_rows(split):
            yield Example(tuple(row[c] for c in columns), row.line, (self._label_indices(row),))

    def keeps_text(self, split: str) -> bool:
        return False          # evaluation scores labels and predictions name them: no raw text is shown

    def framing(self, split: str, field: str) -> Framing:
        """`cls a sep`, and `b sep` for a pair, the two sharing max_len (the longer text losing tokens first)."""
        special = self.special_ids
        prefix = (special.cls,) if field == "text" else ()
        return Framing(prefix, (special.sep,), self.truncation.max_len, self.truncation.cut,
                       joint=self.text_pair_column is not None)

    # --- internals ---------------------------------------------------------------------------------------

    def _framed(self, split: str, rows: list[Row]) -> list[FramedIds]:
        """The rows' texts encoded and framed as `prepare`'s workers do them, refused or warned about alike."""
        fields, columns = self.prepared_fields(), self._columns(labeled=False)
        framed = frame_fields([self.encode([row[c] for row in rows]) for c in columns],
                              [self.framing(split, field) for field in fields], "int64")
        if framed[0].too_long is not None:
            position, length = framed[0].too_long
            raise self.too_long(split, fields[0], rows[position].where, length)
        if framed[0].cut:
            self.truncated(split, fields[0], len(framed[0].cut), len(rows), rows[framed[0].cut[0]].where)
        return framed

    def _columns(self, labeled: bool = True) -> list[str]:
        texts = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        return texts + ([self.label_column] if labeled else [])

    def _split_rows(self, split: str) -> list[Row]:
        """The split's rows; a val_fraction split is carved from the training file once (seeded)."""
        if split in self._rows:
            return self._rows[split]
        if split in ("train", "val") and self.val_path is None and self.val_fraction > 0:
            rows = self._read_table(check_file("train_path", self.train_path))
            self._rows["train"], self._rows["val"] = carve_validation(rows, self.val_fraction, self.seed)
            return self._rows[split]
        key = "test" if split == "predict" and self.predict_path is None else split
        path = getattr(self, f"{key}_path")
        found = check_file(f"{key}_path", path)
        if split == "predict" and self.predict_path is not None:  # a file to classify may have no labels
            self._rows[split] = read_table(found, self._columns(labeled=False), optional=[self.label_column])
        else:
            self._rows[split] = self._read_table(found)
        return self._rows[split]

    def _read_table(self, path: Path) -> list[Row]:
        """A labelled split's rows, those with a blank text dropped or refused (`blank_lines`)."""
        return read_table(path, self._columns(), text_columns=self._columns(labeled=False),
                          blank_lines=self.blank_lines)

    def _labels(self, row: Row) -> list[str]:
        cell = row[self.label_column]
        if self.label_delimiter is not None:  # an empty cell is an example with no labels
            return [name.strip() for name in cell.split(self.label_delimiter) if name.strip()]
        if not cell:
            raise ValueError(f"{row.where}: the label column {self.label_column!r} is empty")
        return [cell]

    def _label_indices(self, row: Row) -> list[int]:
        """The sorted class indices of a row's labels (one for single-label data)."""
        if self._label_index is None:
            self._label_index = {name: i for i, name in enumerate(self.label_names)}
        index = self._label_index
        unknown = [name for name in self._labels(row) if name not in index]
        if unknown:
            raise ValueError(f"{row.where}: label {unknown[0]!r} is not one of the known labels {self.label_names} "
                             f"(data.label_names, or those of the training split {self.train_path})")
        return sorted(index[name] for name in self._labels(row))

    def loader(self, split: str, shuffle: bool, pool_size: int = 16384) -> DataLoader:
        dataset = self.dataset(split)
        collate = functools.partial(collate_classification, pad_id=self.pad_id, n_classes=self.n_classes,
                                    multi_label=self.multi_label, pairs=self.text_pair_column is not None)
        return self.bucketed_loader(dataset, dataset.lengths(), collate, shuffle, pool_size)

