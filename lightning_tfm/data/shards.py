"""Prepared token storage: one memory-mapped array of variable-length rows per split and field.

A field `NAME` of a split is two files: `NAME.bin`, every row's values end to end (token ids as uint16 when the
vocabulary fits in 16 bits, else uint32; raw UTF-8 text as uint8; other integers, e.g. label indices, as int64),
and `NAME.idx`, N + 1 int64 offsets, row i being `bin[idx[i]:idx[i + 1]]`. This is nanoGPT's `train.bin` with an
index added, which is what Megatron's and fairseq's indexed datasets are too: reading row i is two slices of
pages the OS caches and evicts, so resident memory does not grow with the corpus, and nothing needs decoding
(measured against Arrow tables in the README).

A `RowWriter` writes under temporary names; `finish` flushes, fsyncs and renames them into place, and the
manifest (`data/prepare.py`) that records every file's size is written last, so a crash leaves no file that
passes for complete. `Rows` checks both files against the sizes the manifest recorded before mapping them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TEXT = "uint8"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id below `vocab_size` (uint16 up to 65,536 ids)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}, must be >= 1")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class RowWriter:
    """Appends rows to `<folder>/<name>.bin` and `.idx`, atomically: nothing appears under those names before
    `finish`.

    Args:
        folder: where the two files go.
        name: the field's file name stem, e.g. "train.src".
        dtype: "uint16"/"uint32" for token ids (`token_dtype`), "uint8" for UTF-8 text, "int64" for other values.
    """

    def __init__(self, folder: Path, name: str, dtype: str) -> None:
        self.folder, self.name, self.dtype = Path(folder), name, np.dtype(dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tmp = {suffix: self.folder / f".{name}.{suffix}.{os.getpid()}.tmp" for suffix in ("bin", "idx")}
        self._bin = open(self._tmp["bin"], "wb")
        self._idx = open(self._tmp["idx"], "wb")
        self._idx.write(np.zeros(1, dtype=np.int64).tobytes())
        self.rows, self.values = 0, 0

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append rows given end to end in `flat` (already of this writer's dtype) with their `lengths`."""
        if flat.dtype != self.dtype or int(lengths.sum()) != len(flat):
            raise ValueError(f"{self.name}: {len(flat)} {flat.dtype} values for rows of {int(lengths.sum())} "
                             f"{self.dtype} values")
        self._bin.write(flat.tobytes())
        self._idx.write((self.values + np.cumsum(lengths, dtype=np.int64)).tobytes())
        self.rows, self.values = self.rows + len(lengths), self.values + len(flat)

    def add(self, rows: Sequence[Sequence[int]] | Sequence[bytes]) -> None:
        """Append rows: token id (or other integer) lists, or UTF-8 byte strings for a text field."""
        if not rows:
            return
        if self.dtype == np.uint8:
            flat = np.frombuffer(b"".join(rows), dtype=np.uint8)      # type: ignore[arg-type]
        else:
            flat = np.fromiter((v for row in rows for v in row), dtype=np.int64)
            limits = np.iinfo(self.dtype)
            if flat.size and (flat.min() < limits.min or flat.max() > limits.max):
                bad = int(flat.min()) if flat.min() < limits.min else int(flat.max())
                raise ValueError(f"{self.name}: value {bad} does not fit in {self.dtype}")
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes())
        self._idx.write((self.values + np.cumsum(lengths)).tobytes())
        self.rows, self.values = self.rows + len(rows), self.values + int(lengths.sum())

    def finish(self) -> dict[str, Any]:
        """Flush, fsync and rename both files into place; their record for the manifest."""
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        record = {"rows": self.rows, "values": self.values, "dtype": self.dtype.name,
                  "bin_bytes": self._tmp["bin"].stat().st_size, "idx_bytes": self._tmp["idx"].stat().st_size}
        for suffix, tmp in self._tmp.items():
            os.replace(tmp, self.folder / f"{self.name}.{suffix}")
        return record

    def abandon(self) -> None:
        """Close and delete the temporary files (after an error)."""
        for f in (self._bin, self._idx):
            f.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)


class Rows:
    """Read-only view of a field written by `RowWriter`: `rows[i]` is a NumPy array (or `text(i)` a string).

    Args:
        folder: the prepared folder.
        name: the field's file name stem.
        record: what `RowWriter.finish` returned, from the manifest; the files must match it.

    Raises:
        ValueError: a file is missing or its size differs from the record (a truncated or replaced shard).
    """

    def __init__(self, folder: Path, name: str, record: dict[str, Any]) -> None:
        self.name = name
        paths = {suffix: Path(folder) / f"{name}.{suffix}" for suffix in ("bin", "idx")}
        for suffix, path in paths.items():
            want = record[f"{suffix}_bytes"]
            if not path.is_file():
                raise ValueError(f"{path} is missing; prepare the data again (lightning_tfm prepare)")
            if path.stat().st_size != want:
                raise ValueError(f"{path} has {path.stat().st_size} bytes but its manifest says {want}: a truncated "
                                 "or replaced file; prepare the data again (lightning_tfm prepare --rebuild)")
        self.offsets = np.memmap(paths["idx"], dtype=np.int64, mode="r")
        # np.memmap cannot map an empty file: a field of empty rows reads from an empty array
        self.values = (np.memmap(paths["bin"], dtype=record["dtype"], mode="r") if record["bin_bytes"]
                       else np.zeros(0, dtype=record["dtype"]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def text(self, i: int) -> str:
        """Row i of a text field, decoded."""
        return self[i].tobytes().decode("utf-8")

    def lengths(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Lengths of rows start..stop-1 as int64, read from the index alone."""
        return np.diff(np.asarray(self.offsets[start:(len(self) if stop is None else stop) + 1]))



class RowLengths:
    """Each example's length over one or more fields of prepared rows, read from their offsets indexes only where
    asked: `lengths[indices]` for an int64 array of example indices. The batch sampler reads it a pool at a time,
    so no array of one length per example is ever held, however large the corpus.

    Args:
        rows: the fields whose lengths make an example's (a translation pair's source and target).
        combine: how two fields' lengths combine: `np.maximum` (the longer side, a translation pair's batch budget)
            or `np.add` (a text pair read as one input).
    """

    def __init__(self, *rows: Rows, combine: Any = np.add) -> None:
        self.rows, self.combine = rows, combine

    def __len__(self) -> int:
        return len(self.rows[0])

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for rows in self.rows:
            lengths = rows.offsets[indices + 1] - rows.offsets[indices]
            out = lengths if out is None else self.combine(out, lengths)
        return np.asarray(out, dtype=np.int64)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        # every length at once defeats the point: fail loudly rather than hold the corpus's worth of int64s
        raise TypeError("RowLengths is read a pool at a time (lengths[indices]); it is never turned into one array")


LENGTH_EDGES = (8, 16, 32, 64, 128, 256, 512, 1024)


def histogram_counts(lengths: np.ndarray) -> np.ndarray:
    """How many lengths fall in each bin <=8, <=16, ..., <=1024, >1024 (summed chunk by chunk)."""
    return np.bincount(np.searchsorted(LENGTH_EDGES, lengths), minlength=len(LENGTH_EDGES) + 1)


def histogram_dict(counts: np.ndarray) -> dict[str, int]:
    """`histogram_counts` named for the manifest: {"<=8": n, ..., ">1024": n}."""
    names = [f"<={e}" for e in LENGTH_EDGES] + [f">{LENGTH_EDGES[-1]}"]
    return {name: int(c) for name, c in zip(names, counts)}
