"""Files to records: whole text, lines, line-aligned source/target pairs, and TSV/CSV/JSONL tables.

Every reader decompresses `.gz`, `.xz` and `.zst` files as it reads them (a path without the suffix finds its
compressed sibling, see `data.compressed`), decodes UTF-8 strictly and names `path:line` in its errors, so a bad
byte, a missing column or a misaligned pair points at the line to fix. A file without text (empty, or only
whitespace) is an error, and a pair or row whose text is blank is left out with one warning or refused
(`blank_lines`). Lines are split on "\\n" only (a trailing "\\r" is dropped), never on the other Unicode line
breaks `str.splitlines` honours (U+2028, U+0085, ...), which would silently misalign parallel files. Formats
follow the shared data README: SST-2's TSV has no quoting (`csv.QUOTE_NONE`) and a trailing space per sentence;
AG News is standard CSV.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

# every DDP rank reads the data: rank_zero_warn makes the blank-line warning one warning, as the datamodules' are
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tfm.data.compressed import compressed_look, find_file, is_compressed, read_bytes

TableFormat = Literal["tsv", "csv", "jsonl"]
BlankLines = Literal["drop", "error"]
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
    """The whole file as one string; `.gz`, `.xz` and `.zst` files are decompressed, and a path without that
    suffix finds its one compressed sibling when the plain file does not exist (`compressed.find_file`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or only whitespace, is a truncated or corrupt archive, is not valid UTF-8
            (naming `path:line`), or several compressed files could stand for `path`.
    """
    path = find_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    data = read_bytes(path) if size else b""    # a 0-byte .xz is "empty", not a "truncated xz file"
    if not data:
        raise ValueError(f"{path} is empty" + (" once decompressed" if size else ""))
    text = _decode(path, data)
    if text.isspace():
        raise ValueError(f"{path} holds no text, only whitespace ({len(data)} byte{'s' * (len(data) > 1)})")
    return text


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        looks = compressed_look(data)   # a compressed file saved without its suffix
        hint = f"; it looks like a {looks} file: add that suffix to its name" if looks else ""
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {column} of the line, "
                         f"{data[e.start:e.end]!r}){hint}") from e


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


@dataclass(frozen=True)
class Pair:
    """Line `line` (1-based) of a source file and of its line-aligned target file."""

    source: str
    target: str
    line: int


def read_pairs(source_path: str | Path, target_path: str | Path, blank_lines: BlankLines = "drop") -> list[Pair]:
    """Line-aligned source/target files: line i of one pairs with line i of the other.

    A pair with a blank (empty or whitespace-only) source or target line is no example: `blank_lines="drop"`
    leaves such pairs out with one warning that counts them and names the first; "error" refuses the first.

    Raises:
        ValueError: the two files have different line counts (both are named, with their counts); a blank line
            with blank_lines="error" (naming `path:line`); no pair holds text on both sides.
    """
    source_path, target_path = find_file(source_path), find_file(target_path)
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
                         "line-aligned files need one target line per source line")
    _check_blank_lines(blank_lines)
    pairs, first, dropped = [], "", 0
    for line, (source, target) in enumerate(zip(sources, targets), start=1):
        side = "source" if _blank(source) else "target" if _blank(target) else None
        if side is None:
            pairs.append(Pair(source, target, line))
            continue
        where = f"{source_path if side == 'source' else target_path}:{line}"
        if blank_lines == "error":
            raise _blank_error(where, f"the {side} line", "pair")
        first, dropped = first or where, dropped + 1
    _warn_blank(dropped, len(sources), "pairs", "a blank source or target line", first)
    if not pairs:
        raise ValueError(f"{source_path} and {target_path}: no line pair holds text on both sides")
    return pairs


def read_parallel(source_path: str | Path, target_path: str | Path,
                  blank_lines: BlankLines = "drop") -> list[tuple[str, str]]:
    """`read_pairs` as (source, target) tuples, for callers that need no line numbers."""
    return [(p.source, p.target) for p in read_pairs(source_path, target_path, blank_lines)]


def is_table(path: str | Path) -> bool:
    """Whether the suffix names a table format: `.tsv`, `.csv`, `.jsonl` or `.ndjson`, optionally followed by
    `.gz`, `.xz` or `.zst`."""
    return _table_suffix(path) in _SUFFIX_FORMATS


def table_format(path: str | Path) -> TableFormat:
    """The table format named by a path's suffix (see `is_table`)."""
    suffix = _table_suffix(path)
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"{path}: cannot tell the table format from the suffix {suffix!r}; "
                         f"expected one of {sorted(_SUFFIX_FORMATS)} (optionally followed by .gz, .xz or .zst)")
    return _SUFFIX_FORMATS[suffix]


def _table_suffix(path: str | Path) -> str:
    path = Path(path)
    return (Path(path.stem).suffix if is_compressed(path) else path.suffix).lower()


def read_table(path: str | Path, columns: Sequence[str], fmt: TableFormat | None = None, strip: bool = True,
               optional: Sequence[str] = (), text_columns: Sequence[str] = (),
               blank_lines: BlankLines = "drop") -> list[Row]:
    """Records of a TSV, CSV or JSONL file, keeping only `columns`.

    TSV and CSV files start with a header line naming the columns. TSV is read with `csv.QUOTE_NONE` (a
    quote character is ordinary text, as in GLUE's SST-2); CSV uses standard quoting (`""` escapes, quoted
    fields may span lines). JSONL holds one object per line; numbers become strings ("1"), so labels read
    the same from every format. Blank lines are skipped.

    Args:
        path: the file; `.gz`, `.xz` and `.zst` are decompressed, and a path without that suffix finds its
            compressed sibling.
        columns: the column names (TSV/CSV header fields, JSONL keys) to keep.
        fmt: "tsv", "csv" or "jsonl"; None infers it from the suffix.
        strip: strip surrounding whitespace from every value (SST-2 sentences end in a space).
        optional: columns kept when present and left out of `Row.values` when absent (e.g. the label of a
            file to predict), per file for TSV/CSV and per line for JSONL.
        text_columns: columns that must hold text: a row where one is blank (empty or only whitespace) is no
            example, left out with one warning ("drop") or refused ("error") as `blank_lines` says.
        blank_lines: "drop" or "error", for rows with a blank text column.

    Raises:
        ValueError: a column is missing (naming `path:line`, the column and the available ones), a row has
            the wrong number of fields, a JSONL line is not a JSON object, a text column is blank with
            blank_lines="error", or the file has no records.
    """
    path = find_file(path)
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
    if text_columns:
        rows = _without_blank_texts(path, rows, text_columns, blank_lines)
    if strip:
        rows = [Row(r.path, r.line, {k: v.strip() for k, v in r.values.items()}) for r in rows]
    return rows


def _without_blank_texts(path: Path, rows: list[Row], text_columns: Sequence[str],
                         blank_lines: BlankLines) -> list[Row]:
    _check_blank_lines(blank_lines)
    kept, blank = [], []
    for row in rows:
        column = next((c for c in text_columns if _blank(row[c])), None)
        if column is None:
            kept.append(row)
            continue
        if blank_lines == "error":
            raise _blank_error(row.where, repr(column), "row")
        blank.append(row)
    what = " or ".join(repr(c) for c in text_columns)
    _warn_blank(len(blank), len(rows), "rows", f"a blank {what}", blank[0].where if blank else "")
    if not kept:
        raise ValueError(f"{path}: every row has a blank {what}, so there is no example")
    return kept


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _check_blank_lines(blank_lines: str) -> None:
    if blank_lines not in ("drop", "error"):
        raise ValueError(f"blank_lines={blank_lines!r}, must be 'drop' or 'error'")


def _blank_error(where: str, what: str, example: str) -> ValueError:
    return ValueError(f"{where}: {what} is blank (empty or only whitespace), so the {example} is no example; "
                      f"fix or remove it, or set blank_lines=drop to leave such {example}s out with a warning")


def _warn_blank(dropped: int, total: int, examples: str, what: str, first: str) -> None:
    if dropped:
        rank_zero_warn(f"left out {dropped} of {total} {examples} with {what} (the first at {first}); "
                       "set blank_lines=error to stop at them instead")


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
