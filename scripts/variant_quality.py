"""Learning curves of the attention variants in configs/variants/ next to full attention's, at one time budget.

Each run is `lightning_tfm fit --config configs/variants/<base>.yaml --config configs/variants/<run>.yaml`,
exactly as a user types it, one at a time; the run's group (its name's prefix: lm, cls, long) picks the base.
metrics.csv has no time column, so while a run trains this script watches the file (CSVLogger writes each row
as it is logged) and stamps every validation row with the seconds since the command started: measured, not
estimated, and including the ~10 s the command spends importing and reading the data. It writes OUT.json and
OUT.md: per run the final and best validation metric (val_loss, or val_acc for cls), the steps done (the last
logged step, within log_every_n_steps of the true count), the wall time, and the seconds at which the run first
reached its group's full-attention final value (`<group>_full` must be in OUT.json, from this or an earlier
invocation). OUT.png plots each group's curves against wall-clock seconds.

    python scripts/variant_quality.py                                   # every run: about an hour on 2 cores
    python scripts/variant_quality.py --only long_full long_window      # some of them
    python scripts/variant_quality.py --only lm_full lm_window --budget 00:00:05:00   # trainer.max_time of each
    python scripts/variant_quality.py --root runs/variants --out results/variants_quality
    # any other argument goes to every `fit`, e.g. a 20-step smoke run:
    python scripts/variant_quality.py --only lm_full lm_window --budget null --trainer.max_steps 20

This is not a test: compare wall-clock times only between runs made on the same quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = Path("configs/variants")
# group (a run name's prefix) -> (base config, validation metric, "min" or "max" is better)
GROUPS = {"lm": ("shakespeare_base", "val_loss", "min"), "cls": ("sst2_base", "val_acc", "max"),
          "long": ("long_context_base", "val_loss", "min")}
RUNS = [p.stem for p in sorted((REPO / VARIANTS).glob("*.yaml"))
        if p.stem.split("_")[0] in GROUPS and not p.stem.endswith("_base")]
POLL_S = 1.0


def _cli() -> list[str]:
    """The `lightning_tfm` command installed beside this Python, else the module it runs."""
    script = Path(sys.executable).with_name("lightning_tfm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_tfm.cli"]


def _rows(metrics_csv: Path) -> list[dict[str, str]]:
    """The complete rows of a CSV that may be half written (the last line is kept only once it ends)."""
    text = metrics_csv.read_text()
    return list(csv.DictReader(text[: text.rfind("\n") + 1].splitlines()))


def _stamp(log_dir: Path, known: set[Path], metric: str, stamps: dict[int, float], seconds: float) -> None:
    """Give each new validation row (by step) of the run's metrics.csv the time it was first seen."""
    new = sorted(set(log_dir.glob("version_*/metrics.csv")) - known, key=lambda p: p.stat().st_mtime)
    for row in _rows(new[-1]) if new else []:
        if row.get(metric):
            stamps.setdefault(int(row["step"]), seconds)


def _fit(cmd: list[str], log: Path, log_dir: Path, metric: str) -> tuple[float, dict[int, float], Path]:
    """Run `fit`, polling its CSV log; return the wall time, step -> seconds of each validation, the CSV."""
    known = set(log_dir.glob("version_*/metrics.csv"))      # an earlier run's logs in the same root
    stamps: dict[int, float] = {}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(POLL_S)
            _stamp(log_dir, known, metric, stamps, time.perf_counter() - start)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    _stamp(log_dir, known, metric, stamps, wall)
    (metrics_csv,) = sorted(set(log_dir.glob("version_*/metrics.csv")) - known)
    return wall, stamps, metrics_csv


def _summary(metrics_csv: Path, metric: str, mode: str, stamps: dict[int, float]) -> dict:
    rows = _rows(metrics_csv)
    curve = [[round(stamps[int(r["step"])], 1), int(r["step"]) + 1, float(r[metric])] for r in rows if r.get(metric)]
    if not curve:
        sys.exit(f"{metrics_csv} has no {metric}")
    values = [value for _, _, value in curve]
    return {"final": values[-1], "best": (min if mode == "min" else max)(values),
            "steps": max(int(r["step"]) for r in rows) + 1, "curve": curve}


def _reached(run: dict, target: float, mode: str) -> float | None:
    """Seconds at which the run's validation metric first reached `target`; None if it never did."""
    return next((s for s, _, v in run["curve"] if (v <= target if mode == "min" else v >= target)), None)


def _write_report(results: dict, out: Path) -> None:
    lines = [f"Measured on {os.cpu_count()} CPUs ({platform.machine()}). Seconds are wall-clock since the command "
             "started (import and data loading included); a validation is stamped when its row appears in "
             "metrics.csv. Steps: the last logged step.", "",
             "| run | metric | final | best | steps | wall time | reached full's final at |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        group = name.split("_")[0]
        reference = results.get(f"{group}_full")
        reached = "no full run"
        if reference:
            seconds = _reached(r, reference["final"], GROUPS[group][2])
            r["reached_full_final_s"] = seconds
            reached = f"{seconds:.0f} s" if seconds is not None else "not reached"
        lines.append(f"| `{name}` | {r['metric']} | {r['final']:.4f} | {r['best']:.4f} | {r['steps']} | "
                     f"{r['wall_seconds']:.0f} s | {reached} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results.values()]
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(name.split("_")[0] == g for name in results)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        if f"{group}_full" in results:     # the value the others race to
            ax.axhline(results[f"{group}_full"]["final"], color="gray", linestyle=":", linewidth=1)
        for name, r in results.items():
            if name.split("_")[0] == group:
                seconds, _, values = zip(*r["curve"])
                ax.plot(seconds, values, marker=".", label=name, linewidth=2.5 if name.endswith("_full") else 1.2)
        ax.set(title=f"{group}: {GROUPS[group][0]}", xlabel="wall-clock seconds since the command started",
               ylabel=GROUPS[group][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--only", nargs="*", choices=RUNS, help="runs to do (default: all)")
    parser.add_argument("--budget", help="trainer.max_time of every run (DD:HH:MM:SS, or null for none); "
                                         "default: each base config's own")
    parser.add_argument("--root", default="runs/variants", help="folder for the runs' outputs")
    parser.add_argument("--out", default="results/variants_quality", help="writes OUT.json, OUT.md and OUT.png")
    args, fit_args = parser.parse_known_args()
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for name in args.only or RUNS:
        base, metric, mode = GROUPS[name.split("_")[0]]
        root = Path(args.root) / name                       # as typed, relative to the repository root
        (REPO / root).mkdir(parents=True, exist_ok=True)
        configs = ["--config", str(VARIANTS / f"{base}.yaml"), "--config", str(VARIANTS / f"{name}.yaml")]
        extra = ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
        extra += ["--trainer.max_time", args.budget] if args.budget else []
        extra += fit_args
        wall, stamps, metrics_csv = _fit(_cli() + ["fit", *configs, *extra], REPO / root / "fit.log",
                                         REPO / root / "logs", metric)
        results[name] = {"command": " ".join(["lightning_tfm fit", *configs, *extra]), "metric": metric,
                         "wall_seconds": round(wall, 1), "log": os.path.relpath(metrics_csv, REPO),
                         **_summary(metrics_csv, metric, mode, stamps)}
        print(f"{name}: {metric} final {results[name]['final']:.4f}, best {results[name]['best']:.4f}, "
              f"{results[name]['steps']} steps in {wall:.0f} s")
        _write_report(results, out)
    _plot(results, out)


if __name__ == "__main__":
    main()
