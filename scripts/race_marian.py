"""The race's peer (scripts/race.py): transformers' `MarianMTModel` at our model's size, trained with the paper's
recipe by a plain PyTorch loop (transformers 5.24's Seq2SeqTrainer needs `accelerate`, not installed here).

Model: 3 + 3 post-norm layers, d_model 256, 4 heads, FFN 1024 with ReLU, dropout 0.1 on embeddings and
sub-layer outputs (none on attention weights or FFN activations, as in ours), sinusoidal positions up to 256,
embeddings scaled by sqrt(d_model), one matrix shared by source, target and the output projection, Marian's own
initialization (normal, std 0.02). Vocabulary and special ids are our tokenizer's; `decoder_start_token_id` is
our bos, so the targets are the same `bos ... eos` sequences ours trains on.

Recipe (Vaswani et al. 2017, §5.3-5.4): Adam(0.9, 0.98, eps 1e-9, fused like ours), the inverse-square-root
schedule lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), here transformers' `get_inverse_sqrt_schedule`
with the formula's peak as its lr (the same curve, except that transformers' step 0 has lr 0), warmup 300,
label smoothing 0.1 (torch's, the same loss as Seq2SeqTrainer's `label_smoothing_factor`), no gradient clipping
(ours has none; Seq2SeqTrainer would clip at 1.0), fp32 or, with `bf16`, CPU autocast to bfloat16. Batches: our
`BucketBatchSampler` at 4096 padded tokens (counted on the longer side, as ours counts its 2048), length-bucketed,
shuffled by (seed, epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from race_clock import Clock
from race_score import Translator
from tokenizers import Tokenizer
from torch import Tensor

from lightning_tfm.data.batching import BucketBatchSampler
from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.readers import read_parallel
from lightning_tfm.data.tokenizers import SpecialTokens, special_token_ids


@dataclass(frozen=True)
class Size:
    n_layers: int = 3
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024


TINY = Size(n_layers=1, d_model=32, n_heads=2, d_ff=64)


def build_marian(size: Size, vocab_size: int, pad: int, bos: int, eos: int) -> transformers.MarianMTModel:
    cfg = transformers.MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=size.d_model, encoder_layers=size.n_layers,
        decoder_layers=size.n_layers, encoder_attention_heads=size.n_heads, decoder_attention_heads=size.n_heads,
        encoder_ffn_dim=size.d_ff, decoder_ffn_dim=size.d_ff, activation_function="relu", dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=256, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=pad, bos_token_id=bos,
        eos_token_id=eos, decoder_start_token_id=bos, forced_eos_token_id=None)
    return transformers.MarianMTModel(cfg)


def specials(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """pad, bos and eos ids of `TranslationDataModule`'s default special tokens."""
    ids = special_token_ids(tokenizer, SpecialTokens(), ("pad", "bos", "eos"))
    return ids.pad, ids.bos, ids.eos


def _encoded(prefix: Path, tokenizer: Tokenizer, bos: int, eos: int) -> tuple[list[list[int]], list[list[int]]]:
    pairs = read_parallel(f"{prefix}.en", f"{prefix}.de")
    src = tokenizer.encode_batch([s for s, _ in pairs], add_special_tokens=False)
    tgt = tokenizer.encode_batch([t for _, t in pairs], add_special_tokens=False)
    return [e.ids + [eos] for e in src], [[bos, *e.ids, eos] for e in tgt]


def train_marian(train_prefix: Path, tokenizer_path: Path, out: Path, seed: int, budget_minutes: float,
                 every_minutes: float, size: Size = Size(), warmup: int = 300, max_tokens: int = 4096,
                 lr_scale: float = 1.0, bf16: bool = False, log_every: int = 100) -> list[dict[str, Any]]:
    """Train for `budget_minutes` of training time (race_clock.Clock), saving the weights every `every_minutes`
    to out/snapshot-<M>min.pt. Returns the snapshot records (also in out/snapshots.jsonl). `bf16`: forward and
    loss under autocast to bfloat16, fp32 weights and optimizer (what Seq2SeqTrainer's `bf16=True` does)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    pad, bos, eos = specials(tokenizer)
    torch.manual_seed(seed)
    model = build_marian(size, tokenizer.get_vocab_size(), pad, bos, eos).train()
    peak = lr_scale * size.d_model ** -0.5 * warmup ** -0.5      # the formula's value at step = warmup
    optimizer = torch.optim.Adam(model.parameters(), lr=peak, betas=(0.9, 0.98), eps=1e-9, fused=True)
    schedule = transformers.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup)
    src, tgt = _encoded(train_prefix, tokenizer, bos, eos)
    sampler = BucketBatchSampler([max(len(s), len(t)) for s, t in zip(src, tgt)], max_tokens=max_tokens, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "snapshots.jsonl").unlink(missing_ok=True)
    clock, step, epoch, losses, records = Clock(budget_minutes, every_minutes), 0, 0, [], []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"marian seed {seed}: {trainable:,} trainable parameters, peak lr {peak:.3g} at step {warmup}, "
          f"{len(src)} pairs, {len(sampler)} batches an epoch, {'bf16 autocast' if bf16 else 'fp32'}", flush=True)
    while not clock.over:
        sampler.set_epoch(epoch)
        clock.resume()
        for indices in sampler:
            s_ids, s_mask = pad_batch([src[i] for i in indices], pad)          # (B, S)
            t_ids, t_mask = pad_batch([tgt[i] for i in indices], pad)          # (B, T + 1): bos y1 .. yn eos
            losses.append(_step(model, optimizer, s_ids, s_mask, t_ids, t_mask, bf16))
            schedule.step()
            step += 1
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"marian seed {seed}: loss {losses[-1]} at step {step}")
            clock.batch_done(int(s_mask.sum()) + int(t_mask.sum()))
            if step % log_every == 0:
                print(f"  step {step}, {clock.seconds / 60:.2f} min, loss {sum(losses[-log_every:]) / log_every:.3f}",
                      flush=True)
            while (mark := clock.due()) is not None:
                extra = {"train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
                records.append(clock.snapshot(mark, step, lambda p: torch.save(model.state_dict(), p), out, extra,
                                              suffix=".pt"))
            if clock.over:
                break
        epoch += 1
    return records


def _step(model: transformers.MarianMTModel, optimizer: torch.optim.Optimizer, s_ids: Tensor, s_mask: Tensor,
          t_ids: Tensor, t_mask: Tensor, bf16: bool = False) -> float:
    """One update on a batch; the target is fed shifted right (decoder reads t_ids[:, :-1]). Returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):       # backward runs outside, as torch advises
        logits = model(input_ids=s_ids, attention_mask=s_mask.long(), decoder_input_ids=t_ids[:, :-1]).logits
        labels = t_ids[:, 1:].masked_fill(~t_mask[:, 1:], -100)               # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def marian_translator(snapshot: Path, tokenizer: Tokenizer, size: Size, beam: int, alpha: float) -> Translator:
    """A snapshot's model decoding with `generate` (race_score: one `max_new_tokens` for the batch)."""
    pad, bos, eos = specials(tokenizer)
    model = build_marian(size, tokenizer.get_vocab_size(), pad, bos, eos)
    model.load_state_dict(torch.load(snapshot, weights_only=True))
    model.eval()
    positions = model.config.max_position_embeddings

    def run(src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        max_new = min(int(src_mask.sum(-1).max()) + max_extra_len, positions - 1)
        out = model.generate(input_ids=src, attention_mask=src_mask.long(), num_beams=beam, length_penalty=alpha,
                             max_new_tokens=max_new, do_sample=False, early_stopping=False,
                             decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        return out[:, 1:]                                                      # drop the decoder start (bos)
    return run
