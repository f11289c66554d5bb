import tracemalloc
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from lightning_tfm.data.batching import BucketBatchSampler, ResumableBatches
from lightning_tfm.data.padding import padded_length
from lightning_tfm.data.readers import read_lines


@pytest.mark.parametrize("multiple", [1, 8])
def test_batches_respect_the_padded_budget_and_cover_each_example_once(lengths, multiple):
    sampler = BucketBatchSampler(lengths, max_tokens=512, pad_to_multiple=multiple, pool_size=500, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) * padded_length(max(lengths[i] for i in batch), multiple) <= 512


def test_budget_batches_are_reasonably_full(lengths):
    batches = list(BucketBatchSampler(lengths, max_tokens=512, pool_size=500))
    used = sum(len(b) * padded_length(max(lengths[i] for i in b), 8) for b in batches)
    assert used / (512 * len(batches)) > 0.85


def test_bucketing_pads_less_than_random_batches(data_dir):
    lengths = [len(line.split()) + 2 for line in read_lines(data_dir / "multi30k" / "train.en")]

    def padding(pool_size):
        batches = list(BucketBatchSampler(lengths, max_tokens=1024, pool_size=pool_size, pad_to_multiple=1))
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    assert padding(pool_size=8192) < 0.02 < 0.2 < padding(pool_size=1)


def test_order_depends_on_seed_and_epoch_only(lengths):
    a = BucketBatchSampler(lengths, max_tokens=512, seed=1)
    b = BucketBatchSampler(lengths, max_tokens=512, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketBatchSampler(lengths, max_tokens=512, seed=2)) != list(a)  # not seed + epoch


def test_batch_order_is_shuffled_not_sorted_by_length(lengths):
    longest = [max(lengths[i] for i in b) for b in BucketBatchSampler(lengths, max_tokens=512, pool_size=4096)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    in_order = [max(lengths[i] for i in b)
                for b in BucketBatchSampler(lengths, max_tokens=512, pool_size=4096, shuffle=False)]
    assert in_order == sorted(in_order)


def test_fixed_size_batches(lengths):
    batches = list(BucketBatchSampler(lengths, batch_size=32, pool_size=256))
    sizes = Counter(len(b) for b in batches)
    assert sizes == {32: len(lengths) // 32, len(lengths) % 32: 1}
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    capped = list(BucketBatchSampler(lengths, max_tokens=4096, batch_size=16))
    assert max(len(b) for b in capped) == 16


def test_unshuffled_pool_of_one_keeps_index_order(lengths):
    batches = list(BucketBatchSampler(lengths, max_tokens=256, shuffle=False, pool_size=1))
    assert [i for b in batches for i in b] == list(range(len(lengths)))


def test_argument_errors(lengths):
    with pytest.raises(ValueError, match=r"example 1 has 30 tokens \(32 padded to a multiple of 8\), more than "
                                         r"max_tokens=24"):
        BucketBatchSampler([3, 30, 5], max_tokens=24)
    with pytest.raises(ValueError, match="set max_tokens, batch_size or both"):
        BucketBatchSampler(lengths)
    with pytest.raises(ValueError, match=r"rank=2, num_replicas=2"):
        BucketBatchSampler(lengths, batch_size=4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="lengths is empty"):
        BucketBatchSampler([], batch_size=4)


def greedy(lengths, order, max_tokens, batch_size, multiple=8):
    """The packing rule written out example by example: close a batch before an example that would push
    len(batch) * padded(longest) over max_tokens, or len(batch) over batch_size."""
    batches, batch = [], []
    for i in order:
        grown = batch + [i]
        longest = padded_length(max(lengths[j] for j in grown), multiple)
        if batch and ((max_tokens is not None and len(grown) * longest > max_tokens)
                      or (batch_size is not None and len(grown) > batch_size)):
            batches.append(batch)
            grown = [i]
        batch = grown
    return batches + [batch]


@pytest.mark.parametrize(("max_tokens", "batch_size", "multiple"), [(512, None, 8), (300, 7, 1), (None, 13, 8),
                                                                    (64, None, 8), (4096, 100, 8)])
def test_packing_matches_the_greedy_rule_in_any_order(lengths, max_tokens, batch_size, multiple):
    kwargs = dict(max_tokens=max_tokens, batch_size=batch_size, pad_to_multiple=multiple, shuffle=False)
    as_given = list(BucketBatchSampler(lengths, pool_size=1, **kwargs))                 # one pool, no sorting
    assert as_given == greedy(lengths, range(len(lengths)), max_tokens, batch_size, multiple)
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])                    # stable
    assert list(BucketBatchSampler(lengths, **kwargs)) == greedy(lengths, by_length, max_tokens, batch_size, multiple)
    edges = [0, 300, 600, 900, 1200, 1500, 2000]                 # sorted runs of 300, the last taking the rest
    runs = [i for a, b in zip(edges, edges[1:]) for i in sorted(range(a, b), key=lambda i: lengths[i])]
    assert list(BucketBatchSampler(lengths, pool_size=300, **kwargs)) == greedy(lengths, runs, max_tokens, batch_size,
                                                                                multiple)


def big(n, seed=0):
    return np.random.default_rng(seed).integers(3, 60, n)


def test_pools_are_random_samples_sorted_and_shuffled_within():
    n, pool = 20_000, 4096                       # 4 pools, the last of 4096 + 3616
    lengths = big(n)
    sampler = BucketBatchSampler(lengths, max_tokens=1024, pool_size=pool, seed=1)
    counts = sampler._pool_counts()
    stream = list(sampler.iter_global_batches())
    assert len(counts) == 4 and len(stream) == counts.sum() == len(sampler)
    first = np.concatenate(stream[:counts[0]])
    assert len(first) == pool and abs(first.mean() / n - 0.5) < 0.02      # drawn from the whole corpus
    assert np.histogram(first, bins=4, range=(0, n))[0].min() > 0.9 * pool / 4
    longest = [int(lengths[b].max()) for b in stream[:counts[0]]]
    assert longest != sorted(longest)                                     # the pool's batches are shuffled
    unshuffled = BucketBatchSampler(lengths, max_tokens=1024, pool_size=pool, shuffle=False)
    first = np.concatenate(list(unshuffled.iter_global_batches())[:unshuffled._pool_counts()[0]])
    assert sorted(first.tolist()) == list(range(pool))                    # index order: the first pool is 0..4095
    assert list(lengths[first]) == sorted(lengths[first])                 # sorted, batches in length order


def test_epochs_and_seeds_give_different_streams_and_the_same_seed_and_epoch_the_same():
    lengths = big(20_000)
    a, b = (BucketBatchSampler(lengths, max_tokens=1024, pool_size=4096, seed=3) for _ in range(2))
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0 and list(b) == epoch0
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketBatchSampler(lengths, max_tokens=1024, pool_size=4096, seed=4)) != epoch0
    for sampler in (a, b):
        assert sorted(i for batch in sampler for i in batch) == list(range(20_000))


class LazyLengths:
    """Lengths computed on demand, as a view over memory-mapped offsets would be; converting it whole raises."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not isinstance(index, np.ndarray):
            raise TypeError(f"LazyLengths takes numpy index arrays, got {type(index).__name__}")
        return 3 + (index * 7919) % 57 + (index == 12_345) * 100      # one example of 100+ tokens

    def __array__(self, *args, **kwargs):
        raise AssertionError("the sampler converted the whole lengths object to an array")

    def __iter__(self):
        raise AssertionError("the sampler iterated over the whole lengths object")


def test_lazy_lengths_are_read_a_pool_at_a_time_and_batch_like_an_array():
    lazy = LazyLengths(30_000)
    eager = lazy[np.arange(30_000)]
    kwargs = dict(max_tokens=2048, pool_size=4096, seed=2, num_replicas=3, rank=1)
    assert list(BucketBatchSampler(lazy, **kwargs)) == list(BucketBatchSampler(eager, **kwargs))
    longest = int(eager[12_345])
    with pytest.raises(ValueError, match=rf"example 12345 has {longest} tokens \({padded_length(longest, 8)} padded"):
        BucketBatchSampler(lazy, max_tokens=100)


def test_lengths_none_with_size_means_length_one():
    n = 1000
    assert (list(BucketBatchSampler(None, batch_size=16, size=n, seed=1))
            == list(BucketBatchSampler([1] * n, batch_size=16, seed=1)))
    with pytest.raises(ValueError, match=r"lengths=None needs size >= 0"):
        BucketBatchSampler(None, batch_size=16)


def traced_peak(sampler):
    """Peak bytes traced while counting and iterating one epoch, and the number of batches."""
    tracemalloc.start()
    batches = sum(1 for _ in sampler)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, batches


def test_the_sampler_holds_no_array_of_the_corpus_size_and_memory_does_not_grow_with_it():
    small, large = (BucketBatchSampler(LazyLengths(n), max_tokens=4096) for n in (250_000, 2_000_000))
    (peak_small, _), (peak_large, batches) = traced_peak(small), traced_peak(large)
    assert batches == len(large)
    assert peak_large < 1.5 * peak_small and peak_large < 2_000_000      # ~1 MB for one pool; old: >16 MB at 2M
    state = [v for v in vars(large).values() if isinstance(v, np.ndarray)]
    state += [v for v in large._counts if isinstance(v, np.ndarray)]
    assert state and max(a.size for a in state) <= 2_000_000 // 16384   # a count per pool


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_resuming_at_batch_k_continues_the_uninterrupted_stream(num_replicas):
    lengths = big(14_000)
    kwargs = dict(max_tokens=1024, pool_size=4096, seed=4, num_replicas=num_replicas, rank=num_replicas - 1)
    sampler = BucketBatchSampler(lengths, **kwargs)
    sampler.set_epoch(2)
    full, glob = list(sampler), list(sampler.iter_global_batches())
    counts = sampler._pool_counts()
    for k in (0, 1, int(counts[0]), int(counts[0]) + 1, int(counts[:2].sum()), len(glob) - 1, len(glob)):
        assert [b.tolist() for b in sampler.iter_global_batches(k)] == [b.tolist() for b in glob[k:]]
    for k in (0, 5, int(counts[0]) // num_replicas, len(full) - 1, len(full)):
        assert list(sampler.iter_from(k)) == full[k:]
        resumed = ResumableBatches(BucketBatchSampler(lengths, **kwargs))
        resumed.set_epoch(2)
        resumed.resume(2, k)
        assert list(resumed) == full[k:] and list(resumed) == full       # the skip applies once


def test_resumable_batches_skip_by_counting_for_other_samplers():
    plain = torch.utils.data.BatchSampler(range(10), batch_size=3, drop_last=False)
    resumed = ResumableBatches(plain)
    resumed.resume(0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(resumed) == [[6, 7, 8], [9]]
