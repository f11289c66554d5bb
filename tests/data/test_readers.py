import csv
import gzip
import json
from collections import Counter

import pytest

from lightning_tfm.data.readers import is_table, read_lines, read_parallel, read_table, read_text, table_format


def test_read_lines_splits_on_newline_only_and_drops_cr(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes("one\r\ntwo\u2028still two\nthree\n".encode())
    assert read_lines(path) == ["one", "two\u2028still two", "three"]


def test_gz_reads_the_same_as_plain(tmp_path, data_dir):
    text = (data_dir / "multi30k" / "val.de").read_bytes()
    (tmp_path / "val.de.gz").write_bytes(gzip.compress(text))
    assert read_lines(tmp_path / "val.de.gz") == read_lines(data_dir / "multi30k" / "val.de")
    assert len(read_lines(tmp_path / "val.de.gz")) == 1014


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        read_lines(tmp_path / "empty.txt")
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match=r"empty\.txt\.gz is empty"):
        read_text(tmp_path / "empty.txt.gz")
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"broken\.txt\.gz: not a valid gzip file"):
        read_text(tmp_path / "broken.txt.gz")


@pytest.mark.parametrize("name", ["bad.txt", "bad.txt.gz"])
def test_utf8_errors_name_file_and_line(tmp_path, name):
    data = b"fine\nstill fine\nbroken \xff here\nafter\n"
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}:3: not valid UTF-8 .*byte 8 of the line"):
        read_lines(tmp_path / name)


def test_read_parallel_pairs_multi30k_lines(data_dir):
    pairs = read_parallel(data_dir / "multi30k" / "train.en", data_dir / "multi30k" / "train.de")
    assert len(pairs) == 29000  # multi30k/SOURCE.md
    assert pairs[0] == ("Two young, White males are outside near many bushes.",
                        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.")


def test_read_parallel_names_both_files_and_counts(tmp_path):
    (tmp_path / "a.en").write_text("1\n2\n3\n")
    (tmp_path / "b.de").write_text("1\n2\n")
    with pytest.raises(ValueError, match=r"a\.en has 3 lines but .*b\.de has 2"):
        read_parallel(tmp_path / "a.en", tmp_path / "b.de")


def test_sst2_tsv_matches_the_stdlib_reference_loader(data_dir):
    path = data_dir / "sst2" / "dev.tsv"
    rows = read_table(path, ["sentence", "label"])
    with open(path, encoding="utf-8", newline="") as f:  # the loader in shared/data/README.md
        reference = [(s.strip(), y) for s, y in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    assert [(r["sentence"], r["label"]) for r in rows] == reference
    assert Counter(r["label"] for r in rows) == {"0": 428, "1": 444}  # sst2/SOURCE.md
    assert rows[0]["sentence"] == "it 's a charming and often affecting journey ."  # trailing space stripped
    assert rows[0].where == f"{path}:2"


def test_ag_news_csv_matches_dictreader(data_dir):
    path = data_dir / "ag_news" / "test.csv"
    rows = read_table(path, ["label", "text"], strip=False)
    with open(path, encoding="utf-8", newline="") as f:
        reference = [(r["label"], r["text"]) for r in csv.DictReader(f)]
    assert [(r["label"], r["text"]) for r in rows] == reference
    assert Counter(r["label"] for r in rows) == {k: 1900 for k in ("World", "Sports", "Business", "Sci/Tech")}


def test_csv_line_numbers_follow_multiline_fields(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('label,text\na,"two\nlines"\n\nb,one line\n')
    rows = read_table(path, ["text", "label"])
    assert [(r.line, r["text"], r["label"]) for r in rows] == [(2, "two\nlines", "a"), (5, "one line", "b")]


def test_missing_column_names_file_line_column_and_header(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(ValueError, match=r"x\.tsv:1: no column 'text' .*available columns: \['sentence', 'label'\]"):
        read_table(path, ["text", "label"])


def test_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("sentence\tlabel\nok\t1\nhas\ta tab\t0\n")
    with pytest.raises(ValueError, match=r"x\.tsv:3: expected 2 fields .*found 3"):
        read_table(path, ["sentence", "label"])


def test_tsv_reads_quotes_as_text(tmp_path):
    path = tmp_path / "x.tsv.gz"
    path.write_bytes(gzip.compress(b'sentence\tlabel\n"quoted" start \t1\n'))
    assert read_table(path, ["sentence"])[0]["sentence"] == '"quoted" start'


def test_jsonl_values_line_numbers_and_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": "neg", "extra": [1]}]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    rows = read_table(path, ["text", "label"])
    assert [(r.line, r.values) for r in rows] == [(1, {"text": "a", "label": "1"}), (3, {"text": "b", "label": "neg"})]
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: no key 'label'; available keys: \['text'\]"):
        read_table(path, ["text", "label"])
    assert [r.values for r in read_table(path, ["text"], optional=["label"])] == [{"text": "a", "label": "1"},
                                                                                 {"text": "b"}]
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: invalid JSON"):
        read_table(path, ["text"])
    path.write_text('["text"]\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:1: expected a JSON object, found list"):
        read_table(path, ["text"])
    path.write_text('{"text": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:1: key 'text' holds \[\"a\", \"b\"\]"):
        read_table(path, ["text"])


def test_header_only_table_has_no_records(tmp_path):
    (tmp_path / "x.csv").write_text("label,text\n")
    with pytest.raises(ValueError, match=r"x\.csv has no records below its header"):
        read_table(tmp_path / "x.csv", ["text"])


def test_format_from_suffix(tmp_path):
    assert [table_format(p) for p in ("a.tsv", "a.CSV", "a.jsonl.gz", "a.ndjson")] == ["tsv", "csv", "jsonl", "jsonl"]
    assert is_table("b.tsv.gz") and not is_table("../multi30k/train") and not is_table("train.en")
    with pytest.raises(ValueError, match=r"x\.txt: cannot tell the table format from the suffix '\.txt'"):
        read_table(tmp_path / "x.txt", ["text"])
