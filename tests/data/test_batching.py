from collections import Counter

import pytest
import torch

from lightning_tfm.data.batching import BucketBatchSampler, pad_batch
from lightning_tfm.data.readers import read_lines


@pytest.fixture(scope="module")
def lengths():
    """Lengths shaped like subword counts of short sentences: 2000 draws in [3, 60)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(3, 30, (2000,), generator=g) + torch.randint(0, 30, (2000,), generator=g)).tolist()


def round_up(n, k):
    return (n + k - 1) // k * k


def test_pad_batch_values_shapes_and_mask():
    ids, mask = pad_batch([[5, 6, 7], [8], list(range(1, 10))], pad_id=0, pad_to_multiple=8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 16)
    assert ids[0, :4].tolist() == [5, 6, 7, 0] and ids[1, :2].tolist() == [8, 0]
    assert ids[2, :9].tolist() == list(range(1, 10))
    assert mask.sum(1).tolist() == [3, 1, 9]
    assert (ids[~mask] == 0).all()
    assert pad_batch([[1, 2, 3]], pad_id=9, pad_to_multiple=1)[0].shape == (1, 3)


@pytest.mark.parametrize("multiple", [1, 8])
def test_batches_respect_the_padded_budget_and_cover_each_example_once(lengths, multiple):
    sampler = BucketBatchSampler(lengths, max_tokens=512, pad_to_multiple=multiple, pool_size=500, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) * round_up(max(lengths[i] for i in batch), multiple) <= 512


def test_budget_batches_are_reasonably_full(lengths):
    batches = list(BucketBatchSampler(lengths, max_tokens=512, pool_size=500))
    used = sum(len(b) * round_up(max(lengths[i] for i in b), 8) for b in batches)
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
            assert max_tokens is None or len(b) * round_up(max(lengths[i] for i in b), 8) <= max_tokens
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
    with pytest.warns(UserWarning, match=r"5 examples in 5 batches cannot be split into a multiple of "
                                         r"num_replicas=4; merging the smallest batches"):
        per_rank, _ = ranks([9, 3, 9, 2, 9], 4, batch_size=1, shuffle=False, pool_size=1)
    assert per_rank == [[[0]], [[1, 3]], [[2]], [[4]]]        # 3 and 2 tokens pad to 8 each, 9 to 16


def test_ddp_needs_an_example_per_rank():
    with pytest.raises(ValueError, match=r"the split has 3 examples, fewer than the 4 DDP processes"):
        BucketBatchSampler([4, 4, 4], batch_size=2, num_replicas=4, rank=0)
    assert [len(list(s)) for s in (BucketBatchSampler([4] * 4, batch_size=2, num_replicas=4, rank=r)
                                   for r in range(4))] == [1, 1, 1, 1]


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
