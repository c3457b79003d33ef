import numpy as np
import pytest
import torch

from ferflow.data.cache import CachedSplit, SplitWriter
from ferflow.data.loader import EpochBatchSampler, make_loader
from ferflow.errors import FerflowError


def write_split(root, split="train", n=10, size=8, keep=None):
    writer = SplitWriter(root, size, split, capacity=n)
    kept = []
    for i in range(n):
        if keep is not None and i not in keep:
            continue  # as if quarantined
        writer.append(np.full((size, size, 3), i, dtype=np.uint8))
        kept.append(i % 3)
    writer.close(np.asarray(kept))
    return kept


def test_writer_trims_to_kept_rows_and_leaves_no_partial(tmp_path):
    write_split(tmp_path, n=10, keep={0, 2, 5})
    split = CachedSplit(tmp_path, "train", 8)
    assert split.images.shape == (3, 8, 8, 3) and split.images.dtype == np.uint8
    assert [int(split.images[i, 0, 0, 0]) for i in range(3)] == [0, 2, 5]
    assert not list(tmp_path.rglob("*.partial.npy"))


def test_missing_cache_names_the_size(tmp_path):
    with pytest.raises(FerflowError, match="prepare.image_sizes"):
        CachedSplit(tmp_path, "train", 224)


def test_loader_yields_uint8_channels_last_batches(tmp_path):
    write_split(tmp_path, n=10)
    loader = make_loader(tmp_path, "train", 8, batch_size=4)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert images.is_contiguous(memory_format=torch.channels_last)
    # each image was filled with its index; labels were index % 3
    assert torch.equal(images[:, 0, 0, 0].long() % 3, labels)


def test_shuffle_is_seeded_per_epoch_and_covers_everything(tmp_path):
    sampler = EpochBatchSampler(10, 3, shuffle=True, seed=5)
    first = np.concatenate(list(sampler))
    again = np.concatenate(list(EpochBatchSampler(10, 3, shuffle=True, seed=5)))
    sampler.set_epoch(1)
    second = np.concatenate(list(sampler))
    assert sorted(first) == list(range(10))
    assert np.array_equal(first, again) and not np.array_equal(first, second)


def test_ranks_get_disjoint_equal_shares():
    shares = [np.concatenate(list(EpochBatchSampler(10, 2, True, 1, rank=r, num_replicas=2))) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert set(shares[0]).isdisjoint(shares[1])


def test_workers_read_the_same_data(tmp_path):
    write_split(tmp_path, n=12)
    plain = [lab for _, lab in make_loader(tmp_path, "train", 8, 4, shuffle=True, seed=3)]
    with_workers = [lab for _, lab in make_loader(tmp_path, "train", 8, 4, shuffle=True, seed=3, workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(plain, with_workers))
