"""Decoding speed and quality on ONE set of trained translation weights: transformers' `generate` (fp32, the
peer), ours converted with `from_huggingface` (fp32, bf16, int8 through `to_inference_precision`) and
CTranslate2 (fp32, int8), in one process with the same threads. A precision this machine cannot run natively is
a row with the reason instead of numbers.

    python scripts/decode_table.py --marian DIR --tokenizer tokenizer.json     # a save_pretrained MarianMTModel
    python scripts/decode_table.py --train-minutes 3 --greedy-sentences 20    # train one first, then measure

Workloads, timed around the decoder calls only (one untimed warm-up batch first): (1) beam 4 (alpha 0.6) over
the test split in length-sorted batches of 32: sentences/s and BLEU; (2) greedy search at batch 1 over the first
`--greedy-sentences` sentences: generated tokens/s (EOS included) and how many outputs equal the peer's. Scoring
is race_score's (sources `tokens eos`, outputs cut at source length + 50, sacreBLEU 13a). Length penalties
differ by design: ours is GNMT's ((5 + |Y|) / 6)^alpha, transformers and CTranslate2 divide by |Y|^alpha.
Writes OUT/decode_table.json and OUT/decode_table.md, each row with wall and CPU seconds and the load average.

Measure on an idle machine: with other jobs on the cores, `--threads` above the idle ones makes OpenMP runtimes
wait on descheduled threads (CTranslate2 at 2 threads on a loaded 2-core machine ran the same batches in 1x to
15x the time of 1 thread); `--threads 1` is the steadier choice there."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

# run as a file, Python already puts scripts/ first; imported from elsewhere, it may not
if str(Path(__file__).resolve().parent) not in map(str, sys.path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_systems as systems  # noqa: E402
import sacrebleu  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from race_marian import specials  # noqa: E402
from race_score import EvalSet, Translator, bleu, eval_set  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_tfm.data.tokenizers import load_tokenizer  # noqa: E402
from lightning_tfm.inference import Converted, to_inference_precision  # noqa: E402
from lightning_tfm.models.hf_convert import from_huggingface  # noqa: E402
from lightning_tfm.precision import cpu_flags, cpu_model  # noqa: E402

BEAM, ALPHA, BATCH, MAX_EXTRA_LEN = 4, 0.6, 32, 50
ROWS = (("transformers", "fp32"), ("lightning_tfm", "fp32"), ("lightning_tfm", "bf16"), ("lightning_tfm", "int8"),
        ("ctranslate2", "fp32"), ("ctranslate2", "int8"))
# a system is built per beam size, or says why it cannot run
Factory = Callable[[int], Translator]


class Timed:
    """A Translator that sums the wall and CPU seconds of its calls and keeps each sentence's output ids (cut
    at its cap and after its first eos) in call order. CPU seconds (all threads of this process) are what a
    shared machine's other load inflates least.

    Args:
        translator: the decoder to time.
        eos: end-of-sentence id.
    """

    def __init__(self, translator: Translator, eos: int) -> None:
        self.translator, self.eos = translator, eos
        self.seconds, self.cpu_seconds, self.outputs = 0.0, 0.0, []

    def __call__(self, src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        start, cpu = time.perf_counter(), time.process_time()
        out = self.translator(src, src_mask, max_extra_len)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        for row, cap in zip(out.tolist(), (src_mask.sum(-1) + max_extra_len).tolist()):
            row = row[:cap]
            self.outputs.append(row[: row.index(self.eos) + 1] if self.eos in row else row)
        return out


def workload(translator: Translator, data: EvalSet, tokenizer: Tokenizer) -> tuple[dict[str, Any], list]:
    """Warm up on the first batch, then decode and score `data`; the measurements and the outputs."""
    eos = specials(tokenizer)[2]
    _, src, src_mask = data.batches[0]
    translator(src, src_mask, MAX_EXTRA_LEN)                                       # warm-up, untimed
    timed = Timed(translator, eos)
    score, signature = bleu(timed, data, tokenizer, eos, MAX_EXTRA_LEN)
    tokens = sum(map(len, timed.outputs))
    return {"seconds": round(timed.seconds, 4), "cpu_seconds": round(timed.cpu_seconds, 4),
            "load_1min": round(os.getloadavg()[0], 2), "sentences": len(data.refs), "new_tokens": tokens,
            "sent_per_s": round(len(data.refs) / timed.seconds, 3), "tok_per_s": round(tokens / timed.seconds, 2),
            "bleu": round(score, 2), "bleu_signature": signature}, timed.outputs


def greedy_set(prefix: Path, tokenizer: Tokenizer, n: int) -> EvalSet:
    """The first n sentences of the split, in file order, one per batch."""
    pad, _, eos = specials(tokenizer)
    full = eval_set("greedy", prefix, tokenizer, pad, eos, batch_size=1)
    batches = sorted((b for b in full.batches if b[0][0] < n), key=lambda b: b[0][0])
    return EvalSet(f"first {n}", full.refs[:n], batches)


def measure(make: Factory, beam_data: EvalSet, greedy_data: EvalSet, tokenizer: Tokenizer) -> dict[str, Any]:
    """Both workloads for one system; the greedy outputs ride along under "_greedy" (not written out)."""
    beam, _ = workload(make(BEAM), beam_data, tokenizer)
    greedy, outputs = workload(make(1), greedy_data, tokenizer)
    return {"beam4": beam, "greedy_b1": greedy, "_greedy": outputs}


def ours_rows(folder: Path, tokenizer: Tokenizer, run: Callable[[Factory], dict]) -> list[dict[str, Any]]:
    """Ours in each precision, converted in place and restored between rows; a refusal becomes the row."""
    model = from_huggingface(folder)
    rows = []
    for precision in ("fp32", "bf16", "int8"):
        try:
            with warnings.catch_warnings(record=True) as caught:     # e.g. int8 measured no faster: kept fp32
                warnings.simplefilter("always")
                converted = to_inference_precision(model, precision)
        except ValueError as e:
            rows.append({"refused": str(e)})
            continue
        try:
            row = run(lambda beam: systems.ours_translator(model, tokenizer, beam, ALPHA))
        finally:
            converted.restore()
        rows.append({**row, **_conversion(converted, [str(w.message) for w in caught])})
    return rows


def _conversion(converted: Converted, warned: list[str]) -> dict[str, Any]:
    """What `to_inference_precision` did (int8: which layers compute in int8, from how many rows), its
    warnings and the length penalty, as the row's note and record."""
    if converted.precision != "int8":
        return {"note": "; ".join(["GNMT length penalty ((5+len)/6)^alpha", *warned])}
    int8 = {"quantized": converted.quantized, "kept_fp32": getattr(converted, "kept_float", 0),
            "int8_from_rows": getattr(converted, "min_rows", {})}
    note = f"{int8['quantized']} linear maps in int8, {int8['kept_fp32']} kept fp32; GNMT length penalty"
    return {"note": "; ".join([note, *warned]), "int8": int8}


def ct2_rows(folder: Path, tokenizer: Tokenizer, threads: int, positions: int,
             run: Callable[[Factory], dict]) -> list[dict[str, Any]]:
    """CTranslate2 with float32 and int8 weights, each converted into a temporary folder."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("float32", "int8"):
            problem = systems.ct2_problem(quantization)
            if problem:
                rows.append({"refused": problem})
                continue
            model = systems.ct2_model(folder, tokenizer, Path(tmp) / quantization, quantization, threads)
            row = run(lambda beam: systems.ct2_translator(model, tokenizer, positions, beam, ALPHA))
            rows.append({**row, "note": f"weights and compute {quantization}; length penalty len^alpha"})
    return rows


def all_rows(folder: Path, tokenizer: Tokenizer, args: argparse.Namespace) -> list[dict[str, Any]]:
    pad, _, eos = specials(tokenizer)
    beam_data = eval_set("test", args.test_prefix, tokenizer, pad, eos, batch_size=BATCH)
    greedy_data = greedy_set(args.test_prefix, tokenizer, args.greedy_sentences)

    def run(make: Factory) -> dict[str, Any]:
        return measure(make, beam_data, greedy_data, tokenizer)

    peer = transformers.MarianMTModel.from_pretrained(folder).eval()
    rows = [{**run(lambda beam: systems.generate_translator(peer, beam, ALPHA)), "note": "length penalty len^alpha"}]
    rows += ours_rows(folder, tokenizer, run)
    rows += ct2_rows(folder, tokenizer, args.threads, peer.config.max_position_embeddings, run)
    return [{"system": s, "precision": p, **row} for (s, p), row in zip(ROWS, rows)]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed / the peer's speed, and which greedy outputs equal the peer's (then drop the outputs)."""
    peer = rows[0]
    for row in rows:
        if "refused" in row:
            continue
        for key, speed in (("beam4", "sent_per_s"), ("greedy_b1", "tok_per_s")):
            row[key]["ratio"] = round(row[key][speed] / peer[key][speed], 3)
        same = sum(a == b for a, b in zip(row["_greedy"], peer["_greedy"]))
        row["greedy_b1"]["same_as_transformers"] = f"{same}/{len(peer['_greedy'])}"
    for row in rows:
        row.pop("_greedy", None)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| system | precision | beam-4 sent/s | ratio | BLEU | greedy b1 tok/s | ratio | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['system']} | {r['precision']} | – | – | – | – | – | refused: {_cell(r['refused'])} |")
            continue
        b, g = r["beam4"], r["greedy_b1"]
        note = r["note"] if r is rows[0] else f"{r['note']}; greedy = transformers' on {g['same_as_transformers']}"
        lines.append(f"| {r['system']} | {r['precision']} | {b['sent_per_s']:.1f} | {b['ratio']:.2f} | "
                     f"{b['bleu']:.2f} | {g['tok_per_s']:.0f} | {g['ratio']:.2f} | {_cell(note)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")                      # a bare pipe would end the markdown cell


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "ctranslate2": systems.ctranslate2.__version__ if systems.ctranslate2 else None,
            "sacrebleu": sacrebleu.__version__, "cpu_model": cpu_model(), "cpu_flags": sorted(cpu_flags()),
            "threads": args.threads, "beam": BEAM, "alpha": ALPHA, "batch_size": BATCH,
            "max_extra_len": MAX_EXTRA_LEN, "greedy_sentences": args.greedy_sentences,
            "test_prefix": str(args.test_prefix)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--marian", type=Path, help="a save_pretrained MarianMTModel folder (else --train-minutes)")
    p.add_argument("--tokenizer", type=Path, help="our tokenizer.json the model was trained with")
    p.add_argument("--train-minutes", type=float, help="train a MarianMTModel this long first (no --marian)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/multi30k"), help="folder of train/test2016")
    p.add_argument("--test-prefix", type=Path, help="split to decode, PREFIX.en/.de; default DATA/test2016")
    p.add_argument("--greedy-sentences", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/decode_table"))
    args = p.parse_args(argv)
    if (args.marian is None) == (args.train_minutes is None):
        p.error("give exactly one of --marian DIR (with --tokenizer) and --train-minutes M")
    if args.marian is not None and args.tokenizer is None:
        p.error("--marian needs --tokenizer, the tokenizer.json the model was trained with")
    args.test_prefix = args.test_prefix or args.data / "test2016"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every row, write OUT/decode_table.{json,md}, print the table; returns the JSON record."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    folder, tokenizer_path = args.marian, args.tokenizer
    if folder is None:
        tokenizer_path = tokenizer_path or systems.default_tokenizer(args.data / "train", args.out)
        folder = systems.train_folder(args.data / "train", tokenizer_path, args.out, args.train_minutes)
    tokenizer = load_tokenizer(tokenizer_path)
    load_before = os.getloadavg()
    rows = all_rows(folder, tokenizer, args)
    add_ratios(rows)
    record = {"meta": {**meta(args), "marian": str(folder), "tokenizer": str(tokenizer_path),
                       "load_before": load_before, "load_after": os.getloadavg()}, "rows": rows}
    (args.out / "decode_table.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(rows)
    (args.out / "decode_table.md").write_text(table)
    print(table, end="")
    return record


if __name__ == "__main__":
    main()
