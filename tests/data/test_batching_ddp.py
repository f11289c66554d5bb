"""BucketBatchSampler under DDP: equal batch counts on every rank, each example exactly once, the evening-out
confined to the last pool."""


import numpy as np
import pytest

from lightning_tfm.data.batching import BucketBatchSampler
from lightning_tfm.data.padding import padded_length


def ranks(lengths, num_replicas, epoch=0, **kwargs):
    """Every rank's batches for one epoch, and one process's (num_replicas=1) batches of the same epoch."""
    samplers = [BucketBatchSampler(lengths, num_replicas=num_replicas, rank=r, **kwargs) for r in range(num_replicas)]
    single = BucketBatchSampler(lengths, **kwargs)
    for s in samplers + [single]:
        s.set_epoch(epoch)
    assert all(len(s) == len(list(s)) for s in samplers)
    return [list(s) for s in samplers], list(single)


@pytest.mark.parametrize(("n", "num_replicas", "max_tokens", "batch_size", "shuffle"), [
    (2000, 2, 512, None, True), (2000, 3, 512, None, True), (2000, 7, 512, 16, True),
    (40, 2, None, 16, False),     # 3 batches of 16, 16, 8 on 2 ranks: one split
    (41, 4, 128, None, True), (10, 3, None, 4, False), (5, 4, None, 2, True), (7, 7, 64, None, False),
    (1999, 8, 256, 5, True),
])
def test_ddp_ranks_get_equal_counts_and_each_example_exactly_once(lengths, n, num_replicas, max_tokens,
                                                                  batch_size, shuffle):
    for epoch in (0, 1):
        per_rank, single = ranks(lengths[:n], num_replicas, epoch, max_tokens=max_tokens, batch_size=batch_size,
                                 shuffle=shuffle, seed=5)
        assert len({len(batches) for batches in per_rank}) == 1                  # no rank waits in a collective
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == list(range(n))                                     # no repeats, nothing dropped
        assert len(per_rank[0]) == -(-len(single) // num_replicas)               # only the splits needed
        for b in (b for batches in per_rank for b in batches):
            assert b and (batch_size is None or len(b) <= batch_size)
            assert max_tokens is None or len(b) * padded_length(max(lengths[i] for i in b), 8) <= max_tokens
            assert [lengths[i] for i in b] == sorted(lengths[i] for i in b) or not shuffle


def test_ddp_splits_the_last_largest_batch_and_keeps_the_others_in_place():
    # one process: [0 1 2] [3 4 5] [6]; on 2 ranks [3 4 5] is cut in two and its second half goes last
    per_rank, single = ranks([4] * 7, 2, batch_size=3, shuffle=False)
    assert single == [[0, 1, 2], [3, 4, 5], [6]]
    assert per_rank == [[[0, 1, 2], [6]], [[3, 4], [5]]]
    per_rank, single = ranks(list(range(3, 23)), 4, batch_size=8, shuffle=False)     # 8 8 4 -> 4 8 4 4 ...
    assert single == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    glob = [per_rank[k % 4][k // 4] for k in range(4)]
    assert glob == [list(range(8)), list(range(8, 12)), list(range(16, 20)), list(range(12, 16))]


def test_ddp_merges_the_smallest_batches_when_splitting_cannot_even_out():
    with pytest.warns(UserWarning, match=r"splitting the last pool's 5 batches of 5 examples cannot make 5 "
                                         r"batches a multiple of num_replicas=4; merging its smallest batches"):
        per_rank, _ = ranks([9, 3, 9, 2, 9], 4, batch_size=1, shuffle=False, pool_size=1)
    assert per_rank == [[[0]], [[1, 3]], [[2]], [[4]]]        # 3 and 2 tokens pad to 8 each, 9 to 16


def test_ddp_needs_an_example_per_rank():
    with pytest.raises(ValueError, match=r"the split has 3 examples, fewer than the 4 DDP processes"):
        BucketBatchSampler([4, 4, 4], batch_size=2, num_replicas=4, rank=0)
    assert [len(list(s)) for s in (BucketBatchSampler([4] * 4, batch_size=2, num_replicas=4, rank=r)
                                   for r in range(4))] == [1, 1, 1, 1]


def global_stream(lengths, num_replicas, **kwargs):
    """The epoch's global batches, read back from every rank: batch k of rank r is global batch r + k R."""
    samplers = [BucketBatchSampler(lengths, num_replicas=num_replicas, rank=r, **kwargs) for r in range(num_replicas)]
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    return [per_rank[k % num_replicas][k // num_replicas] for k in range(num_replicas * len(per_rank[0]))]


@pytest.mark.parametrize(("n", "num_replicas", "pool_size", "max_tokens", "batch_size"), [
    (10_000, 3, 4096, 1024, None), (10_000, 8, 4096, None, 7), (20_000, 5, 4096, 512, 9),
    (9_000, 4, 1, 256, None), (13_000, 6, 5000, None, 33),
])
def test_ddp_splits_only_the_last_pool_and_covers_every_example_once(n, num_replicas, pool_size, max_tokens,
                                                                     batch_size):
    lengths = np.random.default_rng(n).integers(3, 60, n)
    kwargs = dict(max_tokens=max_tokens, batch_size=batch_size, pool_size=pool_size, seed=9)
    glob = global_stream(lengths, num_replicas, **kwargs)
    single = BucketBatchSampler(lengths, **kwargs)
    counts = single._pool_counts()
    assert len(counts) > 1
    kept = int(counts[:-1].sum())
    assert glob[:kept] == list(single)[:kept]                                 # the other pools are untouched
    assert len(glob) == -(-len(single) // num_replicas) * num_replicas
    assert sorted(i for b in glob for i in b) == list(range(n))


def test_ddp_merges_in_the_last_pool_when_it_cannot_split():
    n, num_replicas = 9_000, 7                   # 9000 single-example batches, 2 pools: 4096 and 4904
    with pytest.warns(UserWarning, match=r"last pool's 4904 batches of 4904 examples cannot make 9000 batches"):
        glob = global_stream([5] * n, num_replicas, batch_size=1, pool_size=4096, seed=1)
    assert len(glob) == 9000 // 7 * 7
    assert sorted(i for b in glob for i in b) == list(range(n))
    assert sum(len(b) == 2 for b in glob) == 9000 % 7 and all(len(b) == 1 for b in glob[:4096])


def test_ddp_raises_when_the_last_pool_cannot_absorb_the_merges():
    sampler = BucketBatchSampler([5] * 12_288, batch_size=1, pool_size=4096, num_replicas=7000)
    with pytest.raises(ValueError, match=r"the last pool's 4096 batches cannot absorb the 5288 merges"):
        len(sampler)
