import torch

from lightning_tfm.data.padding import pad_batch, padded_length


def test_pad_batch_values_shapes_and_mask():
    ids, mask = pad_batch([[5, 6, 7], [8], list(range(1, 10))], pad_id=0, pad_to_multiple=8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 16)
    assert ids[0, :4].tolist() == [5, 6, 7, 0] and ids[1, :2].tolist() == [8, 0]
    assert ids[2, :9].tolist() == list(range(1, 10))
    assert mask.sum(1).tolist() == [3, 1, 9]
    assert (ids[~mask] == 0).all()
    assert pad_batch([[1, 2, 3]], pad_id=9, pad_to_multiple=1)[0].shape == (1, 3)


def test_padded_length_rounds_up_to_the_multiple():
    assert [padded_length(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16] and padded_length(5, 1) == 5
