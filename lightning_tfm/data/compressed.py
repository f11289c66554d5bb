"""Compressed corpora: gzip (`.gz`), xz (`.xz`) and Zstandard (`.zst`) files, told apart by their suffix and
decompressed as they are read, so a corpus is used as it was downloaded. A path without the suffix stands for its
one compressed sibling when the plain file does not exist (`train.en` finds `train.en.gz`). A truncated or corrupt
archive is a ValueError naming the file and what is wrong, never the codec's own exception.
"""

from __future__ import annotations

import gzip
import lzma
import zlib
from pathlib import Path
from typing import Iterator

SUFFIXES = (".gz", ".xz", ".zst")
_CODECS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
_MAGIC = {b"\x1f\x8b": ".gz", b"\xfd7zXZ\x00": ".xz", b"\x28\xb5\x2f\xfd": ".zst"}   # each format's first bytes
_CHUNK = 1 << 20                                                                    # compressed bytes per read


def is_compressed(path: str | Path) -> bool:
    """Whether the path ends in `.gz`, `.xz` or `.zst` (any case)."""
    return Path(path).suffix.lower() in SUFFIXES


def find_file(path: str | Path) -> Path:
    """The file to read for `path`: `path` itself when it is a file or ends in a compression suffix, else its one
    sibling `path.gz`, `path.xz` or `path.zst` that exists, else `path` (for the caller's "does not exist").

    Raises:
        ValueError: `path` does not exist and several compressed siblings do (all are named).
    """
    path = Path(path)
    if path.is_file() or is_compressed(path):
        return path
    found = [Path(f"{path}{suffix}") for suffix in SUFFIXES if Path(f"{path}{suffix}").is_file()]
    if len(found) > 1:
        raise ValueError(f"{path} does not exist and {len(found)} compressed files could stand for it: "
                         f"{', '.join(map(str, found))}; keep only one of them")
    return found[0] if found else path


def read_bytes(path: Path) -> bytes:
    """The bytes of a file, decompressed when its suffix is `.gz`, `.xz` or `.zst`. Concatenated gzip members,
    xz streams and zstd frames (`cat a.gz b.gz`, `pzstd`) are read one after the other, as their tools do.

    Raises:
        ValueError: the archive is truncated or corrupt, naming the file and what its decoder found.
    """
    return path.read_bytes() if path.suffix.lower() not in _CODECS else b"".join(byte_chunks(path))


def byte_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks of about `_CHUNK`, decompressed by its suffix as `read_bytes` does, so a corpus
    larger than memory can be streamed.

    Raises:
        ValueError: as `read_bytes`, when the stream reaches the damage.
    """
    suffix = path.suffix.lower()
    codec = _CODECS.get(suffix)
    if suffix == ".zst":
        yield from _zstd_chunks(path)
        return
    opener = gzip.open if suffix == ".gz" else lzma.open if suffix == ".xz" else open
    try:
        with opener(path, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")
    except EOFError as e:
        raise _truncated(path, codec) from e
    except (gzip.BadGzipFile, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(path, codec or "plain", e) from e


def compressed_look(data: bytes) -> str | None:
    """The suffix of the compression format `data` starts like (".gz", ".xz", ".zst"), or None: a compressed
    file saved without its suffix reads as invalid UTF-8, and this names what it really is."""
    return next((suffix for magic, suffix in _MAGIC.items() if data.startswith(magic)), None)


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    import zstandard  # only .zst corpora need it

    # decompressobj rather than stream_reader: the reader returns a truncated frame's bytes without a word, while a
    # frame object says whether it reached its end (`eof`), so a cut file is caught
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                while chunk:                    # one chunk may end a frame and start the next
                    out, in_frame, chunk = frame.decompress(chunk), True, b""
                    if out:
                        yield out
                    if frame.eof:
                        chunk, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
    except zstandard.ZstdError as e:
        raise _corrupt(path, "zstd", e) from e
    if in_frame:
        raise _truncated(path, "zstd")


def _truncated(path: Path, codec: str | None) -> ValueError:
    return ValueError(f"{path}: truncated {codec} file: it ends before its end-of-stream marker (an interrupted "
                      "download or copy?); fetch or compress it again")


def _corrupt(path: Path, codec: str, error: Exception) -> ValueError:
    return ValueError(f"{path}: not a valid {codec} file, or a corrupt one ({error})")
