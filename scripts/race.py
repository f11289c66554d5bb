"""Time to quality: our shipped Multi30k recipe against transformers' MarianMTModel of the same size, on the same
data, tokenizer, threads and training-time budget, one after the other in one invocation.

    python scripts/race.py                                   # 40 minutes per run, seeds 1 and 2, both systems
    python scripts/race.py --minutes 1 --snapshot-every 0.5 --seeds 1 --out results/race_check
    python scripts/race.py --systems marian                  # the peer only, reusing OUT/ours_seedS/tokenizer
    python scripts/race.py --precision bf16 --out results/race_bf16   # both in bf16 (a CPU or GPU with native bf16)

Ours runs as a user runs it, through the CLI in a subprocess: `lightning_tfm fit --config
configs/translation/multi30k_small.yaml` with the seed, the data paths and one extra callback
(race_clock.TrainingClock: snapshots every K minutes of training and the stop at the budget), then `lightning_tfm
average epoch-*.ckpt --last 5`. Overrides beside those: `--data.seed S` (the seed also picks the batch order),
`--trainer.max_epochs -1` (the race is on time; 40 minutes is ~8 epochs, under the recipe's 30 anyway) and
`--trainer.max_time` set to a cap (2 x budget + 10 min) that the run never reaches, because Lightning's Timer
counts validation and checkpoint writes as training time (race_clock's docstring). The peer (race_marian.py)
trains in this process on our run's tokenizer. For each seed the two timed trainings run back to back, ours
first, with nothing else running; then both are scored the same way (race_score.py). Writes OUT/race.json,
OUT/race.md and OUT/race.png and prints the tables.

This is not a test: at the defaults it trains for 160 minutes and decodes val + test (beam 4) at 34 checkpoints
(8 snapshots a run, and ours' averaged one). Run it on an otherwise idle machine: the JSON and the final table
record the load average before and after each run. tests/test_race.py runs it at a smoke size.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from race_marian import TINY, Size, marian_translator, specials, train_marian  # scripts/ is sys.path[0]
from race_report import markdown, merge, plot
from race_score import EvalSet, Translator, bleu, eval_set, ours_translator
from tokenizers import Tokenizer

from lightning_tfm.checkpoints import load_checkpoint

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent

CONFIG = "configs/translation/multi30k_small.yaml"
MODEL = "--model.init_args.model.init_args"
ALPHA, MAX_EXTRA_LEN = 0.6, 50
SPLITS = {"val": "val", "test": "test2016"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=40, help="training minutes per run (the budget)")
    p.add_argument("--snapshot-every", type=float, default=5, help="training minutes between snapshots")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", default="../shared/data/multi30k", help="folder with train, val, test2016 .en/.de")
    p.add_argument("--out", default="results/race")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--systems", nargs="+", choices=("ours", "marian"), default=["ours", "marian"])
    p.add_argument("--max-train-pairs", type=int, default=None, help="train on the first N pairs (smoke runs)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="both models 1+1 layers, d_model 32 (smoke tests only)")
    p.add_argument("--marian-lr-scale", type=float, default=1.0,
                   help="multiplies the peer's inverse-sqrt schedule (1: the paper's formula)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="training precision of both systems: bf16 is ours' `--trainer.precision bf16-mixed` and "
                        "the peer's forward and loss under torch.autocast(bfloat16); scoring is fp32 for both")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.snapshot_every <= 0 or args.snapshot_every > args.minutes:
        p.error(f"--minutes {args.minutes} and --snapshot-every {args.snapshot_every}: need 0 < every <= minutes")
    if args.threads < 1 or args.beam < 1:
        p.error(f"--threads {args.threads} and --beam {args.beam} must be >= 1")
    return args


def prepare_data(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Path prefixes of train/val/test; the first --max-train-pairs training pairs copied to OUT/data/train."""
    folder = Path(args.data).resolve()
    prefixes = {"train": folder / "train", **{k: folder / v for k, v in SPLITS.items()}}
    for prefix in prefixes.values():
        for lang in ("en", "de"):
            if not Path(f"{prefix}.{lang}").is_file():
                sys.exit(f"--data {args.data}: {prefix}.{lang} not found")
    if args.max_train_pairs is not None:
        (out / "data").mkdir(parents=True, exist_ok=True)
        for lang in ("en", "de"):
            with open(f"{prefixes['train']}.{lang}", encoding="utf-8", newline="") as f:
                head = [line for _, line in zip(range(args.max_train_pairs), f)]
            (out / "data" / f"train.{lang}").write_text("".join(head), encoding="utf-8")
        prefixes["train"] = out / "data" / "train"
    return prefixes


def _cli(args: list[str], log: Path, threads: int) -> Callable[[], float]:
    """Start `lightning_tfm ARGS` with its output in `log`; returns a function that waits for it (exiting if it
    failed) and returns its wall seconds."""
    script = Path(sys.executable).with_name("lightning_tfm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_tfm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")])),
           # W&B's service process would share the cores with training; WANDB_MODE=offline keeps the recipe's logger
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start, f = time.perf_counter(), log.open("w")
    f.write(shlex.join(["lightning_tfm", *args]) + "\n")
    f.flush()
    proc = subprocess.Popen(command + args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def finish() -> float:
        code = proc.wait()
        f.close()
        if code:
            sys.exit(f"lightning_tfm {args[0]} exited {code}; see {log}")
        return time.perf_counter() - start
    return finish


def _duration(seconds: float) -> str:
    s = max(1, round(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _snapshots(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "snapshots.jsonl").read_text().splitlines()]


def _score(translator: Translator, tokenizer: Tokenizer, sets: dict[str, EvalSet]) -> dict[str, Any]:
    scores, eos = {}, specials(tokenizer)[2]
    for split, data in sets.items():
        scores[f"{split}_bleu"], scores["bleu_signature"] = bleu(translator, data, tokenizer, eos, MAX_EXTRA_LEN)
    return scores


def train_ours(args: argparse.Namespace, data: dict[str, Path], seed: int, root: Path) -> dict[str, Any]:
    """`lightning_tfm fit` with the race's clock; the run's record, snapshots not yet scored."""
    callback = {"class_path": "race_clock.TrainingClock",
                "init_args": {"budget_minutes": args.minutes, "every_minutes": args.snapshot_every,
                              "dirpath": str(root / "snapshots")}}
    fit = ["fit", "--config", CONFIG, "--trainer.max_time", _duration(args.minutes * 120 + 600),
           "--trainer.default_root_dir", str(root), "--seed_everything", str(seed), "--data.seed", str(seed),
           "--trainer.max_epochs", "-1", "--trainer.enable_progress_bar", "false",
           *[a for split in ("train", "val", "test") for a in (f"--data.{split}_path", str(data[split]))],
           f"--trainer.callbacks+={json.dumps(callback)}"]
    if args.precision == "bf16":
        fit += ["--trainer.precision", "bf16-mixed"]
    if args.tiny:
        fit += [f"{MODEL}.n_layers", str(TINY.n_layers), f"{MODEL}.d_model", str(TINY.d_model),
                f"{MODEL}.n_heads", str(TINY.n_heads), f"{MODEL}.d_ff", str(TINY.d_ff)]
    root.mkdir(parents=True, exist_ok=True)
    print(f"ours seed {seed}: lightning_tfm fit ... (log: {root / 'fit.log'})", flush=True)
    load = [os.getloadavg()[0]]
    fit_s = _cli(fit, root / "fit.log", args.threads)()
    snapshots = _snapshots(root / "snapshots")
    print(f"ours seed {seed}: fit {fit_s:.0f} s wall, {snapshots[-1]['minutes']:.2f} training minutes, "
          f"{snapshots[-1]['step']} steps", flush=True)
    if snapshots[-1].get("ended_early"):
        print(f"WARNING ours seed {seed}: the run ended after {snapshots[-1]['minutes']:.2f} training minutes, "
              f"before the budget; see {root / 'fit.log'}", flush=True)
    return {"system": "ours", "seed": seed, "command": shlex.join(["lightning_tfm", *fit]),
            "fit_wall_minutes": round(fit_s / 60, 2), "load_average": [*load, os.getloadavg()[0]],
            "snapshots": snapshots}


def start_average(root: Path, threads: int) -> tuple[Path, Callable[[], float] | None]:
    """`lightning_tfm average` of the last 5 epoch checkpoints, started in the background (it runs while the
    snapshots are scored; neither is timed). Returns the final checkpoint and the wait, None when the run is
    shorter than two epochs and its one epoch checkpoint is the final one."""
    epochs = sorted(glob.glob(str(root / "checkpoints" / "epoch-*.ckpt")))
    if len(epochs) < 2:
        return Path(epochs[-1]), None
    output = root / "checkpoints" / "averaged.ckpt"
    return output, _cli(["average", *epochs, "--last", "5", "--output", str(output)], root / "average.log", threads)


def score_ours(args: argparse.Namespace, data: dict[str, Path], run: dict[str, Any], root: Path,
               final_ckpt: Path, averaging: Callable[[], float] | None) -> None:
    """Val and test BLEU of each snapshot and of the final (averaged) checkpoint, into `run`."""
    start, snapshots = time.perf_counter(), run["snapshots"]
    tokenizer = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    sets = _eval_sets(data, tokenizer)
    for record in snapshots:
        record.update(_score(ours_translator(record["path"], args.beam, ALPHA), tokenizer, sets))
    averaged_from = [final_ckpt.name]
    if averaging is not None:
        averaging()
        averaged_from = load_checkpoint(final_ckpt)["averaged_from"]
    run["final"] = {**{k: snapshots[-1][k] for k in ("minutes", "step", "tokens")}, "checkpoint": str(final_ckpt),
                    "averaged_from": [Path(p).name for p in averaged_from],
                    **_score(ours_translator(final_ckpt, args.beam, ALPHA), tokenizer, sets)}
    print(f"ours seed {run['seed']}: scored {len(snapshots) + 1} checkpoints in {time.perf_counter() - start:.0f} s; "
          f"test BLEU {run['final']['test_bleu']:.2f} ({final_ckpt.name})", flush=True)


def train_peer(args: argparse.Namespace, data: dict[str, Path], seed: int, root: Path,
               tokenizer_path: Path) -> dict[str, Any]:
    """MarianMTModel trained on our run's tokenizer; the run's record, snapshots not yet scored."""
    if not tokenizer_path.is_file():
        sys.exit(f"{tokenizer_path} not found: the peer uses our run's tokenizer; run --systems ours first")
    start, load = time.perf_counter(), [os.getloadavg()[0]]
    snapshots = train_marian(data["train"], tokenizer_path, root, seed, args.minutes, args.snapshot_every,
                             TINY if args.tiny else Size(), lr_scale=args.marian_lr_scale,
                             bf16=args.precision == "bf16")
    train_s, load = time.perf_counter() - start, [*load, os.getloadavg()[0]]
    print(f"marian seed {seed}: trained {train_s:.0f} s wall, {snapshots[-1]['minutes']:.2f} training minutes, "
          f"{snapshots[-1]['step']} steps", flush=True)
    return {"system": "marian", "seed": seed, "tokenizer": str(tokenizer_path),
            "train_wall_minutes": round(train_s / 60, 2), "load_average": load, "snapshots": snapshots}


def score_peer(args: argparse.Namespace, data: dict[str, Path], run: dict[str, Any]) -> None:
    """Val and test BLEU of each snapshot into `run`; the final weights are the last snapshot's."""
    start, snapshots = time.perf_counter(), run["snapshots"]
    tokenizer = Tokenizer.from_file(run["tokenizer"])
    sets = _eval_sets(data, tokenizer)
    for record in snapshots:
        translator = marian_translator(Path(record["path"]), tokenizer, TINY if args.tiny else Size(), args.beam,
                                       ALPHA)
        record.update(_score(translator, tokenizer, sets))
    run["final"] = {**{k: snapshots[-1][k] for k in ("minutes", "step", "tokens", "val_bleu", "test_bleu")},
                    "checkpoint": snapshots[-1]["path"]}
    print(f"marian seed {run['seed']}: scored {len(snapshots)} checkpoints in {time.perf_counter() - start:.0f} s; "
          f"test BLEU {run['final']['test_bleu']:.2f}", flush=True)


def race(args: argparse.Namespace, data: dict[str, Path], seed: int, out: Path) -> list[dict[str, Any]]:
    """One seed: the two timed trainings back to back (ours first: the peer needs its tokenizer), nothing else
    running; then the scoring, with our checkpoint averaging in the background."""
    ours_root, peer_root = out / f"ours_seed{seed}", out / f"marian_seed{seed}"
    ours = train_ours(args, data, seed, ours_root) if "ours" in args.systems else None
    peer = None
    if "marian" in args.systems:
        peer = train_peer(args, data, seed, peer_root, ours_root / "tokenizer" / "tokenizer.json")
    if ours is not None:
        final_ckpt, averaging = start_average(ours_root, args.threads)
    if peer is not None:
        score_peer(args, data, peer)
    if ours is not None:
        score_ours(args, data, ours, ours_root, final_ckpt, averaging)
    return [run for run in (ours, peer) if run is not None]


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _eval_sets(data: dict[str, Path], tokenizer: Tokenizer) -> dict[str, EvalSet]:
    pad, _, eos = specials(tokenizer)
    return {split: eval_set(split, data[split], tokenizer, pad, eos) for split in SPLITS}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    settings = {"minutes": args.minutes, "snapshot_every": args.snapshot_every, "data": str(Path(args.data).resolve()),
                "max_train_pairs": args.max_train_pairs, "threads": args.threads, "beam": args.beam, "alpha": ALPHA,
                "max_extra_len": MAX_EXTRA_LEN, "tiny": args.tiny, "marian_lr_scale": args.marian_lr_scale,
                "precision": args.precision}
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(),
               "torch": torch.__version__, "transformers": transformers.__version__}
    for seed in args.seeds:
        report = merge(out / "race.json", settings, machine, race(args, data, seed, out))   # written every seed
        plot(report, out / "race.png")
        (out / "race.md").write_text(markdown(report))
    print((out / "race.md").read_text())


if __name__ == "__main__":
    main()
