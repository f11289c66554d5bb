"""Encoder-only classifier family: our `EncoderOnly` + `ClassificationHead` against
`BertForSequenceClassification`. Training tokens/s and peak memory, with the padding mask passed as the task
always passes it."""

from __future__ import annotations

import torch

from .pairs import bert_pair, check_parity, random_ids
from .timing import Bench
from .workloads import train_step


def bench_classifier(b: Bench) -> float:
    """Returns our training tokens/s, which the data family compares its pipeline against."""
    s, dev = b.s, b.device
    peer, ours = bert_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    ids = random_ids(2, 16, vocab=s.vocab, device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        check_parity("classifier", ours(ids, mask), peer(ids, attention_mask=mask.long()).logits, b.log)
    ids, labels = random_ids(s.batch, s.cls_seq, vocab=s.vocab, device=dev), torch.randint(2, (s.batch,), device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)     # the task always passes the padding mask
    n = s.batch * s.cls_seq
    peer.train(), ours.train()
    runs = (train_step(lambda: ours(ids, mask), labels, ours, n),
            train_step(lambda: peer(ids, attention_mask=mask.long()).logits, labels, peer, n))
    train = b.compare("classifier train (fwd+bwd+AdamW)", "tok/s", *runs)
    b.compare_memory("classifier train peak memory", *runs)
    return train.ours
