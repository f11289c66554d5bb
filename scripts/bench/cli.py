"""The command line: parses the flags, runs the chosen families in a fixed order (the model families first,
since the data family compares against their training rates), prints the table and writes the JSON."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from . import __doc__ as _overview
from .classifier import bench_classifier
from .data import bench_data
from .decoder import bench_decoder
from .maps import bench_maps
from .mfu import bench_mfu
from .report import meta, table, write_json
from .seq2seq import bench_seq2seq
from .timing import QUICK, TINY, Bench, Sizes

FAMILIES = ("decoder", "classifier", "seq2seq", "data", "mfu", "maps")
DEFAULT = ("decoder", "classifier", "seq2seq", "data", "mfu")   # maps adds about a minute: opt-in


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    s = Sizes(**(TINY if args.tiny else QUICK if args.quick else {}))
    b = Bench(s, torch.device(args.device))
    b.log(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, sizes {asdict(s)}")
    training = {}
    for family, bench in (("decoder", bench_decoder), ("classifier", bench_classifier), ("seq2seq", bench_seq2seq)):
        if family in args.only:
            training[family] = bench(b)
    if "data" in args.only:
        bench_data(b, args.data, training, 1 if args.quick else 3)
    if "mfu" in args.only:
        bench_mfu(b, args.peak_tflops and args.peak_tflops * 1e12, args.quick)
    if "maps" in args.only:
        bench_maps(b)
    print(table(b.records))
    if args.json:
        write_json(args.json, meta(args.quick, args.tiny, s, b.device), b.records)
        b.log(f"wrote {args.json}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=_overview.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter sequences (< 3 min, 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="2-layer d_model 64 models: only checks the script runs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shipped corpora")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(DEFAULT),
                        help=f"families to run (default: {' '.join(DEFAULT)}; maps only when named)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, for MFU")
    return parser
