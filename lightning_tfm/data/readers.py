"""Files to records: whole text, lines, line-aligned source/target pairs, and TSV/CSV/JSONL tables.

Every reader opens `.gz` files transparently, decodes UTF-8 strictly and names `path:line` in its errors, so
a bad byte, a missing column or a misaligned pair points at the line to fix. Lines are split on "\\n" only
(a trailing "\\r" is dropped), never on the other Unicode line breaks `str.splitlines` honours (U+2028,
U+0085, ...), which would silently misalign parallel files. Formats follow the shared data README: SST-2's
TSV has no quoting (`csv.QUOTE_NONE`) and a trailing space per sentence; AG News is standard CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

TableFormat = Literal["tsv", "csv", "jsonl"]
_SUFFIX_FORMATS: dict[str, TableFormat] = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Row:
    """One record of a table file.

    Args:
        path: the file it came from.
        line: 1-based line number where the record starts (the header is line 1 of a TSV/CSV).
        values: the requested columns, by name.
    """

    path: str
    line: int
    values: dict[str, str]

    @property
    def where(self) -> str:
        """`path:line`, for error messages."""
        return f"{self.path}:{self.line}"

    def __getitem__(self, column: str) -> str:
        return self.values[column]


def read_text(path: str | Path) -> str:
    """The whole file as one string (gzip-decompressed if it ends in `.gz`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, is a broken gzip file, or is not valid UTF-8 (naming `path:line`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    if not data:
        raise ValueError(f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {column} of the line, "
                         f"{data[e.start:e.end]!r})") from e


def split_lines(text: str) -> list[str]:
    """Split on "\\n" only, drop one trailing "\\r" per line and the empty string after a final newline."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """The file's lines without their line endings; line i (1-based) is element i-1.

    Raises:
        FileNotFoundError, ValueError: as `read_text`.
    """
    return split_lines(read_text(path))


def read_parallel(source_path: str | Path, target_path: str | Path) -> list[tuple[str, str]]:
    """Line-aligned source/target files: line i of one pairs with line i of the other.

    Raises:
        ValueError: the two files have different line counts (both are named, with their counts).
    """
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
                         "line-aligned files need one target line per source line")
    return list(zip(sources, targets))


def is_table(path: str | Path) -> bool:
    """Whether the suffix names a table format: `.tsv`, `.csv`, `.jsonl` or `.ndjson`, optionally + `.gz`."""
    return _table_suffix(path) in _SUFFIX_FORMATS


def table_format(path: str | Path) -> TableFormat:
    """The table format named by a path's suffix (see `is_table`)."""
    suffix = _table_suffix(path)
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"{path}: cannot tell the table format from the suffix {suffix!r}; "
                         f"expected one of {sorted(_SUFFIX_FORMATS)} (optionally followed by .gz)")
    return _SUFFIX_FORMATS[suffix]


def _table_suffix(path: str | Path) -> str:
    path = Path(path)
    return (Path(path.stem).suffix if path.suffix == ".gz" else path.suffix).lower()


def read_table(path: str | Path, columns: Sequence[str], fmt: TableFormat | None = None, strip: bool = True,
               optional: Sequence[str] = ()) -> list[Row]:
    """Records of a TSV, CSV or JSONL file, keeping only `columns`.

    TSV and CSV files start with a header line naming the columns. TSV is read with `csv.QUOTE_NONE` (a
    quote character is ordinary text, as in GLUE's SST-2); CSV uses standard quoting (`""` escapes, quoted
    fields may span lines). JSONL holds one object per line; numbers become strings ("1"), so labels read
    the same from every format. Blank lines are skipped.

    Args:
        path: the file; `.gz` is decompressed.
        columns: the column names (TSV/CSV header fields, JSONL keys) to keep.
        fmt: "tsv", "csv" or "jsonl"; None infers it from the suffix.
        strip: strip surrounding whitespace from every value (SST-2 sentences end in a space).
        optional: columns kept when present and left out of `Row.values` when absent (e.g. the label of a
            file to predict), per file for TSV/CSV and per line for JSONL.

    Raises:
        ValueError: a column is missing (naming `path:line`, the column and the available ones), a row has
            the wrong number of fields, a JSONL line is not a JSON object, or the file has no records.
    """
    fmt = fmt or table_format(path)
    if fmt not in ("tsv", "csv", "jsonl"):
        raise ValueError(f"{path}: fmt={fmt!r}, must be 'tsv', 'csv' or 'jsonl'")
    text = read_text(path)
    if fmt == "jsonl":
        rows = _read_jsonl(path, text, columns, optional)
    else:
        rows = _read_delimited(path, text, columns, optional, fmt)
    if not rows:
        raise ValueError(f"{path} has no records" + ("" if fmt == "jsonl" else " below its header"))
    if strip:
        rows = [Row(r.path, r.line, {k: v.strip() for k, v in r.values.items()}) for r in rows]
    return rows


def _read_delimited(path: str | Path, text: str, columns: Sequence[str], optional: Sequence[str],
                    fmt: TableFormat) -> list[Row]:
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=",")
    try:
        header = next(reader)
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}:1: no column {missing[0]!r} in the header; available columns: {header}")
        columns = list(columns) + [c for c in optional if c in header and c not in columns]
        positions = [header.index(c) for c in columns]
        rows, end = [], reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{start}: expected {len(header)} fields {header}, found {len(fields)}"
                                 + (" (TSV is read without quoting: is there a tab inside a value?)"
                                    if fmt == "tsv" else ""))
            rows.append(Row(str(path), start, {c: fields[p] for c, p in zip(columns, positions)}))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from e
    return rows


def _read_jsonl(path: str | Path, text: str, columns: Sequence[str], optional: Sequence[str]) -> list[Row]:
    rows = []
    for line_no, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, found {type(record).__name__}")
        values = {}
        for column in list(columns) + [c for c in optional if c in record and c not in columns]:
            if column not in record:
                raise ValueError(f"{path}:{line_no}: no key {column!r}; available keys: {sorted(record)}")
            value = record[column]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"{path}:{line_no}: key {column!r} holds {json.dumps(value)[:60]}; "
                                 "expected a string or a number")
            values[column] = value if isinstance(value, str) else str(value)
        rows.append(Row(str(path), line_no, values))
    return rows
