"""Scoring for the race (scripts/race.py), the same for both systems: the evaluation split read and tokenized
once with our tokenizer (sources `tokens eos`, as `TranslationDataModule` encodes them), sorted by length into
right-padded batches of 64 sentences, beam search, each output cut at its source length + `max_extra_len` tokens,
detokenization with our tokenizer, and one sacreBLEU call (corpus BLEU, cased, 13a, sacreBLEU's default exp
smoothing).

Ours decodes with `lightning_tfm.tasks.translation.translate`, the task's own search: GNMT's length penalty
((5 + |Y|) / 6)^alpha and a cap of source + `max_extra_len` tokens per sentence. Marian decodes with `generate`,
whose beam search divides the log-probability by |Y|^alpha (|Y| = generated tokens, EOS included): the same
alpha, not the same form. `generate` takes one `max_new_tokens` per batch, so it gets the batch's longest source
+ `max_extra_len` and each output is then cut at its own cap; in length-sorted batches the sources differ by a
few tokens, and only outputs that never emit EOS (early snapshots) reach the cap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sacrebleu
import torch
from tokenizers import Tokenizer
from torch import Tensor

from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.readers import read_parallel
from lightning_tfm.tasks.translation import translate
from lightning_tfm.viz.trained import load_trained

# (B, S) source ids, (B, S) bool mask (True = real token), max_extra_len -> (B, L) output ids without the bos
Translator = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class EvalSet:
    """One split: the raw references and the tokenized sources in length-sorted batches."""

    name: str
    refs: list[str]
    batches: list[tuple[list[int], Tensor, Tensor]]      # (sentence indices, (B, S) ids, (B, S) mask)


def eval_set(name: str, prefix: Path, tokenizer: Tokenizer, pad: int, eos: int, src_lang: str = "en",
             tgt_lang: str = "de", batch_size: int = 64) -> EvalSet:
    """Read `prefix.src_lang`/`prefix.tgt_lang` and batch the sources by length, longest first."""
    pairs = read_parallel(f"{prefix}.{src_lang}", f"{prefix}.{tgt_lang}")
    ids = [e.ids + [eos] for e in tokenizer.encode_batch([s for s, _ in pairs], add_special_tokens=False)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batches.append((chunk, *pad_batch([ids[i] for i in chunk], pad)))
    return EvalSet(name, [t for _, t in pairs], batches)


def corpus_bleu(hypotheses: list[str], refs: list[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100) and its signature."""
    metric = sacrebleu.BLEU(tokenize="13a")
    score = metric.corpus_score(hypotheses, [refs]).score
    return score, str(metric.get_signature())


def detokenize(ids: Tensor, caps: list[int], tokenizer: Tokenizer, eos: int) -> list[str]:
    """(B, L) ids -> text, each row cut at its cap and at the first eos, special tokens dropped (as
    `TranslationModule.detokenize`)."""
    rows = []
    for row, cap in zip(ids.tolist(), caps):
        row = row[:cap]
        row = row[: row.index(eos)] if eos in row else row
        rows.append(tokenizer.decode(row, skip_special_tokens=True))
    return rows


@torch.no_grad()
def bleu(translator: Translator, data: EvalSet, tokenizer: Tokenizer, eos: int,
         max_extra_len: int) -> tuple[float, str]:
    """Translate every batch (at most source length + max_extra_len tokens a sentence) and score it."""
    hypotheses = [""] * len(data.refs)
    for indices, src, src_mask in data.batches:
        out = translator(src, src_mask, max_extra_len)
        caps = (src_mask.sum(-1) + max_extra_len).tolist()
        for i, text in zip(indices, detokenize(out, caps, tokenizer, eos)):
            hypotheses[i] = text
    return corpus_bleu(hypotheses, data.refs)


def ours_translator(checkpoint: str | Path, beam: int, alpha: float) -> Translator:
    """Our checkpoint's model decoding as `TranslationModule` does."""
    trained = load_trained(checkpoint)
    s = trained.specials

    def run(src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        return translate(trained.model, src, src_mask, s.bos, s.eos, s.pad, beam_size=beam, alpha=alpha,
                         max_extra_len=max_extra_len)
    return run
