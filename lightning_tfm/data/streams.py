"""Reading corpora as streams: lines of plain or compressed files and line-aligned pairs, one at a time, so a
corpus larger than memory can be prepared (`data/prepare.py`). The rules and the errors are those of `readers`
(which reads whole files): UTF-8, "\\n" line ends with one "\\r" dropped, a truncated or corrupt archive named,
blank pairs dropped with one warning or refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lightning_tfm.data.compressed import byte_chunks, compressed_look, find_file
from lightning_tfm.data.readers import BlankLines, Pair, _blank, _blank_error, _check_blank_lines, _warn_blank


def iter_lines(path: str | Path, keep_ends: bool = False) -> Iterator[str]:
    """The lines of a file without their line ends, read in chunks (`readers.read_lines` without holding the
    file); a path without its suffix finds its one compressed sibling. With `keep_ends` every line keeps its
    "\\n" (and "\\r"), so the lines join to exactly `readers.read_text`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty or only whitespace, invalid UTF-8 (naming `path:line`), a truncated or corrupt archive.
    """
    path = find_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    carry, number, text_seen, size = b"", 0, False, 0
    for chunk in byte_chunks(path):
        size += len(chunk)
        *complete, carry = (carry + chunk).split(b"\n")
        for raw in complete:
            number += 1
            line = _decode_line(path, number, raw + b"\n" if keep_ends else raw, keep_ends)
            text_seen = text_seen or not _blank(line)
            yield line
    if carry:
        number += 1
        line = _decode_line(path, number, carry, keep_ends)
        text_seen = text_seen or not _blank(line)
        yield line
    if not text_seen:
        raise ValueError(f"{path} is empty" + (" once decompressed" if path.stat().st_size else "") if size == 0
                         else f"{path} holds no text, only whitespace ({size} byte{'s' * (size > 1)})")


def _decode_line(path: Path, number: int, raw: bytes, keep_ends: bool) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        looks = compressed_look(raw) if number == 1 else None
        hint = f"; it looks like a {looks} file: add that suffix to its name" if looks else ""
        raise ValueError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line, "
                         f"{raw[e.start:e.end]!r}){hint}") from e
    return line if keep_ends or not line.endswith("\r") else line[:-1]


def iter_pairs(source_path: str | Path, target_path: str | Path, blank_lines: BlankLines = "drop") -> Iterator[Pair]:
    """Line-aligned pairs as `readers.read_pairs` gives them, one at a time.

    Raises:
        ValueError: the files have different line counts (when the shorter ends), a blank line with
            blank_lines="error", no pair with text on both sides, or any error of `iter_lines`.
    """
    _check_blank_lines(blank_lines)
    source_path, target_path = find_file(source_path), find_file(target_path)
    sources, targets = iter_lines(source_path), iter_lines(target_path)
    line, kept, dropped, first = 0, 0, 0, ""
    for line, source in enumerate(sources, start=1):
        target = next(targets, None)
        if target is None:
            raise ValueError(f"{source_path} has more lines than {target_path} ({target_path} ends after line "
                             f"{line - 1}); line-aligned files need one target line per source line")
        side = "source" if _blank(source) else "target" if _blank(target) else None
        if side is None:
            kept += 1
            yield Pair(source, target, line)
            continue
        where = f"{source_path if side == 'source' else target_path}:{line}"
        if blank_lines == "error":
            raise _blank_error(where, f"the {side} line", "pair")
        first, dropped = first or where, dropped + 1
    if next(targets, None) is not None:
        raise ValueError(f"{target_path} has more lines than {source_path} ({source_path} ends after line {line}); "
                         "line-aligned files need one target line per source line")
    _warn_blank(dropped, line, "pairs", "a blank source or target line", first)
    if not kept:
        raise ValueError(f"{source_path} and {target_path}: no line pair holds text on both sides")
