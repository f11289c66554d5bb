"""Train the small configs on this machine's CPU and record the quality they reach, with wall times.

Each run is `lightning_tfm fit` followed by `test` (or `validate`, where the data has no test split) from
the best checkpoint, exactly as a user would type them. Translation evaluates, as the paper did, the average
of the last 5 epoch checkpoints (`lightning_tfm average`), and the best one by validation BLEU beside it.
Results go to a JSON file and a Markdown table.

    python scripts/quality.py                       # every task
    python scripts/quality.py --only lm sst2        # some of them
    python scripts/quality.py --root runs/quality --out results/quality

This is not a test: it takes about an hour and a half on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (config, evaluation subcommand, metric, target, checkpoints to average (a glob) or None)
RUNS = {
    "lm": ("configs/lm/shakespeare_char_small.yaml", "validate", "val_loss", "<= 1.80 nats", None),
    "sst2": ("configs/classification/sst2_small.yaml", "validate", "val_acc", ">= 0.82", None),
    "ag_news": ("configs/classification/ag_news_small.yaml", "test", "test_acc", ">= 0.86", None),
    "multi30k": ("configs/translation/multi30k_small.yaml", "test", "test_bleu", ">= 35 BLEU", "epoch-*.ckpt"),
}


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit code {result.returncode}; see {log}")
    return time.perf_counter() - start


def _last_metric(metrics_csv: Path, name: str) -> float:
    values = [row[name] for row in csv.DictReader(metrics_csv.open()) if row.get(name)]
    if not values:
        sys.exit(f"{metrics_csv} has no {name}")
    return float(values[-1])


def _evaluate(cli: list[str], evaluate: str, common: list[str], checkpoint: Path, metric: str,
              save_dir: Path) -> tuple[float, float]:
    """Run `validate`/`test` from a checkpoint; return the metric and the wall time."""
    seconds = _run(cli + [evaluate, *common, "--trainer.default_root_dir", str(save_dir), "--ckpt_path",
                          str(checkpoint)], save_dir.with_suffix(f".{evaluate}.log"))
    return _last_metric(next(save_dir.rglob("metrics.csv")), metric), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do (default: all)")
    parser.add_argument("--root", default="runs/quality", help="folder for the runs' outputs")
    parser.add_argument("--out", default="results/quality", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "lightning_tfm.cli"]
    results = {}
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for name in args.only or RUNS:
        config, evaluate, metric, target, average = RUNS[name]
        root = REPO / args.root / name
        common = ["--config", config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                  "false"]
        root.mkdir(parents=True, exist_ok=True)
        fit_s = _run(cli + ["fit", *common], root / "fit.log")
        checkpoints = root / "checkpoints"
        chosen = checkpoints / "best.ckpt"
        result = {"config": config, "metric": metric, "target": target, "fit_seconds": round(fit_s),
                  "command": f"lightning_tfm fit --config {config}"}
        if average:
            result["best_value"], _ = _evaluate(cli, evaluate, common, chosen, metric, root / "eval_best")
            chosen = checkpoints / "averaged.ckpt"
            _run(cli + ["average", *map(str, sorted(checkpoints.glob(average))), "--last", "5", "--output",
                        str(chosen)], root / "average.log")
        result["value"], eval_s = _evaluate(cli, evaluate, common, chosen, metric, root / "eval")
        result.update(checkpoint=chosen.name, eval_seconds=round(eval_s))
        results[name] = result
        print(f"{name}: {metric} = {result['value']:.4f} (target {target}) from {chosen.name}; "
              f"fit {fit_s / 60:.1f} min, {evaluate} {eval_s:.0f} s")
        previous.update(results)
        out.with_suffix(".json").write_text(json.dumps(previous, indent=1))
    lines = ["| task | config | metric | value | target | training wall time | evaluation |",
             "|---|---|---|---|---|---|---|"]
    for name, r in previous.items():
        value = f"{r['value']:.4f}" + (f" ({r['checkpoint']}; best.ckpt {r['best_value']:.4f})"
                                       if "best_value" in r else "")
        lines.append(f"| {name} | `{r['config']}` | {r['metric']} | {value} | {r['target']} | "
                     f"{r['fit_seconds'] / 60:.1f} min | {r['eval_seconds']} s |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
