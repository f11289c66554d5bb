"""The three assemblies of the Transformer line of work, their presets and Hugging Face conversion."""

from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly

__all__ = ["DecoderOnly", "EncoderDecoder", "EncoderOnly"]
