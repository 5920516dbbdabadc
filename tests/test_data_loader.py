"""BatchLoader: seeded order, exact mid-epoch resume, sharding across ranks."""

import numpy as np
import torch

from vitkit.config import PreprocessConfig
from vitkit.data.loader import BatchLoader
from vitkit.data.sources import ImageArrayDataset
from vitkit.data.transforms import AugmentConfig, build_eval_transform, build_train_transform


def _dataset(n=50):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)  # pixel = index
    return ImageArrayDataset(images=images, labels=np.arange(n) % 5, classes=list("abcde"), skipped=[], source="t")


def _ids(batches):
    return [x[:, 0, 0, 0].tolist() for x, _ in batches]


def test_order_is_seeded_by_seed_and_epoch():
    ds = _dataset()
    a = BatchLoader(ds, None, 8, seed=1)
    first = _ids(a)
    assert len(first) == len(a) == 6 and all(len(b) == 8 for b in first)  # drop_last: 50 // 8
    assert _ids(BatchLoader(ds, None, 8, seed=1)) == first
    assert _ids(a) != first  # the next epoch is a new permutation (the loader advanced itself)
    assert a.state_dict() == {"epoch": 2, "batch_index": 0, "seed": 1}
    a.set_epoch(0)
    assert _ids(a) == first  # going back to epoch 0 replays its order
    b = BatchLoader(ds, None, 8, seed=2)
    assert _ids(b) != first
    x, y = next(iter(BatchLoader(ds, np.arange(10, 20), 4, shuffle=False)))
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3]
    assert x[:, 0, 0, 0].tolist() == [10, 11, 12, 13]


def test_set_epoch_and_no_drop_last_cover_everything():
    ds = _dataset()
    loader = BatchLoader(ds, None, 8, shuffle=False, drop_last=False)
    loader.set_epoch(3)
    ids = sum(_ids(loader), [])
    assert ids == list(range(50)) and len(loader) == 7


def test_mid_epoch_resume_is_exact_with_transforms():
    ds = _dataset(64)
    aug = AugmentConfig(random_crop_pad=1, random_erasing=0.5, mixup_alpha=0.5, cutmix_alpha=1.0)
    tf = build_train_transform(aug, PreprocessConfig(input_size=(4, 4), crop_pct=1.0), 5, 3)

    torch.manual_seed(0)
    straight = BatchLoader(ds, None, 8, seed=5, transform=tf)
    straight.set_epoch(2)
    full = list(straight)

    torch.manual_seed(0)
    first = BatchLoader(ds, None, 8, seed=5, transform=tf)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state, rng = first.state_dict(), torch.get_rng_state()  # what a checkpoint saves
    assert state["epoch"] == 2 and state["batch_index"] == 3

    torch.manual_seed(123)  # a fresh process with other RNG history
    resumed = BatchLoader(ds, None, 8, seed=5, transform=tf)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    resumed.set_epoch(2)  # the training loop calls this again on restart: the position survives
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for (xa, ya), (xb, yb) in zip(head + tail, full):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.state_dict() == {"epoch": 3, "batch_index": 0, "seed": 5}


def test_two_ranks_see_disjoint_batches_covering_the_epoch():
    ds = _dataset(64)
    r0 = BatchLoader(ds, None, 8, seed=7, rank=0, world_size=2)
    r1 = BatchLoader(ds, None, 8, seed=7, rank=1, world_size=2)
    a, b = sum(_ids(r0), []), sum(_ids(r1), [])
    assert len(r0) == len(r1) == 4
    assert not set(a) & set(b) and sorted(a + b) == list(range(64))
    uneven = [BatchLoader(ds, None, 8, rank=r, world_size=3) for r in range(3)]
    assert [len(u) for u in uneven] == [2, 2, 2]  # equal step counts for every rank


def test_eval_transform_in_loader():
    ds = _dataset(10)
    tf = build_eval_transform(PreprocessConfig(input_size=(4, 4), crop_pct=1.0), 3)
    x, y = next(iter(BatchLoader(ds, None, 5, shuffle=False, drop_last=False, transform=tf)))
    assert x.dtype == torch.float32 and x.shape == (5, 3, 4, 4) and y.tolist() == [0, 1, 2, 3, 4]
