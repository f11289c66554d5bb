"""The race's outputs (scripts/race.py): race.json kept across invocations (a run replaces the earlier run of
the same system and seed when the settings match; other settings start a new file), the Markdown tables
(BLEU at each snapshot, final numbers, mean and range over seeds) and the curves of test BLEU against
training minutes."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lightning_tfm.viz.canvas import figure, save_png

NAMES = {"ours": "lightning_tfm (ours)", "marian": "transformers MarianMTModel"}
COLORS = {"ours": "tab:blue", "marian": "tab:orange"}


def merge(path: Path, settings: dict[str, Any], machine: dict[str, Any], runs: list[dict[str, Any]]) -> dict:
    """Add `runs` to the report at `path` (same settings) or start a new one; write it; return it."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report.get("settings") != settings:
        report = {"settings": settings, "machine": machine, "runs": []}
    new = {(r["system"], r["seed"]) for r in runs}
    report["runs"] = sorted([r for r in report["runs"] if (r["system"], r["seed"]) not in new] + runs,
                            key=lambda r: (r["system"] != "ours", r["seed"]))
    report["machine"] = machine
    signatures = {s.get("bleu_signature") for r in report["runs"] for s in r["snapshots"]}
    report["bleu_signature"] = " / ".join(sorted(filter(None, signatures)))
    path.write_text(json.dumps(report, indent=1))
    return report


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def _snapshot_table(report: dict, key: str) -> list[str]:
    runs = report["runs"]
    systems = [s for s in NAMES if any(r["system"] == s for r in runs)]
    marks = sorted({s["mark_minutes"] for r in runs for s in r["snapshots"]})
    head = ["training minutes"]
    for system in systems:
        head += [f"{system} seed {r['seed']}" for r in runs if r["system"] == system] + [f"{system} mean [range]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mark in marks:
        row = [f"{mark:g}"]
        for system in systems:
            values = []
            for r in (r for r in runs if r["system"] == system):
                found = [s[key] for s in r["snapshots"] if s["mark_minutes"] == mark]
                values += found
                row.append(f"{found[0]:.2f}" if found else "")
            row.append(_spread(values))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _final_table(report: dict) -> list[str]:
    lines = ["| system | seed | weights | training minutes | steps | tokens seen (src + tgt) | tokens/s | "
             "load before → after | val BLEU | test BLEU |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in report["runs"]:
        kinds = [("last snapshot", r["snapshots"][-1])]
        if r["system"] == "ours":
            n = len(r["final"]["averaged_from"])
            kinds.append((f"averaged ({n} epoch checkpoints)" if n > 1 else
                          f"{r['final']['averaged_from'][0]} (one epoch: nothing to average)", r["final"]))
        load = r.get("load_average", [None, None])
        load = " → ".join(f"{x:.1f}" if x is not None else "?" for x in load)
        for kind, s in kinds:
            rows.setdefault((r["system"], kind.split(" (")[0]), []).append(s)
            lines.append(f"| {r['system']} | {r['seed']} | {kind} | {s['minutes']:.2f} | {s['step']:,} | "
                         f"{s['tokens']:,} | {s['tokens'] / (s['minutes'] * 60):,.0f} | {load} | {s['val_bleu']:.2f} | "
                         f"{s['test_bleu']:.2f} |")
    for (system, kind), values in rows.items():
        if len(values) > 1:
            val, test = _spread([v["val_bleu"] for v in values]), _spread([v["test_bleu"] for v in values])
            steps = statistics.mean(v["step"] for v in values)
            lines.append(f"| **{system}** | mean [range] | {kind} | | {steps:,.0f} | | | | {val} | **{test}** |")
    return lines


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    pairs = f", first {s['max_train_pairs']} training pairs" if s["max_train_pairs"] else ""
    lines = [
        "# Time to quality: lightning_tfm against transformers' MarianMTModel", "",
        f"Multi30k En→De ({s['data']}{pairs}), {s['minutes']:g} training minutes per run, snapshots every "
        f"{s['snapshot_every']:g}; {s['threads']} threads on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"transformers {m['transformers']}; both trained in {s.get('precision', 'fp32')}"
        f"{'; TINY models (smoke run)' if s['tiny'] else ''}.",
        "Training minutes exclude evaluation and checkpoint writing on both sides (scripts/race_clock.py). "
        f"Beam {s['beam']}, length penalty alpha {s['alpha']} (GNMT's form in ours, |Y|^alpha in transformers), at "
        f"most source + {s['max_extra_len']} tokens; sacreBLEU `{report.get('bleu_signature', '')}`.", "",
        "## Test BLEU (test2016) at each snapshot", "", *_snapshot_table(report, "test_bleu"), "",
        "## Validation BLEU at each snapshot", "", *_snapshot_table(report, "val_bleu"), "",
        "## Final", "", *_final_table(report), "",
        "tokens/s: real source + target tokens per training second. Load: the 1-minute load average just before "
        "and after the run trained; above the thread count, something else shared the cores and the times are "
        "not comparable.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    fig, ax = figure(8, 5)
    for r in report["runs"]:
        x = [s["minutes"] for s in r["snapshots"]]
        y = [s["test_bleu"] for s in r["snapshots"]]
        style = "-" if r["seed"] == min(q["seed"] for q in report["runs"]) else "--"
        ax.plot(x, y, style, marker="o", color=COLORS[r["system"]], label=f"{NAMES[r['system']]}, seed {r['seed']}")
        if r["system"] == "ours":
            n = len(r["final"]["averaged_from"])
            ax.plot([x[-1]], [r["final"]["test_bleu"]], marker="*", markersize=12, color=COLORS["ours"],
                    linestyle="none", label=f"ours seed {r['seed']}, " + (f"last {n} epochs averaged" if n > 1 else
                                                                           r["final"]["averaged_from"][0]))
    ax.set_xlabel("training minutes (evaluation and checkpoint writing excluded)")
    ax.set_ylabel("test2016 BLEU (sacreBLEU, beam 4)")
    ax.set_title(f"Multi30k En→De, {report['settings']['threads']} threads: time to quality")
    top = max([s["test_bleu"] for r in report["runs"] for s in r["snapshots"]] + [r["final"]["test_bleu"]
                                                                                 for r in report["runs"]])
    ax.set_ylim(0, max(1.0, top * 1.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
