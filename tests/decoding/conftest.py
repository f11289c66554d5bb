"""Fake models for the searches: tables of log-probabilities whose per-row state follows `reorder`, so a search
that loses track of its rows looks up the wrong history and gets different scores."""

import pytest
import torch
from torch import Tensor


class TableModel:
    """Next-token log-probabilities drawn at random for every (sentence, whole history) pair.

    Row state: which sentence the row belongs to and a code of every token fed so far (1, then
    code * V + token per token). `step` only sees the new tokens, so it relies on the state being reordered.

    Args:
        n_sentences: B, the rows of the state before any reorder.
        vocab_size: V.
        max_fed: most tokens any row is fed (prefix included).
        seed: of the table.
        sharpness: scale of the random logits; larger gives more peaked distributions.
    """

    def __init__(self, n_sentences: int, vocab_size: int = 5, max_fed: int = 6, seed: int = 0,
                 sharpness: float = 2.0) -> None:
        g = torch.Generator().manual_seed(seed)
        n_codes = 2 * vocab_size ** max_fed
        logits = sharpness * torch.randn(n_sentences, n_codes, vocab_size, generator=g, dtype=torch.float64)
        self.table = logits.log_softmax(-1)                                     # (B, codes, V)
        self.vocab_size = vocab_size
        self.sentence = torch.arange(n_sentences)
        self.code = torch.ones(n_sentences, dtype=torch.long)
        self.n_steps = 0
        self.reorders: list[tuple[Tensor, int]] = []

    def step(self, tokens: Tensor) -> Tensor:
        for column in tokens.T:
            self.code = self.code * self.vocab_size + column
        self.n_steps += 1
        return self.table[self.sentence, self.code]                             # (rows, V)

    def reorder(self, index: Tensor, beams: int = 1) -> None:
        self.reorders.append((index.clone(), beams))
        self.sentence, self.code = self.sentence[index], self.code[index]

    def path_log_prob(self, sentence: int, prefix: list[int], tokens: list[int]) -> float:
        """Summed log-probability of `tokens` after `prefix`, read from the table without any state."""
        code, codes = 1, []
        for token in prefix:
            code = code * self.vocab_size + token
        for token in tokens:
            codes.append(code)
            code = code * self.vocab_size + token
        return sum(self.table[sentence, codes, tokens].tolist())      # left to right, as a search adds them


class MarkovModel:
    """Next-token log-probabilities that depend on the sentence and the last token only: log_probs (B, V, V),
    row = previous token. Handy for hand-made examples."""

    def __init__(self, log_probs: Tensor) -> None:
        self.table = log_probs
        self.sentence = torch.arange(log_probs.shape[0])
        self.last = torch.zeros(log_probs.shape[0], dtype=torch.long)
        self.fed_rows: list[int] = []                    # rows of every step, to see who is still fed

    def step(self, tokens: Tensor) -> Tensor:
        self.fed_rows.append(len(tokens))
        self.last = tokens[:, -1]
        return self.table[self.sentence, self.last]

    def reorder(self, index: Tensor, beams: int = 1) -> None:
        self.sentence, self.last = self.sentence[index], self.last[index]


@pytest.fixture
def table_model() -> type[TableModel]:
    return TableModel


@pytest.fixture
def markov_model() -> type[MarkovModel]:
    return MarkovModel
