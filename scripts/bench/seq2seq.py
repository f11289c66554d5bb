"""Encoder-decoder family: our `EncoderDecoder` against `MarianMTModel`. Training tokens/s (source + target)
and peak memory, greedy new tokens/s at batch 1 and 16 with the KV cache, and beam search sentences/s (beam 4,
length penalty 0.6: GNMT's form in ours, |Y|^alpha in transformers) with its peak memory."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tfm.decoding import beam_search, greedy_search
from lightning_tfm.models import EncoderDecoder

from .pairs import BOS, EOS, PAD, check_parity, marian_pair, random_ids
from .timing import Bench, Run
from .workloads import count_generated, no_eos, peer_generate, train_step


def bench_seq2seq(b: Bench) -> float:
    """Returns our training tokens/s, which the data family compares its pipeline against."""
    s, dev = b.s, b.device
    peer, ours = marian_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    src, tgt = random_ids(2, 16, vocab=s.vocab, device=dev), random_ids(2, 12, vocab=s.vocab, device=dev)
    with torch.no_grad():
        check_parity("seq2seq", ours(src, tgt), peer(input_ids=src, decoder_input_ids=tgt).logits, b.log)
    src = random_ids(s.batch, s.seq, vocab=s.vocab, device=dev)
    tgt = random_ids(s.batch, s.seq + 1, vocab=s.vocab, device=dev)
    src_mask, tgt_mask = torch.ones_like(src, dtype=torch.bool), torch.ones_like(tgt[:, :-1], dtype=torch.bool)
    n = s.batch * 2 * s.seq                                         # source and target tokens
    peer.train(), ours.train()
    runs = (train_step(lambda: ours(src, tgt[:, :-1], src_mask, tgt_mask), tgt[:, 1:], ours, n),
            train_step(lambda: peer(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt[:, :-1],
                                    decoder_attention_mask=tgt_mask.long()).logits, tgt[:, 1:], peer, n))
    train = b.compare("seq2seq train (fwd+bwd+AdamW)", "tok/s", *runs, note="source + target tokens")
    b.compare_memory("seq2seq train peak memory", *runs)
    peer.eval(), ours.eval()
    for batch in (1, 16):
        src = random_ids(batch, s.beam_src, vocab=s.vocab, device=dev)
        runs = _ours_seq2seq(ours, src, s.beam_new, 1), peer_generate(peer, src, s.beam_new, 1, 1)
        b.compare(f"seq2seq greedy b{batch} ({s.beam_src}->{s.beam_new})", "new tok/s", *runs)
    src = random_ids(s.beam_batch, s.beam_src, vocab=s.vocab, device=dev)
    runs = _ours_seq2seq(ours, src, s.beam_new, 4), peer_generate(peer, src, s.beam_new, 4, 1)
    b.compare(f"seq2seq beam 4 b{s.beam_batch} ({s.beam_src}->{s.beam_new})", "sent/s", *runs,
              note="length penalty 0.6: GNMT form in ours, |Y|^0.6 in transformers")
    b.compare_memory("seq2seq beam 4 peak memory", *runs)
    return train.ours


def _ours_seq2seq(model: EncoderDecoder, src: Tensor, new: int, beam: int) -> Run:
    @torch.no_grad()
    def run() -> int:
        mask = torch.ones_like(src, dtype=torch.bool)
        state = model.search_state(src, mask, new + 1)        # the search the translation task runs

        def step(tokens: Tensor) -> Tensor:
            return no_eos(state.step(tokens))
        start = torch.full((src.shape[0],), BOS, device=src.device)
        if beam == 1:
            tokens = greedy_search(step, start, EOS, new, PAD, reorder=state.reorder)
            return count_generated(tokens.shape, src.shape[0], new)
        result = beam_search(step, state.reorder, start, EOS, new, beam_size=beam, alpha=0.6, pad_id=PAD)
        return count_generated(result.tokens.shape, src.shape[0], new) // new          # sentences
    return run
