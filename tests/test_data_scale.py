"""scripts/data_scale.py: the corpus generators (scripts/synthetic_corpora.py) on a made-up corpus whose lines
name their pair (so alignment and reuse are checked exactly); peak memory (scripts/peak_memory.py) of a command
that allocates a known amount, from a caller that holds more; the growth ratios and the table on made-up
records; one `--quick` run of the script for the translation family on the shipped data (a 1-layer d_model 32
model), and the language model's loader and model timed in this process. Each program start costs ~10 s of
importing, so the end-to-end run is kept to two. Nothing here is timed; rates are only checked to exist."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from commands import DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import data_scale  # noqa: E402
import peak_memory  # noqa: E402
import synthetic_corpora  # noqa: E402


@pytest.fixture
def made_up(tmp_path: Path) -> Path:
    """multi30k/train.{en,de} whose line i is `e<i>` / `d<i>`, a val split, and three LM source files."""
    data = tmp_path / "data"
    for folder in ("multi30k", "tiny_shakespeare", "wikitext2_eval_only"):
        (data / folder).mkdir(parents=True)
    for lang in ("en", "de"):
        (data / f"multi30k/train.{lang}").write_text("".join(f"{lang[0]}{i}\n" for i in range(50)))
        (data / f"multi30k/val.{lang}").write_text(f"val {lang}\n")
    (data / "tiny_shakespeare/input.txt").write_text("First Citizen:\nSpeak, speak.\n")
    for split in ("valid", "test"):
        (data / f"wikitext2_eval_only/wiki.{split}.raw").write_text(f" = {split} = \n\n")
    return data


def test_parallel_corpus_keeps_pairs_aligned_and_is_reused(made_up, tmp_path):
    folder = tmp_path / "mt"
    record = synthetic_corpora.parallel_corpus(made_up, folder, 1000, seed=3)
    en, de = ((folder / f"train.{lang}").read_text().splitlines() for lang in ("en", "de"))
    assert record["generated"] and len(en) == len(de) == 1000
    joined = [len(line.split(" ")) for line in en]
    assert set(joined) == {1, 2, 3}                                  # 1-3 Multi30k pairs each
    assert [line.replace("e", "d") for line in en] == de             # the same pairs, in the same order
    assert (folder / "val.de").read_text() == "val de\n"
    again = synthetic_corpora.parallel_corpus(made_up, folder, 1000, seed=3)
    assert not again["generated"] and again["files"] == record["files"]
    assert (folder / "train.en").read_text().splitlines() == en
    other = synthetic_corpora.parallel_corpus(made_up, tmp_path / "other", 1000, seed=4)
    assert other["generated"] and (tmp_path / "other/train.en").read_text().splitlines() != en


def test_lm_corpus_reaches_the_size_from_the_source_lines(made_up, tmp_path):
    record = synthetic_corpora.lm_corpus(made_up, tmp_path / "lm", 2e-6, seed=0)            # 2,000 bytes
    text = (tmp_path / "lm/train.txt").read_text()
    lines = text.splitlines(keepends=True)
    assert record["generated"] and record["files"] == {"train.txt": len(text.encode())}
    assert 2000 <= len(text.encode()) < 2000 + max(map(len, lines))           # stops at the line that reaches it
    assert set(lines) == {"First Citizen:\n", "Speak, speak.\n", " = valid = \n", " = test = \n", "\n"}
    assert not synthetic_corpora.lm_corpus(made_up, tmp_path / "lm", 2e-6, seed=0)["generated"]


def test_peak_memory_is_the_commands_own_not_the_callers(tmp_path):
    """A child forked straight from this process would report this process's peak (Linux keeps it across exec);
    the launcher's report is the command's own, and the sampled sum sees it too."""
    held = bytearray(300 * 2**20)                    # this process's peak is now above 300 MiB (zeroed: touched)
    command = [sys.executable, "-c", "import time; x = bytearray(64 * 2**20); time.sleep(1)"]
    measured = peak_memory.measure(command, tmp_path / "run.log", tmp_path, dict(os.environ))
    assert len(held) and measured["returncode"] == 0 and measured["wall_s"] >= 1
    assert 64 < measured["peak_rss_mib"] < 64 + 100                 # the command's bytes and its interpreter
    assert 64 < measured["all_processes_pss_mib"] < 64 + 100
    assert 64 < measured["all_processes_anon_pss_mib"] <= measured["all_processes_pss_mib"]   # the bytearray's pages
    failed = peak_memory.measure([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"],
                                 tmp_path / "failed.log", tmp_path, dict(os.environ))
    assert failed["returncode"] == 3 and (tmp_path / "failed.log").read_text() == "out\n"


def _corpus(name: str, tokens: float, rss: float, pss: float) -> dict:
    """A made-up record of one corpus, as data_scale.main writes it."""
    measured = {"peak_rss_mib": rss, "all_processes_pss_mib": pss, "all_processes_anon_pss_mib": pss / 2}
    return {"family": name.split("_")[0], "name": name, "corpus": {"generated": name != "mt_4"},
            "prepare": {"examples": tokens / 10, "tokens": tokens, "seconds": 2.0, "examples_s": tokens / 20,
                        "tokens_s": tokens / 2, "train_tokens": tokens - 100, **measured},
            "fit": {k: 2 * v for k, v in measured.items()}, "loader": {"tok_s": 5000.0},
            "model": {"tok_s": 400.0}, "loader_over_model": 12.5}


def test_flatness_compares_the_largest_corpus_with_the_smallest_and_the_table_shows_it():
    corpora = [_corpus("mt_4", 3700, 300, 500), _corpus("mt_1", 1000, 250, 400), _corpus("lm_1", 200, 100, 100)]
    growth = data_scale.flatness(corpora)
    assert set(growth) == {"mt"}                                     # a family needs two sizes
    assert growth["mt"] == {"from": "mt_1", "to": "mt_4", "train_tokens": 4.0, "prepare_peak_rss_mib": 1.2,
                            "prepare_all_processes_pss_mib": 1.25, "fit_peak_rss_mib": 1.2,
                            "fit_all_processes_pss_mib": 1.25, "prepare_all_processes_anon_pss_mib": 1.25,
                            "fit_all_processes_anon_pss_mib": 1.25}
    table = {"corpora": corpora, "flatness": growth, "settings": {"workers": 2, "steps": 30, "loader_batches": 200,
                                                                 "model_steps": 20},
             "machine": {"cpu": "a CPU", "cores": 2, "torch": "2.x", "torch_threads": 1, "load_before": [1.0] * 3,
                         "load_after": [2.0] * 3}}
    text = data_scale.markdown(table)
    assert "| mt_1 | 100 | 1,000 | 2.0 | 50 | 500 | 250 | 500 | 400 | 5,000 | 400 | 12.5 |" in text.splitlines()
    assert "- mt: mt_1 -> mt_4 is x4.00 training tokens; peak RSS x1.20 in prepare, x1.20 in fit" in text
    assert "Corpora reused from an earlier run (same seed and size): mt_4." in text


@pytest.fixture
def restored():
    """What the in-process part of main() changes in this process is put back: the environment (Lightning's
    PL_GLOBAL_SEED) and the random states the config's seed_everything sets."""
    environ, states = dict(os.environ), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    os.environ.clear()
    os.environ.update(environ)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def test_quick_run_writes_consistent_positive_numbers(tmp_path, restored):
    """The translation family at one size, as a user runs it (2 program starts; flatness needs two sizes, and is
    checked on made-up records above; the language model's part is checked in this process below)."""
    table = data_scale.main(["--quick", "--only", "mt", "--pairs", "8000", "--data", str(DATA), "--out", str(tmp_path)])
    written = json.loads((tmp_path / "data_scale.json").read_text())
    assert written == json.loads(json.dumps(table))
    (mt,) = written["corpora"]
    prepare, fit, loader, model = mt["prepare"], mt["fit"], mt["loader"], mt["model"]
    assert mt["name"] == "mt_8000" and mt["corpus"]["generated"] and written["flatness"] == {}
    assert all(prepare[k] > 0 for k in ("examples", "tokens", "seconds", "examples_s", "tokens_s", "wall_s",
                                        "peak_rss_mib", "all_processes_pss_mib"))
    assert fit["peak_rss_mib"] > 0 and fit["all_processes_pss_mib"] > 0 and fit["steps"] == 3
    manifest = json.loads((tmp_path / "prepared/mt_8000/manifest.json").read_text())
    assert prepare["examples"] == sum(s["examples"] for s in manifest["splits"].values()) == 8000 + 1014
    assert prepare["tokens"] == sum(sum(s["tokens"].values()) for s in manifest["splits"].values())
    assert prepare["train_examples"] == 8000                        # the synthetic pairs; the val is the real one
    assert prepare["train_tokens"] == sum(manifest["splits"]["train"]["tokens"].values()) > 0
    _check_rates(loader, model, mt["loader_over_model"])
    text = (tmp_path / "data_scale.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| mt_8000 |")]
    shown = f"{prepare['examples']:,.0f} | {prepare['tokens']:,.0f} | {prepare['seconds']:.1f}"
    assert row.startswith(f"| mt_8000 | {shown} |")
    assert written["machine"]["cores"] >= 1 and written["machine"]["torch"]


def test_language_model_loader_and_model_are_timed_from_the_prepared_folder(tmp_path, restored):
    args = data_scale.parse_args(["--quick", "--out", str(tmp_path)])
    corpus = synthetic_corpora.lm_corpus(DATA, tmp_path / "corpora/lm", 0.0002, seed=0)     # 200 kB
    timed = data_scale.loader_vs_model("lm", "lm", tmp_path / "corpora/lm", args)
    manifest = json.loads((tmp_path / "prepared/lm/manifest.json").read_text())
    assert manifest["task"] == "LanguageModelDataModule" and corpus["files"]["train.txt"] >= 200_000
    assert (tmp_path / "tokenizers/lm/tokenizer.json").is_file()
    assert timed["model"]["parameters"] < 50_000                    # the quick run's tiny model
    assert timed["loader"]["tokens"] == 7 * 12 * 65                 # 7 timed batches of 12 blocks of 64 + 1 ids
    _check_rates(timed["loader"], timed["model"], timed["loader_over_model"])


def _check_rates(loader: dict, model: dict, ratio: float) -> None:
    assert loader["batches"] == 7 and loader["tok_s"] > 0 and loader["first_batch_s"] > 0
    assert model["steps"] == 2 and model["tokens"] > 0 and model["tok_s"] > 0
    assert ratio == pytest.approx(loader["tok_s"] / model["tok_s"])
