import itertools

import pytest
import torch

from lightning_tfm.blocks.attention_variants import (
    Band,
    BlockLocal,
    Dilated,
    Everything,
    Global,
    GlobalKeys,
    GlobalQueries,
    Strided,
    Union,
)

N = 40                                    # positions 0..N-1 on both sides
GRID_Q, GRID_K = torch.arange(N)[:, None], torch.arange(N)[None, :]


def _brute(rule) -> torch.Tensor:
    """(N, N) bool from a per-pair rule written out from the paper, one pair at a time."""
    return torch.tensor([[rule(i, j) for j in range(N)] for i in range(N)])


@pytest.mark.parametrize("pattern, rule", [
    (Band(4), lambda i, j: -3 <= i - j <= 3),
    (Dilated(3, 4), lambda i, j: (i - j) in (-8, -4, 0, 4, 8)),
    (Strided(5), lambda i, j: (i - j) % 5 == 0),
    (BlockLocal(8), lambda i, j: i // 8 == j // 8),
    (Global(n_first=2, positions=(17,)), lambda i, j: i in (0, 1, 17) or j in (0, 1, 17)),
    (GlobalQueries(n_first=2), lambda i, j: i < 2),
    (GlobalKeys(positions=(5, 9)), lambda i, j: j in (5, 9)),
    (Everything(), lambda i, j: True),
    (Band(3) | Strided(6), lambda i, j: abs(i - j) <= 2 or (i - j) % 6 == 0),
    (BlockLocal(8) | Global(n_first=1), lambda i, j: i // 8 == j // 8 or i == 0 or j == 0),
])
def test_allows_matches_the_papers_definitions_pair_by_pair(pattern, rule):
    torch.testing.assert_close(pattern.allows(GRID_Q, GRID_K), _brute(rule))


def test_a_causal_band_of_window_w_is_the_w_keys_ending_at_the_query():
    allowed = Band(5).allows(GRID_Q, GRID_K) & (GRID_K <= GRID_Q)
    for i in range(N):
        assert allowed[i].nonzero().flatten().tolist() == list(range(max(0, i - 4), i + 1))


def test_a_causal_dilated_window_sees_window_keys_spaced_by_the_dilation():
    allowed = Dilated(3, 4).allows(GRID_Q, GRID_K) & (GRID_K <= GRID_Q)
    assert allowed[20].nonzero().flatten().tolist() == [12, 16, 20]


def test_dilation_one_is_the_band_and_a_wide_band_is_everything():
    torch.testing.assert_close(Dilated(6, 1).allows(GRID_Q, GRID_K), Band(6).allows(GRID_Q, GRID_K))
    assert bool(Band(N).allows(GRID_Q, GRID_K).all())
    assert not bool(Band(N - 1).allows(GRID_Q, GRID_K).all())


def test_or_builds_a_flat_union_and_patterns_are_frozen_hashable_values():
    union = Band(3) | Strided(4) | Global(n_first=1)
    assert union == Union(Band(3), Strided(4), Global(n_first=1))
    assert union.patterns == (Band(3), Strided(4), Global(n_first=1))
    assert hash(union) == hash(Union(Band(3), Union(Strided(4), Global(n_first=1))))     # usable as a cache key
    with pytest.raises(AttributeError):
        Band(3).window = 4


@pytest.mark.parametrize("pattern", [
    Band(4), Dilated(3, 4), Strided(5), BlockLocal(8), Everything(), Global(n_first=2, positions=(17,)),
    Band(3) | Strided(6), BlockLocal(8) | Global(n_first=1),
])
def test_planning_hints_never_hide_an_allowed_pair(pattern):
    """Each part's hints (modulus, key range, key and query sets) must contain every pair the part allows:
    the blocked kernel trusts them and would silently drop a pair outside."""
    for part in pattern.parts():
        allowed = part.allows(GRID_Q, GRID_K)
        i, j = allowed.nonzero().unbind(1)
        assert bool(((i - j) % part.modulus == 0).all())
        if part.key_positions() is not None:
            assert set(j.tolist()) <= set(part.key_positions())
        if part.query_positions() is not None:
            assert set(i.tolist()) <= set(part.query_positions())
        for lo, hi in itertools.product(range(0, N, 7), range(0, N, 5)):
            if lo > hi or part.key_range(torch.tensor([lo]), torch.tensor([hi])) is None:
                continue
            first, last = part.key_range(torch.tensor([lo]), torch.tensor([hi]))
            inside = (i >= lo) & (i <= hi)
            assert bool((j[inside] >= first).all()) and bool((j[inside] <= last).all())


def test_union_allows_the_or_of_its_parts():
    union = BlockLocal(8) | Global(n_first=2) | Dilated(2, 3)
    want = torch.zeros(N, N, dtype=torch.bool)
    for part in union.parts():
        want |= part.allows(GRID_Q, GRID_K)
    torch.testing.assert_close(union.allows(GRID_Q, GRID_K), want)


@pytest.mark.parametrize("build, message", [
    (lambda: Band(0), r"Band: window=0, must be >= 1"),
    (lambda: Dilated(2, 0), r"Dilated: window=2, dilation=0, both must be >= 1"),
    (lambda: Strided(0), r"Strided: stride=0, must be >= 1"),
    (lambda: BlockLocal(-1), r"BlockLocal: block=-1, must be >= 1"),
    (lambda: Global(), r"Global: n_first=0, positions=\(\); give n_first >= 1 or some positions >= 0"),
    (lambda: Global(positions=(-1,)), r"Global: n_first=0, positions=\(-1,\)"),
    (lambda: Union(), r"Union: give at least one pattern"),
])
def test_bad_arguments_name_the_pattern_and_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()
