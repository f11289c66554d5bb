"""Search over a model seen only through a `Step` closure (and `Reorder` for beam search): greedy search,
sampling with temperature / top-k / top-p, and beam search with GNMT's length penalty."""

from lightning_tfm.decoding.beam_search import BeamSearchResult, beam_search, length_penalty
from lightning_tfm.decoding.greedy import greedy_search
from lightning_tfm.decoding.sampling import keep_top_k, keep_top_p, sample
from lightning_tfm.decoding.step import Reorder, Step

__all__ = [
    "BeamSearchResult", "Reorder", "Step", "beam_search", "greedy_search", "keep_top_k", "keep_top_p",
    "length_penalty", "sample",
]
