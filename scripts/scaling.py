"""How each attention variant's cost grows with the sequence length, next to full attention (SDPA).

One forward + backward of one attention block (d_model 256, 4 heads, batch 1; causal, or bidirectional for the
variants that are bidirectional only, next to bidirectional full attention "full (bidir.)") at each length, each
measurement in a fresh process so its peak resident memory is its own: the time (median of the repeats) and
the peak memory the pass adds on top of the inputs. Then a least-squares fit of log(time) and log(memory)
against log(T) gives each variant's growth exponent, and the crossover is the first length from which the
variant is faster than full attention.

    python scripts/scaling.py                                  # T = 512 .. 16384, every variant
    python scripts/scaling.py --lengths 512 1024 --only full window
    python scripts/scaling.py --out results/scaling            # writes scaling.json, scaling.md, scaling.png

This is not a test: it takes about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D_MODEL, N_HEADS = 256, 4


def variants() -> dict:
    """name -> (factory (d_model, n_heads, place) -> attention block, what it is)."""
    from lightning_tfm.blocks import attention_variants as av
    from lightning_tfm.blocks.attention import MultiHeadAttention

    return {
        "full": (MultiHeadAttention, "full attention (SDPA)"),
        "window": (partial(av.SlidingWindowAttention, window=256), "sliding window 256"),
        "dilated": (partial(av.DilatedWindowAttention, window=128, dilation=2), "dilated window 128 x 2"),
        "strided": (partial(av.StridedAttention, stride=128), "strided, stride 128"),
        "band+strided": (partial(av.BandStridedAttention, window=128, stride=128), "band 128 + stride 128"),
        "block+global": (partial(av.BlockGlobalAttention, block=128, n_global=16), "block 128 + 16 global"),
        "adaptive_span": (partial(av.AdaptiveSpanAttention, max_span=1024, init_span=0.25),
                          "adaptive span (spans 256 of 1024)"),
        "persistent_memory": (partial(av.PersistentMemoryAttention, n_memory=16), "full + 16 memory slots"),
        "routing": (_routing, "k-means routing, sqrt(T) clusters, window 64"),
        "linear": (av.LinearAttention, "linear attention, elu + 1"),
        "performer": (partial(av.PerformerAttention, n_features=64), "Performer, 64 random features"),
        "compressed": (partial(av.MemoryCompressedAttention, compression=4), "memory-compressed, r = 4"),
        "full (bidir.)": (MultiHeadAttention, "full attention (SDPA), bidirectional"),
        "clustered": (partial(av.ClusteredAttention, n_clusters=64), "clustered, 64 query clusters"),
        "linformer": (partial(av.LinformerAttention, projected_len=256), "Linformer, k = 256"),
        "inducing_points": (partial(av.InducingPointAttention, n_inducing=64), "Set Transformer, 64 points"),
        "poolingformer": (partial(av.PoolingformerAttention, window=128, pool_window=512, pool=4),
                          "Poolingformer, window 128, pooled 512 / 4"),
    }


def _routing(d_model: int, n_heads: int, place):
    """The paper's choice of about sqrt(T) clusters (T the longest sequence), so clusters hold about sqrt(T)."""
    from lightning_tfm.blocks.attention_variants import RoutingAttention

    return RoutingAttention(d_model, n_heads, place, n_clusters=max(1, round(math.sqrt(place.max_len))), window=64)


def _causal(name: str) -> bool:
    """Whether a variant is measured causal: all but the bidirectional-only ones (and "full (bidir.)")."""
    factory = variants()[name][0]
    cls = factory.func if isinstance(factory, partial) else factory
    supports = getattr(cls, "supports", None)
    return name != "full (bidir.)" and (supports is None or supports.causal)


def measure_one(name: str, length: int, repeats: int, threads: int) -> dict:
    """Time and peak memory of forward + backward of one block; run in its own process."""
    import torch

    from lightning_tfm.blocks.attention import LayerPlace
    from lightning_tfm.blocks.masks import AttentionMask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    causal = _causal(name)
    block = variants()[name][0](D_MODEL, N_HEADS, LayerPlace(causal=causal, max_len=length))
    x = torch.randn(1, length, D_MODEL, requires_grad=True)
    mask = AttentionMask(causal=causal)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(x, mask=mask).sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": name, "T": length, "causal": causal, "seconds": sorted(times)[len(times) // 2],
            "peak_mib": (peak - before) / 1024}


def _fit(points: list[tuple[int, float]]) -> float | None:
    """Slope of log(y) against log(T) by least squares."""
    points = [(t, y) for t, y in points if y > 0]
    if len(points) < 2:
        return None
    xs, ys = [math.log(t) for t, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def summarise(records: list[dict]) -> dict:
    names = list(dict.fromkeys(r["variant"] for r in records))
    summary = {}
    for name in names:
        reference = "full" if _causal(name) else "full (bidir.)"      # compared with full attention of its kind
        full = {r["T"]: r["seconds"] for r in records if r["variant"] == reference}
        rows = sorted((r for r in records if r["variant"] == name), key=lambda r: r["T"])
        faster = [r["T"] for r in rows if r["T"] in full and r["seconds"] < full[r["T"]]]
        crossover = next((t for t in faster if all(u in faster for u in full if u >= t)), None)
        summary[name] = {"time_exponent": _fit([(r["T"], r["seconds"]) for r in rows]),
                         "memory_exponent": _fit([(r["T"], r["peak_mib"]) for r in rows]),
                         "crossover_T": None if name.startswith("full") else crossover}
    return summary


def table(records: list[dict], summary: dict) -> str:
    lengths = sorted({r["T"] for r in records})
    by = {(r["variant"], r["T"]): r for r in records}
    head = "| variant | " + " | ".join(f"T={t}" for t in lengths) + " | time exp. | memory exp. | faster from |"
    lines = [head, "|" + "---|" * (len(lengths) + 4)]
    for name, s in summary.items():
        cells = [f"{by[name, t]['seconds']:.3f} s / {by[name, t]['peak_mib']:.0f} MiB" if (name, t) in by else "-"
                 for t in lengths]
        exponents = [f"{e:.2f}" if e is not None else "-" for e in (s["time_exponent"], s["memory_exponent"])]
        cross = "-" if name.startswith("full") else (f"T={s['crossover_T']}" if s["crossover_T"] else "never")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {exponents[0]} | {exponents[1]} | {cross} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """The log-log plot of `lightning_tfm plot scaling`, with this script's block sizes in the title."""
    from lightning_tfm.viz.scaling_plot import TITLE, draw_scaling

    draw_scaling(records, path, f"{TITLE}, d_model {D_MODEL}, {N_HEADS} heads, CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--only", nargs="+", help="variants to measure (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0,
                        help="skip a variant's longer lengths once one pass takes longer than this (seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scaling")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return
    names = args.only or list(variants())
    unknown = sorted(set(names) - set(variants()))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(variants())}")
    records = []
    for name in names:
        for length in sorted(args.lengths):
            cmd = [sys.executable, __file__, "--one", name, str(length), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if result.returncode:
                print(f"{name} T={length}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                break
            record = json.loads(result.stdout.strip().splitlines()[-1])
            records.append(record)
            print(f"{name:>18} T={length:>6}: {record['seconds']:.3f} s, {record['peak_mib']:.0f} MiB", flush=True)
            if record["seconds"] > args.budget:
                break
    summary = summarise(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"records": records, "summary": summary}, indent=1))
    Path(f"{args.out}.md").write_text(table(records, summary) + "\n")
    plot(records, Path(f"{args.out}.png"))
    print(table(records, summary))


if __name__ == "__main__":
    main()
