"""Train each model family's small config twice, in fp32 (`32-true`) and in `bf16-mixed`, from the same seed, and
record the speed (tokens per second) and the loss curves of both, with what `auto_precision` would pick here.

Each run is `lightning_tfm fit` in a subprocess from the repository root, as a user types it (as in
scripts/quality.py), for `--steps` optimizer steps with a short validation every `--val-every` steps. On a CPU
without native bf16 (AVX2 only, no AVX512-BF16 or AMX-BF16) bf16 is emulated and several times slower than fp32:
that is the expected finding, and the reason `auto_precision` picks fp32 there. Writes precision_table.json,
precision_table.md (printed at the end) and precision_table.png (one panel per family: smoothed train loss
against step, validation points marked) into the folder `--out`.

    python scripts/precision_table.py                                  # the three families, 300 steps
    python scripts/precision_table.py --only lm --steps 100 --threads 1
    python scripts/precision_table.py --only lm --steps 20 -- --model.init_args.model.init_args.d_model 32

Arguments after `--` are appended to every `fit` (to shrink a model, point at other data, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from lightning_tfm.precision import auto_precision, cpu_flags, cpu_model

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {   # name -> (architecture, shipped config)
    "lm": ("decoder-only", "configs/lm/shakespeare_char_small.yaml"),
    "sst2": ("encoder-only", "configs/classification/sst2_small.yaml"),
    "mt": ("encoder-decoder", "configs/translation/multi30k_small.yaml"),
}
PRECISIONS = ("32-true", "bf16-mixed")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")
TOK_S_WINDOW = 20   # steps per train_tok_s measurement: TokensPerSecond's default, which the configs keep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), help="families to run (default: all)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per fit")
    parser.add_argument("--val-every", type=int, help="steps between validations (default: about steps / 5, "
                        f"a multiple of {TOK_S_WINDOW})")
    parser.add_argument("--val-batches", type=int, default=20, help="batches per validation")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of each fit")
    parser.add_argument("--root", default="runs/precision_table", help="folder for the runs (ROOT/FAMILY/PRECISION)")
    parser.add_argument("--out", default="results/precision_table", help="folder for precision_table.{json,md,png}")
    parser.add_argument("extra", nargs="*", help="after `--`: overrides appended to every fit")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps={args.steps}, must be >= 2")
    # validating at the end of a tok/s window keeps validation time out of every window's tokens per second
    args.val_every = args.val_every or min(args.steps, TOK_S_WINDOW * max(1, round(args.steps / 5 / TOK_S_WINDOW)))
    if not 1 <= args.val_every <= args.steps:
        parser.error(f"--val-every={args.val_every}, must be in [1, --steps={args.steps}]")
    return args


def fit_command(config: str, precision: str, run: Path, args: argparse.Namespace) -> list[str]:
    """`lightning_tfm fit` for `steps` steps, validating every `val_every` steps counted across epochs
    (check_val_every_n_epoch null; the LM's epochs are 500 batches), no time limit (multi30k_small's 50 minutes
    would cut an emulated bf16 run short), every step logged (the configs log every 50)."""
    return ["fit", "--config", config, "--trainer.precision", precision, "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
            "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(args.val_every),
            "--trainer.limit_val_batches", str(args.val_batches), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", *args.extra]


def run_fit(command: list[str], run: Path, threads: int) -> float:
    """Run `lightning_tfm COMMAND` into a fresh `run` folder (so its log is logs/version_0); return wall seconds."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with (run / "fit.log").open("w") as log:
        result = subprocess.run([sys.executable, "-m", "lightning_tfm.cli", *command], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"lightning_tfm {' '.join(command)} failed with exit code {result.returncode}; see {run}/fit.log")
    return time.perf_counter() - start


def read_series(run: Path) -> dict[str, dict[int, float]]:
    """train_loss, train_tok_s and val_loss of the run's CSV log, each as {step: value}."""
    series: dict[str, dict[int, float]] = {"train_loss": {}, "train_tok_s": {}, "val_loss": {}}
    with (run / "logs/version_0/metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            for name, values in series.items():
                if row.get(name):
                    values[int(row["step"])] = float(row[name])
    return series


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (fewer at the start): per-step losses of small batches are noisy."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def summarise(run: Path, steps: int) -> dict:
    """Median tok/s after the first 10% of steps (warm-up: allocator, first autocast casts), the train loss
    averaged over the last 10% of steps, the last val_loss, the curves, and the precision the saved config holds."""
    series = read_series(run)
    tenth = max(1, steps // 10)
    train, val = (dict(sorted(series[k].items())) for k in ("train_loss", "val_loss"))
    raw = list(train.values())
    # the CSV repeats the last train_tok_s in every row until the next window ends: keep the measured ones
    measured = {s: r for s, r in series["train_tok_s"].items() if (s + 1) % TOK_S_WINDOW == 0}
    rates = [r for s, r in measured.items() if s >= tenth] or list(measured.values())
    saved = yaml.safe_load((run / "logs/version_0/config.yaml").read_text())
    return {"precision": saved["trainer"]["precision"], "seed": saved["seed_everything"], "steps_done": len(raw),
            "tok_s": statistics.median(rates) if rates else float("nan"), "tok_s_points": len(rates),
            "train_loss": statistics.fmean(raw[-tenth:]), "val_loss": list(val.values())[-1],
            "train_curve": {"step": list(train), "loss": raw, "smoothed": smooth(raw, max(1, steps // 20))},
            "val_points": {"step": list(val), "loss": list(val.values())}}


def _max_gap(a: dict[str, list], b: dict[str, list], key: str) -> float:
    """Largest |a - b| of two curves at the steps both have."""
    left, right = dict(zip(a["step"], a[key])), dict(zip(b["step"], b[key]))
    return max((abs(left[s] - right[s]) for s in left.keys() & right.keys()), default=float("nan"))


def run_family(name: str, args: argparse.Namespace) -> dict:
    """Both precisions of one family, and how they compare (bf16 over fp32)."""
    kind, config = FAMILIES[name]
    runs = {}
    for precision in PRECISIONS:
        run = REPO / args.root / name / precision
        command = fit_command(config, precision, run, args)
        load = os.getloadavg()
        seconds = run_fit(command, run, args.threads)
        runs[precision] = {"command": "lightning_tfm " + " ".join(command), "wall_s": seconds,
                           "load_before": load, "load_after": os.getloadavg(), **summarise(run, args.steps)}
        print(f"{name} {precision}: {runs[precision]['tok_s']:.0f} tok/s, {seconds:.0f} s", flush=True)
    fp32, bf16 = (runs[p] for p in PRECISIONS)
    return {"kind": kind, "config": config, "runs": runs, "tok_s_ratio": bf16["tok_s"] / fp32["tok_s"],
            "max_train_loss_diff": _max_gap(fp32["train_curve"], bf16["train_curve"], "smoothed"),
            "max_val_loss_diff": _max_gap(fp32["val_points"], bf16["val_points"], "loss")}


def machine(threads: int) -> dict:
    """What this CPU computes natively and what auto_precision picks from that."""
    picked, reason = auto_precision("cpu")
    flags = cpu_flags()
    return {"cpu": cpu_model(), "flags": {f: f in flags for f in FLAGS}, "torch": torch.__version__,
            "threads": threads, "auto_precision": picked, "auto_precision_reason": reason}


def markdown(table: dict) -> str:
    """The table, then a line on auto_precision and the machine."""
    lines = ["| family | config | fp32 tok/s | bf16 tok/s | bf16/fp32 | final train loss fp32 / bf16 | "
             "final val loss fp32 / bf16 | max diff train / val |", "|---|---|---|---|---|---|---|---|"]
    for name, f in table["families"].items():
        fp32, bf16 = (f["runs"][p] for p in PRECISIONS)
        lines.append(f"| {name} ({f['kind']}) | `{f['config']}` | {fp32['tok_s']:.0f} | {bf16['tok_s']:.0f} | "
                     f"{f['tok_s_ratio']:.2f} | {fp32['train_loss']:.3f} / {bf16['train_loss']:.3f} | "
                     f"{fp32['val_loss']:.3f} / {bf16['val_loss']:.3f} | "
                     f"{f['max_train_loss_diff']:.3f} / {f['max_val_loss_diff']:.3f} |")
    m, s = table["machine"], table["settings"]
    have = ", ".join(f for f, present in m["flags"].items() if present) or "none of them"
    lines += ["", f"`auto_precision(\"cpu\")` picks **{m['auto_precision']}** here, since "
              f"{m['auto_precision_reason']}.",
              "", f"{m['cpu']}; flags: {have} (of {', '.join(m['flags'])}); torch {m['torch']}, {m['threads']} "
              f"threads; load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after. "
              f"{s['steps']} steps per fit, validation every {s['val_every']} steps on {s['val_batches']} batches; "
              "train loss smoothed over the last 10% of steps, tok/s the median after the first 10%."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """One panel per family, 1200x400 px: smoothed train loss of both precisions against step, val points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = table["families"]
    fig, axes = plt.subplots(1, len(families), figsize=(12, 4), dpi=100, squeeze=False)
    for ax, (name, f) in zip(axes[0], families.items()):
        for precision, color in zip(PRECISIONS, ("tab:blue", "tab:orange")):
            run = f["runs"][precision]
            ax.plot(run["train_curve"]["step"], run["train_curve"]["smoothed"], color=color,
                    label=f"{precision} train")
            ax.plot(run["val_points"]["step"], run["val_points"]["loss"], "o", color=color, label=f"{precision} val")
        ax.set(title=f"{name} ({f['kind']}): bf16/fp32 tok/s {f['tok_s_ratio']:.2f}", xlabel="step", ylabel="loss")
        ax.legend(fontsize="small")
    fig.tight_layout()   # moves the axes inside the fixed figure; the saved size stays 1200x400
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(table: dict, out: Path) -> None:
    """precision_table.json, .md and .png in the folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_table.json").write_text(json.dumps(table, indent=1))
    (out / "precision_table.md").write_text(markdown(table))
    plot(table, out / "precision_table.png")


def main(argv: list[str] | None = None) -> dict:
    """Run the table and write OUT/precision_table.{json,md,png}; return what the JSON holds."""
    args = parse_args(argv)
    table = {"machine": {**machine(args.threads), "load_before": os.getloadavg()},
             "settings": {"steps": args.steps, "val_every": args.val_every, "val_batches": args.val_batches,
                          "extra": args.extra},
             "families": {}}
    for name in args.only or FAMILIES:
        table["families"][name] = run_family(name, args)
        table["machine"]["load_after"] = os.getloadavg()
        write(table, REPO / args.out)   # after each family, so a failed or stopped run keeps the ones done
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
