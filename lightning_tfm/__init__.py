"""lightning_tfm: one configurable library of Transformer blocks for the encoder-decoder (translation),
encoder-only (classification, masked LM) and decoder-only (language modeling) families, trained with
PyTorch Lightning."""

from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.models.hf_convert import from_huggingface

__version__ = "0.1.0"
__all__ = ["DecoderOnly", "EncoderDecoder", "EncoderOnly", "from_huggingface"]
