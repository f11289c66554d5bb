"""The decoders scripts/decode_table.py times on one set of trained Marian weights, each a race_score `Translator`
((B, S) source ids, (B, S) mask, max_extra_len -> (B, L) ids without the bos): transformers' `generate`, ours
(`from_huggingface` + `translate`) and CTranslate2, plus the training of a weights folder when none is given.

CTranslate2's stock Marian loader (4.8) is written for the opus-mt conversions, whose vocabulary ends with an
extra `<pad>` that also starts the decoder from a zero embedding: it drops the last row of every vocabulary
matrix and sets `start_from_zero_embedding`. Our Marian has its pad at id 0 and starts from `<s>` (as ours
trains), so the stock loader refuses the vocabulary (8000 tokens against 7999 rows) and, with that fixed, would
still start every sentence from the wrong input. `MarianBosLoader` is the BART loader with Marian's post-norm
settings, which keeps every row and reads the start token from `decoder_start_token_id`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from race_marian import Size, build_marian, specials, train_marian
from race_score import Translator
from tokenizers import Tokenizer
from torch import Tensor, nn

from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.readers import read_parallel
from lightning_tfm.data.tokenizers import SpecialTokens, load_tokenizer, save_tokenizer, train_tokenizer
from lightning_tfm.tasks.translation import translate

try:
    import ctranslate2
    from ctranslate2.converters import Converter
    from ctranslate2.converters.transformers import BartLoader
except ImportError:           # a bench-only extra: its rows then say it is missing
    ctranslate2 = None
    Converter = BartLoader = object


def _max_new(src_mask: Tensor, max_extra_len: int, positions: int) -> int:
    """One cap for the batch, as race_marian: longest source + max_extra_len, within the position table."""
    return min(int(src_mask.sum(-1).max()) + max_extra_len, positions - 1)


def generate_translator(model: transformers.MarianMTModel, beam: int, alpha: float) -> Translator:
    """transformers' `generate` as race_marian.marian_translator calls it (that one builds its model from a
    snapshot); beam 1 is greedy search, which has no length penalty (generate warns when given one)."""
    c = model.config
    penalty = {"length_penalty": alpha} if beam > 1 else {}

    def run(src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        out = model.generate(input_ids=src, attention_mask=src_mask.long(), num_beams=beam, **penalty,
                             max_new_tokens=_max_new(src_mask, max_extra_len, c.max_position_embeddings),
                             do_sample=False, early_stopping=False, decoder_start_token_id=c.decoder_start_token_id,
                             eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
        return out[:, 1:]                                                      # drop the decoder start (bos)
    return run


def ours_translator(model: nn.Module, tokenizer: Tokenizer, beam: int, alpha: float) -> Translator:
    """Our `translate`, the task's decoding path (GNMT length penalty, each sentence capped on its own)."""
    pad, bos, eos = specials(tokenizer)

    def run(src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        return translate(model, src, src_mask, bos, eos, pad, beam_size=beam, alpha=alpha,
                         max_extra_len=max_extra_len)
    return run


class MarianBosLoader(BartLoader):
    """CTranslate2's BART loader set up for transformers' Marian: post-norm, no embedding LayerNorm, every
    vocabulary row kept, the decoder started from `decoder_start_token_id`'s embedding (see the module doc)."""

    @property
    def architecture_name(self) -> str:
        return "MarianMTModel"

    def get_model_spec(self, model: transformers.MarianMTModel) -> ctranslate2.specs.TransformerSpec:
        model.config.normalize_before = False
        model.config.normalize_embedding = False
        return super().get_model_spec(model)


class MarianFolderConverter(Converter):
    """A `save_pretrained` Marian folder with our tokenizer -> a CTranslate2 model, through `MarianBosLoader`.

    Args:
        folder: the Marian folder.
        tokenizer: our tokenizer; its strings are CTranslate2's vocabulary.
    """

    def __init__(self, folder: Path, tokenizer: Tokenizer) -> None:
        self.folder, self.tokenizer = folder, tokenizer

    def _load(self) -> ctranslate2.specs.TransformerSpec:
        model = transformers.MarianMTModel.from_pretrained(self.folder)
        t = SpecialTokens()                                    # the roles race_marian.specials reads
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, pad_token=t.pad,
                                                    unk_token=t.unk, bos_token=t.bos, eos_token=t.eos)
        return MarianBosLoader()(model, fast)


def ct2_problem(compute_type: str) -> str | None:
    """None where CTranslate2 can run `compute_type` on this CPU, else why not."""
    if ctranslate2 is None:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    supported = ctranslate2.get_supported_compute_types("cpu")
    if compute_type not in supported:
        return f"CTranslate2 {ctranslate2.__version__} supports {sorted(supported)} on this CPU, not {compute_type}"
    return None


def ct2_model(folder: Path, tokenizer: Tokenizer, out: Path, quantization: str,
              threads: int) -> ctranslate2.Translator:
    """Convert `folder` to out (weights stored in `quantization`) and load it on `threads` cores."""
    MarianFolderConverter(folder, tokenizer).convert(str(out), quantization=quantization, force=True)
    return ctranslate2.Translator(str(out), device="cpu", compute_type=quantization, intra_threads=threads,
                                  inter_threads=1)


def ct2_translator(model: ctranslate2.Translator, tokenizer: Tokenizer, positions: int, beam: int,
                   alpha: float) -> Translator:
    """CTranslate2's `translate_batch` on our ids: it reads token strings, so ids map through our tokenizer
    (inside the timed call: the price of feeding it ids). Its length penalty divides by |Y|^alpha. Its default
    `min_decoding_length=1` forbids eos as the first token, which `generate` and ours allow: set to 0."""
    pad = specials(tokenizer)[0]

    def run(src: Tensor, src_mask: Tensor, max_extra_len: int) -> Tensor:
        tokens = [[tokenizer.id_to_token(i) for i in row[:n]] for row, n in zip(src.tolist(), src_mask.sum(-1))]
        results = model.translate_batch(tokens, beam_size=beam, length_penalty=alpha, return_end_token=True,
                                        min_decoding_length=0,
                                        max_decoding_length=_max_new(src_mask, max_extra_len, positions))
        ids = [[tokenizer.token_to_id(t) for t in r.hypotheses[0]] or [pad] for r in results]
        return pad_batch(ids, pad, pad_to_multiple=1)[0]
    return run


def default_tokenizer(train_prefix: Path, out: Path) -> Path:
    """runs/multi30k_small's tokenizer if it exists, else one trained as `TranslationDataModule` trains it
    (joint BPE, 8000 tokens, on both sides of the training split), saved under out."""
    existing = Path("runs/multi30k_small/tokenizer/tokenizer.json")
    if existing.is_file():
        return existing
    pairs = read_parallel(f"{train_prefix}.en", f"{train_prefix}.de")
    texts = [s for s, _ in pairs] + [t for _, t in pairs]                       # sources, then targets
    return save_tokenizer(train_tokenizer(texts, "bpe", 8000), out / "tokenizer" / "tokenizer.json")


def train_folder(train_prefix: Path, tokenizer_path: Path, out: Path, minutes: float, seed: int = 0,
                 size: Size = Size()) -> Path:
    """Train a MarianMTModel for `minutes` (race_marian.train_marian) and save it to out/marian; the training
    snapshot goes to a temporary folder."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = build_marian(size, tokenizer.get_vocab_size(), *specials(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        records = train_marian(train_prefix, tokenizer_path, Path(tmp), seed, minutes, minutes, size=size)
        model.load_state_dict(torch.load(records[-1]["path"], weights_only=True))
    model.save_pretrained(out / "marian")
    return out / "marian"
