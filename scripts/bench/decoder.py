"""Decoder-only family: our `DecoderOnly` against `GPT2LMHeadModel`. Training tokens/s and peak memory, then
greedy new tokens/s at batch 1 and 16 with the KV cache, and the peak memory of greedy at batch 16."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tfm.decoding import greedy_search
from lightning_tfm.models import DecoderOnly

from .pairs import EOS, check_parity, gpt2_pair, random_ids
from .timing import Bench, Run
from .workloads import count_generated, no_eos, peer_generate, train_step


def bench_decoder(b: Bench) -> float:
    """Returns our training tokens/s, which the data family compares its pipeline against."""
    s, dev = b.s, b.device
    peer, ours = gpt2_pair(s, max(1024, s.seq, s.prompt + s.new))
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    ids = random_ids(2, 16, vocab=s.vocab, device=dev)
    with torch.no_grad():
        check_parity("decoder", ours(ids), peer(ids).logits, b.log)
    ids = random_ids(s.batch, s.seq + 1, vocab=s.vocab, device=dev)
    x, y, n = ids[:, :-1], ids[:, 1:], s.batch * s.seq
    peer.train(), ours.train()
    runs = train_step(lambda: ours(x), y, ours, n), train_step(lambda: peer(x).logits, y, peer, n)
    train = b.compare("decoder train (fwd+bwd+AdamW)", "tok/s", *runs)
    b.compare_memory("decoder train peak memory", *runs)
    peer.eval(), ours.eval()
    for batch in (1, 16):
        prompt = random_ids(batch, s.prompt, vocab=s.vocab, device=dev)
        runs = _ours_lm_greedy(ours, prompt, s.new), peer_generate(peer, prompt, s.new, 1, s.prompt)
        b.compare(f"decoder greedy b{batch} ({s.prompt}+{s.new})", "new tok/s", *runs)
    b.compare_memory("decoder greedy b16 peak memory", *runs)
    return train.ours


def _ours_lm_greedy(model: DecoderOnly, prompt: Tensor, new: int) -> Run:
    """Greedy search driven as `LanguageModelModule.generate` drives it."""
    @torch.no_grad()
    def run() -> int:
        cache = model.new_cache(prompt.shape[1] + new)
        def step(tokens: Tensor) -> Tensor:             # the last position only, as generate does
            return no_eos(model.output(model.hidden(tokens, cache=cache)[:, -1]).float())
        out = greedy_search(step, prompt, EOS, new)
        return count_generated(out.shape, prompt.shape[0], new)
    return run
