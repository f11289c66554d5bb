import itertools
import math

import pytest
import torch

from lightning_tfm.decoding import beam_search, greedy_search, length_penalty
from lightning_tfm.models import EncoderDecoder

EOS, PAD, V = 0, 9, 5          # PAD is outside the 5-token vocabulary so padding is visible


def _gnmt(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha                    # lp(Y), Wu et al. 2016, §7


def _exhaustive(model, sentence: int, bos: int, max_len: int, alpha: float) -> list[tuple[float, list[int]]]:
    """Every finished output, best first: n - 1 non-EOS tokens then EOS (n <= max_len), or max_len non-EOS
    tokens (cut at the limit)."""
    others = [t for t in range(V) if t != EOS]
    ends = [[*body, EOS] for n in range(1, max_len + 1) for body in itertools.product(others, repeat=n - 1)]
    ends += [list(body) for body in itertools.product(others, repeat=max_len)]
    scored = [(model.path_log_prob(sentence, [bos], y) / _gnmt(len(y), alpha), y) for y in ends]
    return sorted(scored, key=lambda pair: -pair[0])


def _reference_beam(model, sentence: int, bos: int, max_len: int, k: int, alpha: float,
                    n_best: int) -> list[tuple[float, list[int]]]:
    """The documented algorithm for one sentence over Python lists: the k best extensions form the beam, those
    ending in EOS (all at the limit) finish, the k best that do not end go on; stop when the n_best-th
    finished score beats best live / max(lp(n + 1), lp(max_len))."""
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for n in range(1, max_len + 1):
        extensions = sorted(((y + [t], s + model.path_log_prob(sentence, [bos, *y], [t]))
                             for y, s in live for t in range(V)), key=lambda h: -h[1])
        finished += [(s / _gnmt(n, alpha), y) for y, s in extensions[:k] if y[-1] == EOS or n == max_len]
        finished = sorted(finished, key=lambda h: -h[0])[:n_best]
        live = [h for h in extensions if h[0][-1] != EOS][:k] if n < max_len else []
        best_live = max((s for _, s in live), default=-math.inf)
        if len(finished) == n_best and finished[-1][0] >= best_live / max(_gnmt(n + 1, alpha), _gnmt(max_len, alpha)):
            break
    return finished


def _hypotheses(result, b: int) -> list[list[int]]:
    """Sentence b's n-best as token lists, checking that only PAD follows each end."""
    out = []
    for row, n in zip(result.n_best_tokens[b].tolist(), result.n_best_lengths[b].tolist()):
        assert row[n:] == [PAD] * (len(row) - n)
        out.append(row[:n])
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
def test_length_penalty_is_gnmt(alpha):
    lengths = torch.arange(1, 80)
    want = torch.tensor([((5 + n) / 6) ** alpha for n in range(1, 80)], dtype=torch.float64)
    torch.testing.assert_close(length_penalty(lengths, alpha), want, rtol=1e-12, atol=0)
    assert length_penalty(1, alpha).item() == 1.0
    assert length_penalty(10, 1.0).item() == pytest.approx(2.5)      # ((5 + 10) / 6), not 10 ** alpha


def _early_eos_tables(model, bos: list[int], seed: int):
    """Reshape a TableModel so that stopping early goes wrong: right after BOS, EOS is about as likely as the
    best other token; from then on one token is nearly certain (build it with a large sharpness). A longer
    hypothesis can then overtake the first finished one only through the length penalty."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(len(bos), V, generator=g, dtype=torch.float64)                     # (B, V)
    first[:, EOS] = first[:, 1:].max(-1).values + torch.rand(len(bos), generator=g, dtype=torch.float64) - 0.5
    model.table[torch.arange(len(bos)), V + torch.tensor(bos)] = first.log_softmax(-1)      # history [BOS]
    return model


@pytest.mark.parametrize("tables", ["random", "early_eos"])
@pytest.mark.parametrize("n_best", [1, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_a_beam_that_never_prunes_finds_the_exhaustive_n_best(table_model, tables, n_best, alpha):
    bos, max_len = [2, 3, 4, 1, 2, 3], [3, 5, 4, 5, 4, 5]
    if tables == "random":
        model = table_model(len(bos), seed=11)
    else:   # a current-length bound (Hugging Face's heuristic) fails here for alpha > 0 (checked)
        model = _early_eos_tables(table_model(len(bos), seed=6, sharpness=20.0), bos, seed=1006)
    beam = V * (V - 1) ** (max(max_len) - 1)      # holds every extension, so only the stopping rule can cut
    result = beam_search(model.step, model.reorder, torch.tensor(bos), EOS, torch.tensor(max_len),
                         beam_size=beam, alpha=alpha, pad_id=PAD, n_best=n_best)
    for b in range(len(bos)):
        want = _exhaustive(model, b, bos[b], max_len[b], alpha)[:n_best]
        assert _hypotheses(result, b) == [y for _, y in want]
        torch.testing.assert_close(result.n_best_scores[b], torch.tensor([s for s, _ in want], dtype=torch.float64))


@pytest.mark.parametrize("beam_size,n_best", [(1, 1), (2, 1), (3, 3), (4, 2)])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_a_narrow_beam_matches_the_one_sentence_reference(table_model, beam_size, n_best, alpha):
    model = table_model(4, seed=13)
    bos, max_len = [2, 3, 4, 1], [5, 3, 4, 5]
    result = beam_search(model.step, model.reorder, torch.tensor(bos), EOS, torch.tensor(max_len),
                         beam_size=beam_size, alpha=alpha, pad_id=PAD, n_best=n_best)
    for b in range(4):
        want = _reference_beam(model, b, bos[b], max_len[b], beam_size, alpha, n_best)
        assert _hypotheses(result, b) == [y for _, y in want]
        torch.testing.assert_close(result.n_best_scores[b], torch.tensor([s for s, _ in want], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_beam_size_one_is_greedy_search_without_length_penalty(table_model, seed):
    bos, max_len = torch.tensor([2, 3, 4, 1, 2]), torch.tensor([5, 2, 4, 5, 1])
    greedy = greedy_search(table_model(5, seed=seed).step, bos, EOS, max_len, pad_id=PAD)
    model = table_model(5, seed=seed)
    result = beam_search(model.step, model.reorder, bos, EOS, max_len, beam_size=1, alpha=0.0, pad_id=PAD)
    assert torch.equal(result.tokens, greedy)


def test_a_sentence_whose_best_path_ends_early_is_padded_beside_a_longer_one(markov_model):
    log_probs = torch.full((2, V, V), 0.025).log()
    log_probs[0, 2, 3] = log_probs[0, 3, EOS] = math.log(0.9)            # sentence 0: BOS=2 -> 3 -> EOS
    log_probs[1, 2, 4] = log_probs[1, 4, 4] = math.log(0.9)              # sentence 1: 4 4 4 ... until its limit
    model = markov_model(log_probs)
    result = beam_search(model.step, model.reorder, torch.tensor([2, 2]), EOS, torch.tensor([10, 6]),
                         beam_size=3, pad_id=PAD)
    assert result.tokens.tolist() == [[3, EOS, PAD, PAD, PAD, PAD], [4] * 6]
    assert result.lengths.tolist() == [2, 6]
    torch.testing.assert_close(result.scores, torch.tensor([2 * math.log(0.9) / _gnmt(2, 0.6),
                                                            6 * math.log(0.9) / _gnmt(6, 0.6)]))


@pytest.mark.parametrize("alpha,want", [(0.0, [EOS]), (0.6, [2, 3, 4, 5, 6, 7, 8, 9, EOS]),
                                        (1.0, [2, 3, 4, 5, 6, 7, 8, 9, EOS])])
def test_the_search_goes_on_while_a_longer_hypothesis_could_still_win(markov_model, alpha, want):
    # After step 1, [EOS] has finished with log .5 = -0.69 and [2] lives with log .4 = -0.92. Only the length
    # penalty can lift the 9-token chain (-1.0) above [EOS]; a rule that stops at k finished hypotheses, or
    # bounds with the current length, returns [EOS] for every alpha.
    log_probs = torch.full((1, 10, 10), 0.01 / 9).log()
    log_probs[0, 1] = torch.full((10,), 0.1 / 8).log()
    log_probs[0, 1, EOS], log_probs[0, 1, 2] = math.log(0.5), math.log(0.4)
    for t in range(2, 10):
        log_probs[0, t, (t + 1) % 10] = math.log(0.99)                   # 2 -> 3 -> ... -> 9 -> EOS
    model = markov_model(log_probs)
    result = beam_search(model.step, model.reorder, torch.tensor([1]), EOS, 20, beam_size=1, alpha=alpha)
    assert result.tokens[0, : result.lengths[0]].tolist() == want


def test_reorder_first_gives_each_sentence_its_beams_then_follows_parents(table_model):
    model = table_model(2, seed=4)
    beam_search(model.step, model.reorder, torch.tensor([2, 3]), EOS, 4, beam_size=3)
    (first, beams), *later = model.reorders
    assert first.tolist() == [0, 0, 0, 1, 1, 1] and beams == 3     # the first step was fed one row per sentence
    for index, beams in later:               # a parent is always a beam of the same sentence, in sentence order
        sentence = (index // 3).view(-1, 3)
        assert beams == 3 and (sentence == sentence[:, :1]).all() and (sentence[1:, 0] > sentence[:-1, 0]).all()
    assert len(model.reorders) == model.n_steps - 1


def test_the_first_step_runs_once_per_sentence_and_settled_sentences_leave_the_batch(markov_model):
    log_probs = torch.full((2, V, V), 0.025).log()
    log_probs[0, 2, 3] = log_probs[0, 3, EOS] = math.log(0.9)            # sentence 0: BOS=2 -> 3 -> EOS
    log_probs[1, 2, 4] = log_probs[1, 4, 4] = math.log(0.9)              # sentence 1: 4 4 4 ... until its limit
    model = markov_model(log_probs)
    result = beam_search(model.step, model.reorder, torch.tensor([2, 2]), EOS, torch.tensor([10, 6]),
                         beam_size=3, pad_id=PAD)
    # after step 2, [3, EOS] scores 2 log .9 / lp(2) = -0.19, and the best live one, log .9 + log .025 = -3.79,
    # can reach -3.79 / lp(10) = -2.2 at best: sentence 0 settles; sentence 1 runs to its limit of 6
    assert model.fed_rows == [2, 6, 3, 3, 3, 3]
    assert result.tokens.tolist() == [[3, EOS, PAD, PAD, PAD, PAD], [4] * 6]


def test_beam_search_rejects_bad_arguments(table_model):
    model = table_model(2)
    bos = torch.tensor([2, 3])
    with pytest.raises(ValueError, match="beam_size=0, must be >= 1"):
        beam_search(model.step, model.reorder, bos, EOS, 4, beam_size=0)
    with pytest.raises(ValueError, match=r"n_best=3, must be in \[1, beam_size=2\]"):
        beam_search(model.step, model.reorder, bos, EOS, 4, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match=r"eos_id=5 is outside the vocabulary \[0, 5\)"):
        beam_search(model.step, model.reorder, bos, 5, 4)
    with pytest.raises(ValueError, match=r"max_len=\[0, 4\]; every row must allow at least 1"):
        beam_search(model.step, model.reorder, bos, EOS, torch.tensor([0, 4]))


PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class _Translator:
    """Step and reorder closures over an EncoderDecoder, with one copy of the encoder side per row, the plainest
    layout: the source is encoded once per sentence, then every reorder takes the rows it names of everything
    (memory, mask, self- and cross-attention caches). Without the cache, each step reruns the decoder over
    every token so far."""

    def __init__(self, model: EncoderDecoder, src: torch.Tensor, src_mask: torch.Tensor, cached: bool,
                 cache_len: int = 0) -> None:
        self.model, self.src_mask = model, src_mask
        self.memory = model.encode(src, src_mask)                        # (B, S, C)
        self.cache = model.new_cache(cache_len) if cached else None
        self.fed: torch.Tensor | None = None                             # (rows, t), for the uncached step

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            logits = self.model.decode(tokens, self.memory, self.src_mask, cache=self.cache)
        else:
            self.fed = tokens if self.fed is None else torch.cat([self.fed, tokens], dim=1)
            logits = self.model.decode(self.fed, self.memory, self.src_mask)
        return logits[:, -1].log_softmax(-1)

    def reorder(self, index: torch.Tensor, beams: int) -> None:
        self.memory, self.src_mask = self.memory[index], self.src_mask[index]
        if self.cache is not None:
            self.cache.select(index)
        if self.fed is not None:
            self.fed = self.fed[index]


@pytest.fixture(scope="module")
def reverser() -> EncoderDecoder:
    """The tiny model after 60 Adam steps on reversing its source, so it ends hypotheses with EOS at varied
    lengths (untrained, with tied embeddings, it repeats one token until the limit)."""
    torch.manual_seed(0)
    model = EncoderDecoder(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        lengths = torch.randint(2, 8, (32,), generator=g)
        src_mask = torch.arange(7)[None, :] < lengths[:, None]                  # (32, 7)
        src = torch.randint(3, 11, (32, 7), generator=g).masked_fill(~src_mask, PAD_ID)
        tgt = torch.full((32, 9), PAD_ID)
        tgt[:, 0] = BOS_ID
        for i, n in enumerate(lengths.tolist()):
            tgt[i, 1:n + 1], tgt[i, n + 1] = src[i, :n].flip(0), EOS_ID
        logits = model(src, tgt[:, :-1], src_mask, tgt[:, :-1] != PAD_ID)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _sources() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sources of lengths 7, 4, 5, right-padded to 7."""
    lengths = torch.tensor([7, 4, 5])
    src_mask = torch.arange(7)[None, :] < lengths[:, None]                      # (3, 7)
    src = torch.randint(3, 11, (3, 7), generator=torch.Generator().manual_seed(1)).masked_fill(~src_mask, PAD_ID)
    return src, src_mask, lengths


def _translate(translator: _Translator, max_len: torch.Tensor, beam_size: int = 4, alpha: float = 0.6):
    start = torch.full((len(max_len),), BOS_ID)
    return beam_search(translator.step, translator.reorder, start, EOS_ID, max_len, beam_size=beam_size,
                       alpha=alpha, pad_id=PAD_ID, n_best=beam_size)


@torch.no_grad()
@pytest.mark.parametrize("cache_len", [0, 3])
def test_cached_beam_search_on_a_real_model_equals_full_recomputation_on_padded_sources(reverser, cache_len):
    src, src_mask, lengths = _sources()
    cached = _translate(_Translator(reverser, src, src_mask, cached=True, cache_len=cache_len), lengths + 5)
    full = _translate(_Translator(reverser, src, src_mask, cached=False), lengths + 5)
    assert EOS_ID in cached.tokens and len(set(cached.n_best_lengths.flatten().tolist())) > 1
    assert torch.equal(cached.n_best_tokens, full.n_best_tokens)
    torch.testing.assert_close(cached.n_best_scores, full.n_best_scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_in_the_batch_never_changes_a_sentences_hypotheses(reverser):
    src, src_mask, lengths = _sources()
    batch = _translate(_Translator(reverser, src, src_mask, cached=True), lengths + 5)
    for b in range(3):
        one = src[b:b + 1, : lengths[b]]
        alone = _translate(_Translator(reverser, one, torch.ones_like(one, dtype=torch.bool), cached=True),
                           lengths[b:b + 1] + 5)
        width = alone.n_best_tokens.shape[-1]
        assert torch.equal(alone.n_best_tokens[0], batch.n_best_tokens[b, :, :width])
        assert (batch.n_best_tokens[b, :, width:] == PAD_ID).all()
        torch.testing.assert_close(alone.n_best_scores[0], batch.n_best_scores[b], atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_and_beam_size_one_agree_on_a_real_model(reverser):
    src, src_mask, lengths = _sources()
    start, max_len = torch.full((3,), BOS_ID), lengths + 5
    greedy = greedy_search(_Translator(reverser, src, src_mask, cached=True).step, start, EOS_ID, max_len, PAD_ID)
    full = greedy_search(_Translator(reverser, src, src_mask, cached=False).step, start, EOS_ID, max_len, PAD_ID)
    assert torch.equal(greedy, full)
    one = _translate(_Translator(reverser, src, src_mask, cached=True), max_len, beam_size=1, alpha=0.0)
    assert torch.equal(one.tokens, greedy)
