import itertools
from collections import Counter

import numpy as np
import pytest

from lightning_tfm.data.batching import derive_seed as reexported
from lightning_tfm.data.permutation import IndexPermutation, derive_seed


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1000, 2**16, 2**16 + 1, 2**18 + 3, 300_001])
def test_is_a_bijection_of_range_n(n):
    for seed in (0, 1, 12345):
        image = IndexPermutation(n, seed)(np.arange(n))
        assert image.dtype == np.int64 and image.shape == (n,)
        assert np.array_equal(np.sort(image), np.arange(n))


def test_slices_map_like_the_whole_and_the_same_seed_gives_the_same_order():
    n = 10_007
    whole = IndexPermutation(n, 3)(np.arange(n))
    assert np.array_equal(IndexPermutation(n, 3)(np.arange(n)), whole)
    for start, stop in ((0, 1), (17, 4113), (n - 5, n)):
        assert np.array_equal(IndexPermutation(n, 3)(np.arange(start, stop)), whole[start:stop])
    shuffled = np.random.default_rng(0).permutation(n)
    assert np.array_equal(IndexPermutation(n, 3)(shuffled), whole[shuffled])       # any order of positions


def test_seeds_give_different_orders():
    orders = [IndexPermutation(1000, derive_seed(7, epoch))(np.arange(1000)) for epoch in range(20)]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(orders, 2))
    # no two epochs agree on more than a few positions, as for independent uniform permutations (1 expected)
    assert max(int((a == b).sum()) for a, b in itertools.combinations(orders, 2)) < 10


def test_where_an_item_lands_is_uniform_over_seeds():
    n, trials = 10, 5000
    landed = Counter(int(IndexPermutation(n, seed)(np.array([0]))[0]) for seed in range(trials))
    expected = trials / n
    chi2 = sum((landed[k] - expected) ** 2 / expected for k in range(n))
    assert chi2 < 33.7              # chi-square with 9 degrees of freedom: p = 1e-4


def test_every_order_of_three_appears_about_equally_often():
    counts = Counter(tuple(IndexPermutation(3, seed)(np.arange(3)).tolist()) for seed in range(6000))
    assert len(counts) == 6 and min(counts.values()) > 800 and max(counts.values()) < 1200


def test_displacements_look_like_a_uniform_shuffle():
    n = 100_000
    image = IndexPermutation(n, 11)(np.arange(n))
    # a uniform permutation moves an item n/3 on average, and neighbours land n/3 apart on average
    assert abs(np.abs(image - np.arange(n)).mean() / n - 1 / 3) < 0.01
    assert abs(np.abs(np.diff(image)).mean() / n - 1 / 3) < 0.01
    assert abs(np.corrcoef(image, np.arange(n))[0, 1]) < 0.02
    first_tenth = image[: n // 10]                 # a run of positions is spread over the whole range
    assert np.histogram(first_tenth, bins=10, range=(0, n))[0].min() > 0.8 * n / 100


def test_derive_seed_is_reexported_and_separates_its_parts():
    assert reexported is derive_seed
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(12) and derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(5) < 2**63


def test_errors():
    with pytest.raises(ValueError, match=r"n=0, must be in \[1, 2\*\*32\]"):
        IndexPermutation(0, 0)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\), got \[0, 5\]"):
        IndexPermutation(5, 0)(np.arange(6))
