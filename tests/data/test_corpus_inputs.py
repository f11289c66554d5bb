"""Every corpus a user brings is read or refused clearly (issue 22): gzip, xz and zstd files read exactly as the
plain file does, a path without the suffix finds its compressed sibling, and a truncated or corrupt archive, a file
without text, or a blank line is a ValueError, or one warning, naming the file and line. The archives are written
here by the codecs' own libraries (gzip, lzma, zstandard), from slices of the real data."""

import gzip
import json
import lzma
import re
import warnings
from pathlib import Path

import pytest
import zstandard
from commands import error_line
from datamodule_settings import build

import lightning_tfm.data.compressed as compressed
from lightning_tfm.data import (
    ClassificationDataModule,
    LanguageModelDataModule,
    MaskedLMDataModule,
    TranslationDataModule,
)
from lightning_tfm.data.readers import read_lines, read_pairs, read_table, read_text
from lightning_tfm.data.streams import iter_lines, iter_pairs

COMPRESS = {".gz": gzip.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data)}
CODEC = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
MT = "configs/translation/multi30k_small.yaml"


def write(path: Path, data: bytes | str, suffix: str = "") -> Path:
    """`data` written to `path` + `suffix`, compressed by that suffix's codec ("" for a plain file)."""
    data = data.encode() if isinstance(data, str) else data
    out = Path(f"{path}{suffix}")
    out.write_bytes(COMPRESS[suffix](data) if suffix else data)
    return out


def head(path: Path, n: int) -> bytes:
    return b"".join(path.read_bytes().splitlines(keepends=True)[:n])


def caught(call):
    """`call()`'s result and the messages of the warnings it raised (every one, repeats included)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in seen]


# --- compressed files read as the plain file ---------------------------------------------------------------------

@pytest.mark.parametrize("suffix", COMPRESS)
def test_compressed_files_read_as_the_plain_file(tmp_path, data_dir, suffix):
    sources = {"text.txt": head(data_dir / "tiny_shakespeare" / "input.txt", 200),
               "p.en": head(data_dir / "multi30k" / "val.en", 50), "p.de": head(data_dir / "multi30k" / "val.de", 50),
               "t.tsv": head(data_dir / "sst2" / "dev.tsv", 40), "t.csv": head(data_dir / "ag_news" / "test.csv", 40)}
    sources["t.jsonl"] = "".join(json.dumps({"en": e, "de": d}) + "\n" for e, d in zip(
        sources["p.en"].decode().splitlines(), sources["p.de"].decode().splitlines())).encode()
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    for name, data in sources.items():
        write(plain / name, data)
        write(packed / name, data, suffix)
    assert read_text(packed / f"text.txt{suffix}") == read_text(plain / "text.txt")
    assert read_lines(packed / f"p.de{suffix}") == read_lines(plain / "p.de")
    assert read_pairs(packed / f"p.en{suffix}", packed / f"p.de{suffix}") == read_pairs(plain / "p.en", plain / "p.de")
    assert list(iter_lines(packed / "p.de")) == read_lines(plain / "p.de")           # streamed (prepare) alike
    assert list(iter_pairs(packed / "p.en", packed / "p.de")) == read_pairs(plain / "p.en", plain / "p.de")
    for table, columns in (("t.tsv", ["sentence", "label"]), ("t.csv", ["label", "text"]), ("t.jsonl", ["en", "de"])):
        theirs, ours = read_table(plain / table, columns), read_table(packed / f"{table}{suffix}", columns)
        assert [(r.line, r.values) for r in ours] == [(r.line, r.values) for r in theirs] and len(ours) > 30
        assert ours[0].path == f"{packed / table}{suffix}"          # errors name the file that was read


@pytest.mark.parametrize("suffix", COMPRESS)
def test_concatenated_members_and_frames_read_whole(tmp_path, monkeypatch, suffix):
    # `cat a.gz b.gz`, several xz streams, pzstd's frames; tiny reads put frame ends inside a chunk
    monkeypatch.setattr(compressed, "_CHUNK", 5)
    path = tmp_path / f"x.txt{suffix}"
    path.write_bytes(COMPRESS[suffix](b"one\ntwo\n") + COMPRESS[suffix](b"three\n"))
    assert read_lines(path) == list(iter_lines(path)) == ["one", "two", "three"]


@pytest.mark.parametrize("suffix", COMPRESS)
def test_a_path_without_the_suffix_finds_the_compressed_file(tmp_path, suffix):
    write(tmp_path / "train.en", "a dog .\na cat .\n", suffix)
    write(tmp_path / "train.de", "ein Hund .\neine Katze .\n", ".gz")      # each side is found on its own
    pairs = read_pairs(tmp_path / "train.en", tmp_path / "train.de")
    assert [(p.source, p.target, p.line) for p in pairs] == [("a dog .", "ein Hund .", 1),
                                                             ("a cat .", "eine Katze .", 2)]
    write(tmp_path / "t.tsv", "sentence\tlabel\nfine \t1\n", suffix)
    (row,) = read_table(tmp_path / "t.tsv", ["sentence", "label"])
    assert row.values == {"sentence": "fine", "label": "1"} and row.where == f"{tmp_path / 't.tsv'}{suffix}:2"
    write(tmp_path / "train.en", "the plain file wins\n")
    assert read_lines(tmp_path / "train.en") == ["the plain file wins"]


def test_two_compressed_candidates_are_an_error_naming_both(tmp_path):
    first, second = write(tmp_path / "train.en", "a\n", ".gz"), write(tmp_path / "train.en", "b\n", ".zst")
    write(tmp_path / "train.de", "x\n")
    both = re.escape(f"{first}, {second}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'train.en'))} does not exist and 2 compressed "
                                         rf"files could stand for it: {both}; keep only one of them"):
        read_pairs(tmp_path / "train.en", tmp_path / "train.de")


# --- broken archives and files without text ----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", COMPRESS)
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_an_archive"])
def test_broken_archives_are_a_value_error_naming_the_file(tmp_path, data_dir, suffix, damage):
    data = COMPRESS[suffix](head(data_dir / "multi30k" / "val.en", 300))
    if damage == "truncated":                          # an interrupted download
        data = data[: len(data) // 2]
    elif damage == "corrupt":                          # one flipped byte in the middle of the stream
        data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
    else:
        data = b"plain text under a compressed name\n"
    path = tmp_path / f"val.en{suffix}"
    path.write_bytes(data)
    what = rf"truncated {CODEC[suffix]} file" if damage == "truncated" else \
        rf"not a valid {CODEC[suffix]} file, or a corrupt one \(.+\)"
    for read in (read_lines, lambda p: list(iter_lines(p))):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {what}"):
            read(path)


def test_a_compressed_file_without_its_suffix_is_named_for_what_it_is(tmp_path):
    path = write(tmp_path / "train.en", gzip.compress(b"a dog .\n"))
    with pytest.raises(ValueError, match=r"train\.en:1: not valid UTF-8 .*; it looks like a \.gz file: add that "
                                         r"suffix to its name"):
        read_lines(path)
    with pytest.raises(ValueError, match=r"train\.en:1: not valid UTF-8 .*; it looks like a \.gz file"):
        list(iter_lines(path))


@pytest.mark.parametrize("suffix", ["", *COMPRESS])
@pytest.mark.parametrize("data", [b"", b"\n", b"\n \n\t\r\n"], ids=["empty", "newline", "whitespace"])
def test_a_file_without_text_is_a_value_error_naming_it(tmp_path, suffix, data):
    path = write(tmp_path / "train.en", data, suffix)
    write(tmp_path / "train.de", "ein Hund .\n" * data.count(b"\n"))
    found = "is empty" if not data else rf"holds no text, only whitespace \({len(data)} bytes?\)$"
    message = rf"^{re.escape(str(path))} {found}"
    for read in (lambda: read_text(tmp_path / "train.en"), lambda: read_pairs(path, tmp_path / "train.de"),
                 lambda: list(iter_pairs(path, tmp_path / "train.de"))):
        with pytest.raises(ValueError, match=message):
            read()
    jsonl = write(tmp_path / "t.jsonl", data, suffix)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(jsonl))} (is empty|holds no text)"):
        read_table(jsonl, ["text"])


# --- blank lines -------------------------------------------------------------------------------------------------

def blank_pairs(folder: Path, suffix: str = "") -> tuple[Path, Path]:
    """Six pairs; blank: the source of 2, the target of 4 (whitespace), both sides of 5."""
    source = write(folder / "train.en", "dog .\n\na cat .\na bird .\n  \na fish .\n", suffix)
    target = write(folder / "train.de", "ein Hund .\neine Maus .\neine Katze .\n \t\n\nein Fisch .\n", suffix)
    return source, target


def test_blank_pairs_are_dropped_with_one_warning_naming_the_first(tmp_path):
    source, target = blank_pairs(tmp_path)
    for read in (read_pairs, lambda s, t: list(iter_pairs(s, t))):
        pairs, messages = caught(lambda: read(source, target))
        assert [(p.line, p.source, p.target) for p in pairs] == [
            (1, "dog .", "ein Hund ."), (3, "a cat .", "eine Katze ."), (6, "a fish .", "ein Fisch .")]
        assert messages == [f"left out 3 of 6 pairs with a blank source or target line (the first at {source}:2); "
                            "set blank_lines=error to stop at them instead"]


def test_blank_lines_error_names_the_file_and_line(tmp_path):
    source, target = blank_pairs(tmp_path)
    (tmp_path / "train.en").write_text("dog .\nno longer blank\na cat .\na bird .\n  \na fish .\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(target))}:4: the target line is blank \(empty or only "
                                         r"whitespace\), so the pair is no example; fix or remove it, or set "
                                         r"blank_lines=drop to leave such pairs out with a warning$"):
        read_pairs(source, target, blank_lines="error")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(target))}:4: the target line is blank"):
        list(iter_pairs(source, target, blank_lines="error"))
    with pytest.raises(ValueError, match=r"blank_lines='skip', must be 'drop' or 'error'"):
        read_pairs(source, target, blank_lines="skip")


def test_files_without_a_pair_holding_text_on_both_sides_are_an_error(tmp_path):
    source, target = write(tmp_path / "a.en", "one\n\n"), write(tmp_path / "a.de", "\neins\n")
    for read in (read_pairs, lambda s, t: list(iter_pairs(s, t))):
        with pytest.raises(ValueError, match=r"a\.en and .*a\.de: no line pair holds text on both sides"):
            caught(lambda: read(source, target))
    short = write(tmp_path / "b.de", "eins\n")
    with pytest.raises(ValueError, match=r"a\.en has more lines than .*b\.de \(.*b\.de ends after line 1\)"):
        list(iter_pairs(source, short))


def test_table_rows_with_a_blank_text_are_dropped_or_refused(tmp_path):
    path = write(tmp_path / "nli.tsv", "premise\thypothesis\tlabel\na man sleeps\the rests\t1\n \tsomeone\t0\n"
                                       "a dog runs\t\t0\nit rains\tit is wet\t1\n")
    columns, texts = ["premise", "hypothesis", "label"], ["premise", "hypothesis"]
    rows, messages = caught(lambda: read_table(path, columns, text_columns=texts))
    assert [r.line for r in rows] == [2, 5]
    assert messages == [f"left out 2 of 4 rows with a blank 'premise' or 'hypothesis' (the first at {path}:3); "
                        "set blank_lines=error to stop at them instead"]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:4: 'hypothesis' is blank .* so the row is no "
                                         r"example"):
        read_table(path, columns, text_columns=["hypothesis"], blank_lines="error")
    assert len(read_table(path, columns)) == 4                     # only text_columns are checked


# --- the DataModules ---------------------------------------------------------------------------------------------

def test_translation_reads_a_compressed_prefix_and_keeps_line_numbers(tmp_path):
    source, target = blank_pairs(tmp_path, ".xz")
    dm = build(TranslationDataModule, train_path=str(tmp_path / "train"), val_path=None, test_path=None,
               tokenization={"save_dir": str(tmp_path / "tok"), "kind": "char"}, truncation={"max_len": 6})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}:3: source has 8 tokens"):
        caught(lambda: dm.dataset("train"))                        # line 3 is the 2nd pair kept: lines are the file's
    assert [f["path"] for f in dm.tokenizer_source()["files"]] == [str(source.resolve()), str(target.resolve())]
    dm = build(TranslationDataModule, train_path=str(tmp_path / "train"), val_path=None, test_path=None,
               tokenization={"save_dir": str(tmp_path / "tok2"), "kind": "char"})
    _, messages = caught(lambda: (dm.prepare_data(), dm.setup("fit")))     # read for the tokenizer, then the data
    assert messages == [f"left out 3 of 6 pairs with a blank source or target line (the first at {source}:2); "
                        "set blank_lines=error to stop at them instead"] and len(dm.dataset("train")) == 3
    dm = build(TranslationDataModule, train_path=str(tmp_path / "train"), val_path=None, test_path=None,
               tokenization={"save_dir": str(tmp_path / "tok"), "kind": "char"}, blank_lines="error")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}:2: the source line is blank"):
        dm.dataset("train")


def test_classification_drops_blank_texts_of_a_compressed_table(tmp_path, data_dir):
    rows = head(data_dir / "sst2" / "dev.tsv", 41).decode().splitlines(keepends=True)
    path = write(tmp_path / "train.tsv", "".join(rows[:5] + [" \t1\n"] + rows[5:]), ".zst")
    dm = build(ClassificationDataModule, train_path=str(tmp_path / "train.tsv"), val_path=None,
               tokenization={"save_dir": str(tmp_path / "tok"), "kind": "char"})
    texts, messages = caught(lambda: list(dm.training_texts()))
    assert texts == [line.split("\t")[0].strip() for line in rows[1:]]
    assert messages == [f"left out 1 of 41 rows with a blank 'sentence' (the first at {path}:6); "
                        "set blank_lines=error to stop at them instead"]
    dm = build(ClassificationDataModule, train_path=str(tmp_path / "train.tsv"), val_path=None, blank_lines="error",
               tokenization={"save_dir": str(tmp_path / "tok"), "kind": "char"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:6: 'sentence' is blank"):
        dm.training_texts().__next__()


@pytest.mark.parametrize("module", [LanguageModelDataModule, MaskedLMDataModule])
def test_text_datamodules_read_a_compressed_file_by_its_plain_name(tmp_path, data_dir, module):
    data = head(data_dir / "tiny_shakespeare" / "input.txt", 100)
    write(tmp_path / "plain.txt", data)
    write(tmp_path / "packed.txt", data, ".gz")
    texts = [list(build(module, train_path=str(tmp_path / name), val_path=None,
                        tokenization={"save_dir": str(tmp_path / "tok")}, val_fraction=0.0).training_texts())
             for name in ("plain.txt", "packed.txt")]
    assert texts[0] == texts[1] and len(texts[0]) > 50


# --- through the CLI ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")   # its calls into jsonargparse 4.53
def test_a_data_error_is_one_line_from_the_cli(in_process, monkeypatch, tmp_path):
    # the training split is read while the datamodule is built (its vocab_size is linked into the model), so the
    # command stops before a Trainer exists
    monkeypatch.delenv("LIGHTNING_TFM_TRACEBACK", raising=False)
    source, _ = blank_pairs(tmp_path, ".gz")
    proc = in_process("fit", "--config", MT, "--trainer.default_root_dir", tmp_path / "run",
                      "--data.train_path", tmp_path / "train", "--data.blank_lines", "error", ok=False)
    assert error_line(proc) == (f"ValueError: {source}:2: the source line is blank (empty or only whitespace), so "
                                "the pair is no example; fix or remove it, or set blank_lines=drop to leave such "
                                "pairs out with a warning")
