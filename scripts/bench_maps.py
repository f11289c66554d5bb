"""What attention maps cost: the forward pass of the encoder-decoder (the bench's Marian-sized model, fp32, eval)
with no maps, with one layer's cross-attention maps (`AttentionRecorder`: that layer alone leaves the fused path),
and with every layer's maps, against transformers' `MarianMTModel` with and without `output_attentions=True`
(which computes every layer's weights). Same weights on both sides (converted with `from_huggingface`, logits
checked to 1e-4), timed alternately after warm-up as in scripts/bench.py.

    python scripts/bench_maps.py --json results/bench_maps.json       # about a minute on 2 CPU cores
    python scripts/bench_maps.py --tiny                                # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch
import transformers
from bench import QUICK, TINY, Bench, Sizes, _check_parity, _ids, _marian_pair, _meta, _table

from lightning_tfm.viz.recorder import AttentionRecorder


def bench_maps(b: Bench) -> None:
    s, dev = b.s, b.device
    peer, ours = _marian_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    src, tgt = _ids(s.batch, s.seq, vocab=s.vocab, device=dev), _ids(s.batch, s.seq, vocab=s.vocab, device=dev)
    mask = torch.ones_like(src, dtype=torch.bool)
    n = 2 * src.numel()                                                # source and target tokens

    def ours_with(selection: dict | None):
        def run() -> int:
            with torch.no_grad():
                if selection is None:
                    ours(src, tgt, mask, mask)
                else:
                    with AttentionRecorder(ours, selection):
                        ours(src, tgt, mask, mask)
            return n
        return run

    def peer_with(output_attentions: bool):
        def run() -> int:
            with torch.no_grad():
                peer(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt,
                     decoder_attention_mask=mask.long(), output_attentions=output_attentions)
            return n
        return run

    with torch.no_grad():
        _check_parity("seq2seq", ours(src[:2, :16], tgt[:2, :12]),
                      peer(input_ids=src[:2, :16], decoder_input_ids=tgt[:2, :12]).logits, b.log)
    last = s.n_layers - 1
    one, every = {"cross": [last]}, {"encoder": None, "decoder": None, "cross": None}
    b.compare("forward: ours one layer's maps / ours no maps", "tok/s", ours_with(one), ours_with(None),
              note=f"cross-attention of layer {last}, all heads; ratio 1 = free")
    b.compare("forward: ours every layer's maps / ours no maps", "tok/s", ours_with(every), ours_with(None),
              note="every layer on the explicit path")
    b.compare("forward with maps: ours one layer / transformers output_attentions", "tok/s", ours_with(one),
              peer_with(True), note="transformers computes every layer's weights (eager attention)")
    b.compare("forward without maps: ours / transformers", "tok/s", ours_with(None), peer_with(False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter sequences")
    parser.add_argument("--tiny", action="store_true", help="2-layer d_model 64 models: only checks the script runs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    s = Sizes(**(TINY if args.tiny else QUICK if args.quick else {}))
    b = Bench(s, torch.device(args.device))
    bench_maps(b)
    print(_table(b.records))
    if args.json:
        meta = {**_meta(argparse.Namespace(quick=args.quick, tiny=args.tiny), s, b.device)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": [asdict(r) for r in b.records]}, f, indent=1)
        b.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
