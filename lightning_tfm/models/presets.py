"""Named model sizes from the papers. Each preset is a subclass of its assembly whose typed `__init__` holds
the published numbers, so it works from Python (`TransformerBase(vocab_size=37000)`) and from YAML
(`class_path: lightning_tfm.models.presets.TransformerBase`), where the CLI can still link the vocabulary
size into it. (Builder functions would read as well, but jsonargparse 4.53 cannot link an argument into a
function given by class_path.)"""

from __future__ import annotations

from functools import partial

from lightning_tfm.blocks.feedforward import GELUFeedForward
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.blocks.positions import LearnedPositions, SinusoidalPositions
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly


class TransformerBase(EncoderDecoder):
    """The paper's base model (Vaswani et al. 2017, Table 3): N=6, d_model=512, d_ff=2048, h=8, dropout 0.1,
    shared source/target embeddings tied to the output; 65M parameters with a 37,000-token vocabulary.

    Args:
        vocab_size: the shared BPE vocabulary (the paper's English-German one had about 37,000 tokens).
        dropout: residual and embedding dropout.
        max_len: positions precomputed by the sinusoidal table.
    """

    def __init__(self, vocab_size: int = 37000, dropout: float = 0.1, max_len: int = 1024) -> None:
        super().__init__(vocab_size, d_model=512, n_layers=6, n_heads=8, d_ff=2048, dropout=dropout,
                         positions=partial(SinusoidalPositions, max_len=max_len))


class TransformerBig(EncoderDecoder):
    """The paper's big model (Table 3): N=6, d_model=1024, d_ff=4096, h=16, dropout 0.3; 213M parameters.

    Args:
        vocab_size: the shared BPE vocabulary.
        dropout: residual and embedding dropout (0.1 for English-French in the paper).
        max_len: positions precomputed by the sinusoidal table.
    """

    def __init__(self, vocab_size: int = 37000, dropout: float = 0.3, max_len: int = 1024) -> None:
        super().__init__(vocab_size, d_model=1024, n_layers=6, n_heads=16, d_ff=4096, dropout=dropout,
                         positions=partial(SinusoidalPositions, max_len=max_len))


class BertBaseLike(EncoderOnly):
    """BERT-base (Devlin et al. 2019, §3): L=12, H=768, A=12, d_ff=3072, GELU, post-norm LayerNorm(eps 1e-12),
    learned positions (512) and 2 segment types; 109M parameters with its 30,522-token WordPiece vocabulary.

    Args:
        vocab_size: the WordPiece vocabulary.
        dropout: residual and embedding dropout.
        max_len: learned positions.
    """

    def __init__(self, vocab_size: int = 30522, dropout: float = 0.1, max_len: int = 512) -> None:
        super().__init__(vocab_size, d_model=768, n_layers=12, n_heads=12, d_ff=3072, dropout=dropout,
                         norm=partial(LayerNorm, eps=1e-12), positions=partial(LearnedPositions, max_len=max_len))


class GPT2SmallLike(DecoderOnly):
    """GPT-2 small (Radford et al. 2019, Table 2): 12 layers, d_model 768, 12 heads, pre-norm, tanh-GELU,
    1024 learned positions, tied embeddings; 124M parameters with its 50,257-token byte-level BPE.

    Args:
        vocab_size: the byte-level BPE vocabulary.
        dropout: residual and embedding dropout.
        max_len: learned positions (the context length).
    """

    def __init__(self, vocab_size: int = 50257, dropout: float = 0.1, max_len: int = 1024) -> None:
        super().__init__(vocab_size, d_model=768, n_layers=12, n_heads=12, d_ff=3072, dropout=dropout,
                         feedforward=partial(GELUFeedForward, approximate="tanh"),
                         positions=partial(LearnedPositions, max_len=max_len))


class TinyEncoderDecoder(EncoderDecoder):
    """A 2+2-layer, d_model 32 encoder-decoder for tests.

    Args:
        vocab_size: the shared vocabulary.
        dropout: residual and embedding dropout.
    """

    def __init__(self, vocab_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__(vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=dropout)


class TinyEncoder(EncoderOnly):
    """A 2-layer, d_model 32 encoder for tests.

    Args:
        vocab_size: the vocabulary.
        dropout: residual and embedding dropout.
    """

    def __init__(self, vocab_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__(vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=dropout,
                         positions=partial(LearnedPositions, max_len=128))


class TinyDecoder(DecoderOnly):
    """A 2-layer, d_model 32 decoder-only model for tests.

    Args:
        vocab_size: the vocabulary.
        dropout: residual and embedding dropout.
    """

    def __init__(self, vocab_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__(vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=dropout,
                         positions=partial(LearnedPositions, max_len=128))
