import torch

from leanmim.parts.tokens import (BatchRandom, gather_tokens, num_visible, patchify, random_masking, scatter_tokens,
                                  unpatchify)


def test_patchify_unpatchify_roundtrip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    assert torch.equal(unpatchify(patches, 4, (2, 3), 3), images)
    # patch 4 (row 1, col 1) holds pixel rows 4..7, cols 4..7; first value is channel 0 at (4, 4)
    assert patches[0, 4, 0] == images[0, 0, 4, 4]
    assert patches[0, 4, 1] == images[0, 1, 4, 4]   # channels are innermost
    assert patches[0, 4, 3] == images[0, 0, 4, 5]


def test_random_masking_keeps_exact_count_and_restores_order():
    noise = BatchRandom(seed=3).rand(5, 49)
    for ratio in (0.75, 0.5, 0.9, 0.33):
        masking = random_masking(noise, ratio)
        keep = int(49 * (1 - ratio))
        assert masking.ids_keep.shape == (5, keep) and masking.ids_masked.shape == (5, 49 - keep)
        assert torch.equal(masking.mask.sum(1), torch.full((5,), 49.0 - keep))
        # ids_restore inverts the shuffle: shuffled positions put back give 0..L-1
        restored = torch.gather(masking.ids_shuffle, 1, masking.ids_restore)
        assert torch.equal(restored, torch.arange(49).expand(5, -1))
        # the mask marks exactly the masked ids, and the kept ones are those with the smallest noise
        assert torch.all(torch.gather(masking.mask, 1, masking.ids_masked) == 1)
        assert torch.all(torch.gather(masking.mask, 1, masking.ids_keep) == 0)
        assert torch.all(torch.gather(noise, 1, masking.ids_keep).max(1).values
                         < torch.gather(noise, 1, masking.ids_masked).min(1).values)
    assert num_visible(10, 0.99) == 1


def test_gather_scatter_tokens():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    ids = torch.tensor([[4, 0], [2, 2]])
    picked = gather_tokens(tokens, ids)
    assert torch.equal(picked[0, 0], tokens[0, 4]) and torch.equal(picked[1, 1], tokens[1, 2])
    written = scatter_tokens(torch.zeros_like(tokens), torch.tensor([[1, 3], [0, 4]]), torch.ones(2, 2, 3))
    assert written.sum() == 12 and written[0, 1].sum() == 3 and written[1, 4].sum() == 3


def test_batch_random_is_independent_of_process_split_and_resumption():
    whole = BatchRandom(seed=1, step=7).rand(8, 3)
    halves = [BatchRandom(seed=1, step=7, rank=r, world_size=2).rand(4, 3) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(BatchRandom(seed=1, step=7).rand(8, 3), whole)
    assert not torch.equal(BatchRandom(seed=1, step=8).rand(8, 3), whole)
