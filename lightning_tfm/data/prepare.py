"""Prepare once: tokenize a task's raw splits into memory-mapped rows (`shards.py`) plus a manifest, in worker
processes, with a progress bar; read them back, refusing whatever no longer matches.

`<prepared_dir>/manifest.json` records what the rows were made from: every source file (path, size, mtime and
SHA-256), the tokenizer's SHA-256, the datamodule's settings that change the ids (languages, max_len, ...), and
per split the example and token counts, a lengths histogram and each file's size. It is written last and
atomically; a rebuild deletes it first. So a folder either has a manifest whose files are all complete, or none.

Besides its tokenized texts an example may carry integer values that are not text (a classifier's label indices):
each such field is one int64 row per example, and the manifest records the names its values index (the label
set), so a later run learns them without reading the raw files.

A datamodule opts in by implementing `Preparable` (the translation, language-model and classification
datamodules do); `prepare` drives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer

from lightning_tfm.data.shards import LENGTH_EDGES, TEXT, Rows, RowWriter, histogram_counts, histogram_dict, token_dtype
from lightning_tfm.data.tokenize_workers import Framing, tokenized_chunks

FORMAT = 1
VALUES = "int64"        # dtype of a value field's rows: any integer, a negative one included


@dataclass
class Example:
    """One raw example: its texts, one per tokenized field; the line it came from (for errors); and its values,
    one row of integers per value field (`Preparable.prepared_values`), e.g. ((2,),) for class 2."""

    texts: tuple[str, ...]
    line: int
    values: tuple[Sequence[int], ...] = ()


@dataclass
class PreparedSplit:
    """The rows of a prepared split, by field: token ids, raw texts (where `keeps_text`), and values."""

    tokens: dict[str, Rows]
    texts: dict[str, Rows]
    values: dict[str, Rows]


class Preparable(Protocol):
    """What a datamodule provides to be prepared (see `TranslationDataModule`)."""

    prepared_dir: str | None

    @property
    def tokenizer(self) -> Tokenizer: ...

    def prepared_splits(self) -> list[str]:
        """The configured splits to prepare, e.g. ["train", "val", "test"]."""

    def prepared_fields(self) -> tuple[str, ...]:
        """Names of the tokenized fields of an example, e.g. ("src", "tgt")."""

    def prepared_values(self) -> dict[str, list[str] | None]:
        """The integer fields of an example besides its tokens, in `Example.values` order, each with the names
        its values index (recorded in the manifest, see `recorded_names`) or None, e.g. {"labels": ["neg",
        "pos"]}; {} for none."""

    def prepared_settings(self) -> dict[str, Any]:
        """Every setting besides the tokenizer that changes the prepared ids."""

    def source_files(self, split: str) -> list[str]:
        """The raw files a split is read from."""

    def raw_examples(self, split: str) -> Iterator[Example]:
        """The split's examples, streamed."""

    def keeps_text(self, split: str) -> bool:
        """Whether the split's raw strings are stored beside its ids (what evaluation shows or scores)."""

    def framing(self, split: str, field: str) -> Framing:
        """The special tokens a field's rows get and its max_len rule."""

    def too_long(self, split: str, field: str, where: str, length: int) -> ValueError:
        """The error for a row of `length` ids (special tokens included) over max_len, at `where` (path:line)."""

    def truncated(self, split: str, field: str, count: int, total: int, first: str) -> None:
        """Warn once that `count` of `total` rows were cut to max_len, the first at `first` (path:line)."""


# --- fingerprints ------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path)}


def _unchanged(record: dict[str, Any], path: str) -> bool:
    """The same content: the same size, and the same path and mtime or (moved or touched since) the same SHA-256."""
    resolved = Path(path).resolve()
    if not resolved.is_file() or resolved.stat().st_size != record["bytes"]:
        return False
    if str(resolved) == record["path"] and resolved.stat().st_mtime_ns == record["mtime_ns"]:
        return True
    return file_sha256(resolved) == record["sha256"]


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


# --- checking ----------------------------------------------------------------------------------------------


def manifest_path(dm: Preparable) -> Path:
    return Path(dm.prepared_dir or ".") / "manifest.json"


def read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e}); prepare the data again with --rebuild") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lightning_tfm manifest of format {FORMAT}; prepare again with --rebuild")
    return manifest


def mismatch(manifest: dict[str, Any], dm: Preparable) -> str | None:
    """Why the prepared rows no longer fit `dm`'s tokenizer, settings or raw files; None if they do."""
    if manifest["task"] != type(dm).__name__:
        return f"it was prepared for {manifest['task']}, not {type(dm).__name__}"
    if manifest["tokenizer_sha256"] != tokenizer_sha256(dm.tokenizer):
        return "it was prepared with another tokenizer than this run's"
    return _data_mismatch(manifest, dm)


def recorded_names(dm: Preparable, field: str) -> list[str] | None:
    """The names the values of `field` index (a label set, needed to size a model's head before any data is
    read), as an up-to-date manifest recorded them, so a prepared run never reads its raw files; None without a
    manifest or when the settings or raw files changed since (the raw files decide then, and `open_split`
    refuses the rows). The tokenizer is not checked: the names do not depend on it, and loading it may train it."""
    manifest = read_manifest(manifest_path(dm))
    if manifest is None or manifest["task"] != type(dm).__name__ or _data_mismatch(manifest, dm):
        return None
    return manifest.get("value_names", {}).get(field)


def _data_mismatch(manifest: dict[str, Any], dm: Preparable) -> str | None:
    settings = dm.prepared_settings()
    changed = [k for k in sorted(set(settings) | set(manifest["settings"]))
               if settings.get(k) != manifest["settings"].get(k)]
    if changed:
        return "these data settings changed since: " + ", ".join(
            f"{k} {manifest['settings'].get(k)!r} -> {settings.get(k)!r}" for k in changed)
    for split in dm.prepared_splits():
        if split not in manifest["splits"]:
            return f"it has no {split} split"
        records, files = manifest["splits"][split]["sources"], dm.source_files(split)
        if len(records) != len(files):
            return f"the {split} split is read from other files now"
        for record, path in zip(records, files):
            if not _unchanged(record, path):
                return f"{path} changed since it was prepared"
    return None


def open_split(dm: Preparable, split: str) -> PreparedSplit:
    """A prepared split's rows, after checking the manifest against `dm`.

    Raises:
        ValueError: no manifest (naming the command that writes it), a mismatch, a missing or truncated file.
    """
    path = manifest_path(dm)
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"data.prepared_dir={dm.prepared_dir} holds no manifest.json; run lightning_tfm prepare "
                         "--config CONFIG first (fit prepares it too)")
    problem = mismatch(manifest, dm)
    if problem:
        raise ValueError(f"{path}: {problem}; run lightning_tfm prepare --config CONFIG --rebuild")
    record = manifest["splits"][split]
    folder = path.parent
    tokens = {field: Rows(folder, f"{split}.{field}", record["fields"][field]) for field in dm.prepared_fields()}
    texts = {field: Rows(folder, f"{split}.{field}.text", record["texts"][field]) for field in record["texts"]}
    values = {field: Rows(folder, f"{split}.{field}", r) for field, r in record.get("values", {}).items()}
    counts = {len(rows) for rows in [*tokens.values(), *texts.values(), *values.values()]}
    if counts != {record["examples"]}:
        raise ValueError(f"{folder}: the {split} files hold {sorted(counts)} rows, the manifest says "
                         f"{record['examples']}; prepare again with --rebuild")
    return PreparedSplit(tokens, texts, values)


# --- writing -----------------------------------------------------------------------------------------------


def prepare(dm: Preparable, workers: int = 1, rebuild: bool = False, progress: bool = True) -> str:
    """Write `dm`'s splits to `dm.prepared_dir` unless an up-to-date manifest is there; a one-line report.

    Raises:
        ValueError: the prepared data is stale and `rebuild` is False (naming why), or any data error.
    """
    if not dm.prepared_dir:
        raise ValueError("data.prepared_dir is not set: say where to write the prepared data")
    path = manifest_path(dm)
    old = read_manifest(path) if not rebuild else None
    if old is not None:
        problem = mismatch(old, dm)
        if problem is None:
            return f"{path}: up to date, nothing to do"
        raise ValueError(f"{path}: {problem}; rerun with --rebuild to prepare it again (the files are replaced)")
    path.unlink(missing_ok=True)     # from here the old rows are being replaced: no manifest vouches for them
    started, splits = time.perf_counter(), {}
    for split in dm.prepared_splits():
        splits[split] = _write_split(dm, split, workers, progress)
    manifest = {"format": FORMAT, "task": type(dm).__name__, "tokenizer_sha256": tokenizer_sha256(dm.tokenizer),
                "vocab_size": dm.tokenizer.get_vocab_size(with_added_tokens=True),
                "settings": dm.prepared_settings(), "value_names": dm.prepared_values(), "splits": splits}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    seconds = time.perf_counter() - started
    lines = sum(s["examples"] for s in splits.values())
    tokens = sum(sum(s["tokens"].values()) for s in splits.values())
    return (f"prepared {lines:,} examples, {tokens:,} tokens in {seconds:.1f} s ({lines / seconds:,.0f} examples/s, "
            f"{tokens / seconds:,.0f} tokens/s) into {path.parent}")


def _write_split(dm: Preparable, split: str, workers: int, progress: bool) -> dict[str, Any]:
    folder, fields, files = Path(dm.prepared_dir or "."), dm.prepared_fields(), dm.source_files(split)
    sources = [fingerprint(f) for f in files]
    dtype = token_dtype(dm.tokenizer.get_vocab_size(with_added_tokens=True))
    writers = {f: RowWriter(folder, f"{split}.{f}", dtype) for f in fields}
    texts = {f: RowWriter(folder, f"{split}.{f}.text", TEXT) for f in fields} if dm.keeps_text(split) else {}
    values = {f: RowWriter(folder, f"{split}.{f}", VALUES) for f in dm.prepared_values()}
    framings = [dm.framing(split, f) for f in fields]
    lengths = np.zeros(len(LENGTH_EDGES) + 1, dtype=np.int64)
    cut: dict[str, list[Any]] = {f: [0, ""] for f in fields}          # per field: rows truncated, the first
    bar = _progress(split, progress)
    try:
        for chunk, framed in tokenized_chunks(dm.tokenizer, dm.raw_examples(split), framings, dtype, workers):
            for k, (field, ids) in enumerate(zip(fields, framed)):
                where = lambda i: f"{files[min(k, len(files) - 1)]}:{chunk[i].line}"  # noqa: E731
                if ids.too_long is not None:
                    raise dm.too_long(split, field, where(ids.too_long[0]), ids.too_long[1])
                if ids.cut:
                    cut[field] = [cut[field][0] + len(ids.cut), cut[field][1] or where(ids.cut[0])]
                writers[field].add_flat(ids.flat, ids.lengths)
                if k == 0:
                    lengths += histogram_counts(ids.lengths)
                if texts:
                    texts[field].add([e.texts[k].encode("utf-8") for e in chunk])
            for k, writer in enumerate(values.values()):
                writer.add([e.values[k] for e in chunk])
            bar.update(len(chunk))
            tokens, elapsed = sum(w.values for w in writers.values()), bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix_str(f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
    except BaseException:
        for writer in [*writers.values(), *texts.values(), *values.values()]:
            writer.abandon()
        raise
    finally:
        bar.close()
    records = {f: w.finish() for f, w in writers.items()}
    for field, (count, first) in cut.items():
        if count:
            dm.truncated(split, field, count, records[field]["rows"], first)
    return {"sources": sources, "examples": records[fields[0]]["rows"],
            "tokens": {f: r["values"] for f, r in records.items()}, "lengths_histogram": histogram_dict(lengths),
            "fields": records, "texts": {f: w.finish() for f, w in texts.items()},
            "values": {f: w.finish() for f, w in values.items()}}


def _progress(split: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc=f"prepare {split}", unit=" examples", unit_scale=True, disable=not enabled, file=sys.stderr,
                mininterval=0.5)
