"""The transformers/ours model pairs: a transformers model with random weights (nothing downloaded) and ours
converted from it with `from_huggingface`, so config and weights are the same, plus the parity check that their
logits agree to 1e-4 before anything is timed, and random token ids above the special ones."""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from torch import Tensor, nn

from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.models.heads import ClassificationHead
from lightning_tfm.models.hf_convert import from_huggingface

from .timing import Sizes

PAD, BOS, EOS = 0, 1, 2


def check_parity(name: str, got: Tensor, want: Tensor, log: Callable[[str], None]) -> None:
    diff = (got - want).abs().max().item()
    if not diff < 1e-4:
        raise SystemExit(f"{name}: ours and transformers differ by {diff:.3g} (bound 1e-4); the comparison would "
                         "not time the same computation")
    log(f"{name}: logits agree, max abs diff {diff:.2g}")


def gpt2_pair(s: Sizes, positions: int, dropout: float = 0.1) -> tuple[nn.Module, DecoderOnly]:
    cfg = transformers.GPT2Config(vocab_size=s.vocab, n_positions=positions, n_embd=s.d_model, n_layer=s.n_layers,
                                  n_head=s.n_heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    peer = transformers.GPT2LMHeadModel(cfg)
    return peer, from_huggingface(peer)


class Classifier(nn.Module):
    """Our encoder and head, wired as `ClassificationModule.forward` does."""

    def __init__(self, encoder: EncoderOnly, head: ClassificationHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.encoder(ids, mask), mask)


def bert_pair(s: Sizes) -> tuple[nn.Module, Classifier]:
    cfg = transformers.BertConfig(vocab_size=s.vocab, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
                                  num_attention_heads=s.n_heads, intermediate_size=4 * s.d_model, num_labels=2,
                                  max_position_embeddings=max(512, s.cls_seq), pad_token_id=PAD)
    peer = transformers.BertForSequenceClassification(cfg)
    head = ClassificationHead(s.d_model, 2, pooling="cls", dropout=cfg.hidden_dropout_prob, pooler=True)
    encoder = from_huggingface(peer)
    head.load_state_dict(encoder.classification_head)        # BERT's pooler and classifier
    return peer, Classifier(encoder, head)


def marian_pair(s: Sizes) -> tuple[nn.Module, EncoderDecoder]:
    # the paper's recipe where Marian can express it: ReLU, post-norm, scaled and shared, tied embeddings
    cfg = transformers.MarianConfig(
        vocab_size=s.vocab, d_model=s.d_model, encoder_layers=s.n_layers, decoder_layers=s.n_layers,
        encoder_attention_heads=s.n_heads, decoder_attention_heads=s.n_heads, encoder_ffn_dim=4 * s.d_model,
        decoder_ffn_dim=4 * s.d_model, max_position_embeddings=1024, activation_function="relu",
        scale_embedding=True, pad_token_id=PAD, decoder_start_token_id=BOS, eos_token_id=EOS, forced_eos_token_id=None)
    peer = transformers.MarianMTModel(cfg)
    return peer, from_huggingface(peer)


def random_ids(*shape: int, vocab: int, device: torch.device) -> Tensor:
    return torch.randint(3, vocab, shape, device=device)            # above the special ids
