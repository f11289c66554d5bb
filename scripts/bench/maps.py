"""Maps family: what attention maps cost. The forward pass of the encoder-decoder (the seq2seq family's
Marian-sized model, fp32, eval) with no maps, with one layer's cross-attention maps (`AttentionRecorder`: that
layer alone leaves the fused path), and with every layer's maps, against transformers' `MarianMTModel` with and
without `output_attentions=True` (which computes every layer's weights). Opt-in: `--only maps` (about a minute on
2 CPU cores at default sizes)."""

from __future__ import annotations

import torch

from lightning_tfm.viz.recorder import AttentionRecorder

from .pairs import check_parity, marian_pair, random_ids
from .timing import Bench


def bench_maps(b: Bench) -> None:
    s, dev = b.s, b.device
    peer, ours = marian_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    src = random_ids(s.batch, s.seq, vocab=s.vocab, device=dev)
    tgt = random_ids(s.batch, s.seq, vocab=s.vocab, device=dev)
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
        check_parity("seq2seq", ours(src[:2, :16], tgt[:2, :12]),
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
