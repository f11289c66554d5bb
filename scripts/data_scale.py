"""Evidence of scale: prepare synthetic corpora at two sizes 4x apart, train from them, and show that memory stays
flat while the loader outruns the model.

Corpora (scripts/synthetic_corpora.py), generated from the shipped data with a seeded numpy Generator and streamed
to disk (a corpus is never held in memory): a parallel one (`mt_N`: N pairs, each joining 1-3 randomly drawn
Multi30k training pairs, sources joined by a space and targets likewise, so line i of train.en still translates
line i of train.de; the real Multi30k val as val.en/.de) and a character LM one (`lm_Xgb`: lines drawn from Tiny
Shakespeare and the WikiText-2 valid/test files, the only ones that ship, until at least X GB). A corpus whose
corpus.json says it was generated with these settings, with its files at the recorded sizes, is reused (the
report says so).

For each corpus, from the repository root, as a user types them:
1. `lightning_tfm prepare` with the shipped config (configs/translation/multi30k_small.yaml or
   configs/lm/shakespeare_char_small.yaml) into OUT/prepared/NAME, with a fresh OUT/tokenizers/NAME, so the
   tokenizer is trained on the corpus as on a first run. "prepare s" and its rates are the ones prepare prints
   (tokenizer training included, interpreter start not; that is in wall_s of the JSON).
2. `lightning_tfm fit` for `--steps` steps from the prepared folder at the config's model size, fp32, no
   validation, no loggers (its checkpoints are deleted afterwards).
Peak RSS is `ru_maxrss` of `os.wait4` on the command, forked by a bare Python launcher so that it does not inherit
this process's peak (scripts/peak_memory.py): as Linux reports it, the largest resident set of the process and of
each child it reaped (prepare's tokenizer workers), not their sum. Their sum is sampled too, as PSS from /proc
every 0.25 s ("all processes" in the report; shared pages counted once).
3. In this process: the datamodule and the model built from the same config (LightningCLI, run=False); the
   training loader's tokens/s over `--loader-batches` batches (real tokens, as TokensPerSecond counts them: src +
   tgt non-pad for translation, after the first batch, whose epoch setup is reported apart), then the model's
   tokens/s over `--model-steps` Lightning training steps (forward, backward, optimizer, fp32) on those batches
   after 2 warm-up steps. loader/model above 1 means the loader keeps up; the goal is 10x.

Writes OUT/data_scale.json (with the machine: lscpu model, cores, torch) and OUT/data_scale.md, and prints the md.

    python scripts/data_scale.py                                    # 0.5M and 2M pairs, 0.25 and 1 GB of LM text
    python scripts/data_scale.py --only mt --pairs 100000 400000 --workers 2
    python scripts/data_scale.py --quick          # tiny corpora, a tiny model: 8 program starts, about 2 minutes

Arguments after `--` are appended to every fit and to the in-process build (e.g. to shrink the model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable
from unittest.mock import patch

import torch
from peak_memory import measure
from synthetic_corpora import lm_corpus, parallel_corpus

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data"     # the tests' LIGHTNING_TFM_DATA overrides it, as for them
CONFIGS = {"mt": "configs/translation/multi30k_small.yaml", "lm": "configs/lm/shakespeare_char_small.yaml"}
MODEL = "--model.init_args.model.init_args"
TINY = [f"{MODEL}.d_model", "32", f"{MODEL}.n_layers", "1", f"{MODEL}.n_heads", "2", f"{MODEL}.d_ff", "64"]
QUICK = {"pairs": [2000, 8000], "lm_gb": [0.0005, 0.002], "steps": 3, "loader_batches": 8, "model_steps": 2}
WARMUP = 2          # training steps not timed (allocator, first optimizer step)
PREPARED = re.compile(r"prepared ([\d,]+) examples, ([\d,]+) tokens in ([\d.]+) s \(([\d,]+) examples/s, "
                      r"([\d,]+) tokens/s\)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="families to run (default: both)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[500_000, 2_000_000], help="parallel corpus sizes")
    parser.add_argument("--lm-gb", type=float, nargs="+", default=[0.25, 1.0], help="LM corpus sizes in GB (1e9 B)")
    parser.add_argument("--workers", type=int, default=2, help="prepare's tokenizer processes")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each fit")
    parser.add_argument("--loader-batches", type=int, default=200, help="batches the loader is timed over")
    parser.add_argument("--model-steps", type=int, default=20, help=f"timed training steps (after {WARMUP} more)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus generators")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LIGHTNING_TFM_DATA", DATA)),
                        help="the shipped data (multi30k/, tiny_shakespeare/, wikitext2_eval_only/)")
    parser.add_argument("--out", type=Path, default=Path("results/data_scale"), help="folder for everything written")
    parser.add_argument("--quick", action="store_true", help=f"tiny corpora and a 1-layer d_model 32 model: {QUICK}")
    parser.add_argument("extra", nargs="*", help="after `--`: overrides appended to every fit and build")
    args = parser.parse_args(argv)
    if args.quick:                              # QUICK's values where no flag says otherwise
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
        args.extra = [*TINY, *args.extra]
    if args.loader_batches < args.model_steps + WARMUP:
        parser.error(f"--loader-batches={args.loader_batches} must be >= --model-steps + {WARMUP}")
    args.out = (REPO / args.out).resolve()
    return args


# --- measured subprocesses --------------------------------------------------------------------------------------


def run_measured(command: list[str], log: Path) -> dict:
    """Run `lightning_tfm COMMAND` from the repository root (output to `log`); wall seconds and memory."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    measured = measure([sys.executable, "-m", "lightning_tfm.cli", *command], log, REPO, env)
    if measured.pop("returncode"):
        sys.exit(f"lightning_tfm {' '.join(command)} failed; see {log}")
    return {"command": "lightning_tfm " + " ".join(command), **measured}


def data_args(family: str, corpus: Path, out: Path, name: str) -> list[str]:
    """The overrides that point a config at the corpus, its prepared folder, tokenizer and run folder."""
    data = "--data.init_args"
    paths = [f"{data}.train_path", str(corpus / "train.txt")] if family == "lm" else [
        f"{data}.train_path", str(corpus / "train"), f"{data}.val_path", str(corpus / "val"), f"{data}.test_path",
        "null"]
    return [*paths, f"{data}.prepared_dir", str(out / "prepared" / name), f"{data}.tokenization.save_dir",
            str(out / "tokenizers" / name), "--trainer.default_root_dir", str(out / "runs" / name)]


def prepare_and_fit(family: str, name: str, corpus: Path, args: argparse.Namespace) -> dict:
    """Prepare the corpus afresh, then a short fit from it; both measured."""
    for folder in ("prepared", "tokenizers", "runs"):
        shutil.rmtree(args.out / folder / name, ignore_errors=True)
    located = data_args(family, corpus, args.out, name)
    prepare = run_measured(["prepare", "--config", CONFIGS[family], *located, "--workers", str(args.workers)],
                           args.out / "logs" / f"prepare_{name}.log")
    lines = [m for m in map(PREPARED.search, (args.out / "logs" / f"prepare_{name}.log").read_text().splitlines()) if m]
    if not lines:
        sys.exit(f"no 'prepared ...' line in {args.out}/logs/prepare_{name}.log")
    numbers = [float(g.replace(",", "")) for g in lines[-1].groups()]
    prepare.update(zip(("examples", "tokens", "seconds", "examples_s", "tokens_s"), numbers))
    train = json.loads((args.out / "prepared" / name / "manifest.json").read_text())["splits"]["train"]
    prepare.update(train_examples=train["examples"], train_tokens=sum(train["tokens"].values()))
    fit = run_measured(["fit", "--config", CONFIGS[family], *located, "--trainer.max_steps", str(args.steps),
                        "--trainer.max_time", "null", "--trainer.limit_val_batches", "0",
                        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                        "--trainer.precision", "32-true", *args.extra], args.out / "logs" / f"fit_{name}.log")
    shutil.rmtree(args.out / "runs" / name / "checkpoints", ignore_errors=True)
    return {"prepare": prepare, "fit": {**fit, "steps": args.steps}}


# --- loader against model, in this process ----------------------------------------------------------------------


def _step_clock():
    """A callback timing each training step (forward, backward, optimizer) after WARMUP, with its real tokens."""
    from lightning.pytorch import Callback

    from lightning_tfm.callbacks import count_tokens

    class StepClock(Callback):
        def __init__(self) -> None:
            self.seconds, self.tokens, self.steps, self._start = 0.0, 0, 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(trainer)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(trainer)
            if batch_idx >= WARMUP:
                self.seconds += time.perf_counter() - self._start
                self.tokens, self.steps = self.tokens + count_tokens(batch), self.steps + 1

    return StepClock()


def _sync(trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()


def _draw(loader: Iterable, n: int) -> tuple[list, float, float]:
    """The first `n` batches of an epoch, the seconds to the first (the epoch's setup: shuffling, bucketing) and
    the seconds of the others."""
    started = time.perf_counter()
    batches = iter(loader)
    drawn = [next(batches)]
    first = time.perf_counter() - started
    drawn += islice(batches, n - 1)
    return drawn, first, time.perf_counter() - started - first


def loader_vs_model(family: str, name: str, corpus: Path, args: argparse.Namespace) -> dict:
    """Tokens/s of the training loader read from the prepared folder, and of the config's model training on
    the batches it gave (see the module docstring)."""
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from torch.utils.data import DataLoader

    from lightning_tfm.callbacks import count_tokens
    from lightning_tfm.cli import TransformerCLI
    from lightning_tfm.console import quiet_third_party

    quiet_third_party()
    with patch.object(sys, "argv", sys.argv[:1]):           # LightningCLI warns when argv holds our own flags
        cli = TransformerCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                             run=False, save_config_callback=None, auto_configure_optimizers=False,
                             parser_kwargs={"parser_mode": "omegaconf+"},
                             args=["--config", str(REPO / CONFIGS[family]), *data_args(family, corpus, args.out, name),
                                   "--trainer.logger", "false", *args.extra])
    datamodule, module = cli.datamodule, cli.model
    datamodule.prepare_data()                   # after prepare_and_fit only checks the manifest is there
    datamodule.setup("fit")
    batches, first, seconds = _draw(datamodule.train_dataloader(), args.loader_batches)
    tokens = sum(count_tokens(b) for b in batches[1:])
    if len(batches) < args.model_steps + WARMUP:
        sys.exit(f"{name}: an epoch has {len(batches)} batches, fewer than --model-steps + {WARMUP}")
    # the model trains with the config's optimizer, schedule and clipping, on the batches above, with no
    # datamodule attached: the task takes the tokenizer and ids the datamodule would hand it in setup
    module.tokenizer = datamodule.tokenizer
    module.check_data(datamodule)
    clock = _step_clock()
    trainer = Trainer(accelerator="auto", devices=1, precision="32-true", max_steps=args.model_steps + WARMUP,
                      max_epochs=1, gradient_clip_val=cli.trainer.gradient_clip_val, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock],
                      default_root_dir=args.out / "runs" / f"{name}_model")
    with warnings.catch_warnings():             # no validation here, on purpose
        warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, train_dataloaders=DataLoader(batches[:args.model_steps + WARMUP], batch_size=None))
    loader_rate, model_rate = tokens / seconds, clock.tokens / clock.seconds
    return {"loader": {"batches": len(batches) - 1, "tokens": tokens, "seconds": seconds, "tok_s": loader_rate,
                       "first_batch_s": first, "num_workers": datamodule.batching.num_workers},
            "model": {"steps": clock.steps, "tokens": clock.tokens, "seconds": clock.seconds, "tok_s": model_rate,
                      "parameters": sum(p.numel() for p in module.parameters()),
                      "device": str(trainer.strategy.root_device)},
            "loader_over_model": loader_rate / model_rate}


# --- report -----------------------------------------------------------------------------------------------------


def machine() -> dict:
    """lscpu's model name and CPU count, torch and its threads."""
    try:
        lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                    check=True).stdout.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        lscpu = {}
    return {"cpu": lscpu.get("Model name", "").strip() or "unknown", "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_before": os.getloadavg()}


def flatness(corpora: list[dict]) -> dict:
    """Per family, the largest corpus over the smallest: training tokens, and each peak memory."""
    result = {}
    for family in CONFIGS:
        runs = sorted((c for c in corpora if c["family"] == family), key=lambda c: c["prepare"]["train_tokens"])
        if len(runs) >= 2:
            small, big = runs[0], runs[-1]
            result[family] = {"from": small["name"], "to": big["name"],
                              "train_tokens": big["prepare"]["train_tokens"] / small["prepare"]["train_tokens"],
                              **{f"{step}_{kind}": big[step][kind] / small[step][kind] for step in ("prepare", "fit")
                                 for kind in ("peak_rss_mib", "all_processes_pss_mib", "all_processes_anon_pss_mib")
                                 if kind in small[step]}}
    return result


def markdown(table: dict) -> str:
    """The table, one line per family on how memory grew with the corpus, and how it was measured."""
    lines = ["| corpus | examples | tokens | prepare s | examples/s | tokens/s | prepare peak RSS MiB | "
             "fit peak RSS MiB | fit anon PSS MiB | loader tok/s | model tok/s | loader/model |",
             "|---|" + "---:|" * 11]
    for c in table["corpora"]:
        p, f = c["prepare"], c["fit"]
        lines.append(f"| {c['name']} | {p['examples']:,.0f} | {p['tokens']:,.0f} | {p['seconds']:.1f} | "
                     f"{p['examples_s']:,.0f} | {p['tokens_s']:,.0f} | {p['peak_rss_mib']:,.0f} | "
                     f"{f['peak_rss_mib']:,.0f} | {f.get('all_processes_anon_pss_mib', float('nan')):,.0f} | "
                     f"{c['loader']['tok_s']:,.0f} | {c['model']['tok_s']:,.0f} | "
                     f"{c['loader_over_model']:.1f} |")
    lines += [""] if table["flatness"] else []
    for family, g in table["flatness"].items():
        lines.append(f"- {family}: {g['from']} -> {g['to']} is x{g['train_tokens']:.2f} training tokens; peak RSS x"
                     f"{g['prepare_peak_rss_mib']:.2f} in prepare, x{g['fit_peak_rss_mib']:.2f} in fit; all "
                     f"processes' PSS x{g['prepare_all_processes_pss_mib']:.2f} in prepare, "
                     f"x{g['fit_all_processes_pss_mib']:.2f} in fit; anonymous PSS (owned memory, without the "
                     f"memory-mapped corpus's file pages) x{g.get('fit_all_processes_anon_pss_mib', float('nan')):.2f}"
                     " in fit.")
    reused = [c["name"] for c in table["corpora"] if not c["corpus"]["generated"]]
    m, s = table["machine"], table["settings"]
    lines += ["", f"Corpora reused from an earlier run (same seed and size): {', '.join(reused)}." if reused else
              "All corpora generated by this run.",
              "", f"{m['cpu']}, {m['cores']} CPUs; torch {m['torch']}, {m['torch_threads']} threads; load average "
              f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after. prepare with {s['workers']} "
              f"workers (prepare s and its rates as prepare reports them, training the tokenizer included); fit "
              f"{s['steps']} steps fp32 without validation; peak RSS is ru_maxrss (os.wait4): the largest single "
              "process, its reaped workers included; PSS sampled every 0.25 s. Loader tok/s over "
              f"{s['loader_batches']} batches after the first, model tok/s over {s['model_steps']} training steps "
              f"after {WARMUP}; real tokens (src + tgt non-pad for translation)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Generate, prepare, fit and time every corpus; write OUT/data_scale.{json,md}; return what the JSON holds."""
    args = parse_args(argv)
    sizes = [("mt", f"mt_{n}", n) for n in args.pairs] + [("lm", f"lm_{gb:g}gb", gb) for gb in args.lm_gb]
    table = {"machine": machine(), "corpora": [], "flatness": {},
             "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    for family, name, size in sizes:
        if family not in (args.only or CONFIGS):
            continue
        folder = args.out / "corpora" / name
        make = parallel_corpus if family == "mt" else lm_corpus
        corpus = make(args.data, folder, size, args.seed)
        print(f"{name}: corpus {'generated' if corpus['generated'] else 'reused'}", flush=True)
        record = {"family": family, "name": name, "config": CONFIGS[family], "corpus": corpus,
                  **prepare_and_fit(family, name, folder, args), **loader_vs_model(family, name, folder, args)}
        table["corpora"].append(record)
        print(f"{name}: prepare {record['prepare']['tokens_s']:,.0f} tokens/s, peak RSS "
              f"{record['prepare']['peak_rss_mib']:,.0f} / {record['fit']['peak_rss_mib']:,.0f} MiB, loader/model "
              f"{record['loader_over_model']:.1f}", flush=True)
        table["flatness"] = flatness(table["corpora"])
        table["machine"]["load_after"] = os.getloadavg()
        # after each corpus, so a failed or stopped run keeps the ones done
        (args.out / "data_scale.json").write_text(json.dumps(table, indent=1))
        (args.out / "data_scale.md").write_text(markdown(table))
    table["machine"]["load_after"] = os.getloadavg()
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
