"""GroupedBatchSampler: grouping, determinism per (seed, epoch), resume; and the loaders built on it."""

from __future__ import annotations

import pytest
import torch

from instseg.config.schema import DataConfig
from instseg.data.build import build_dataset, build_test_loader, build_train_loader
from instseg.data.coco import DataError, SkipBadSamples
from instseg.data.samplers import GroupedBatchSampler

RATIOS = [1.5, 0.5, 1.0, 0.75, 2.0, 1.33, 0.8, 0.6, 1.2, 0.9, 1.1, 3.0, 0.4]  # 8 landscape (>= 1), 5 portrait


def _landscape(i):
    return RATIOS[i] >= 1.0


def test_batches_are_grouped_and_cover_every_index():
    s = GroupedBatchSampler(RATIOS, 2, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == s.batches_per_epoch == 7  # ceil(13 / 2)
    assert sorted(i for b in batches for i in b) == list(range(13))
    assert [len(b) for b in batches] == [2] * 6 + [1]
    for b in batches[:-1]:  # only the merged leftovers at the end may mix orientations
        assert len({_landscape(i) for i in b}) == 1


def test_full_batches_before_leftovers_are_single_group():
    s = GroupedBatchSampler(RATIOS, 3, seed=0)
    batches = list(s)
    # 8 landscape -> 2 full + 2 left, 5 portrait -> 1 full + 2 left; leftovers: 4 -> [3, 1]
    assert [len(b) for b in batches] == [3, 3, 3, 3, 1]
    for b in batches[:3]:
        assert len({_landscape(i) for i in b}) == 1


def test_deterministic_per_seed_and_epoch():
    a, b = GroupedBatchSampler(RATIOS, 2, seed=4), GroupedBatchSampler(RATIOS, 2, seed=4)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(GroupedBatchSampler(RATIOS, 2, seed=5)) != list(GroupedBatchSampler(RATIOS, 2, seed=4))


def test_no_shuffle_and_drop_last():
    s = GroupedBatchSampler(RATIOS, 2, shuffle=False)
    first = list(s)[0]
    assert first == [0, 2]  # first two landscape images in order
    d = GroupedBatchSampler(RATIOS, 2, drop_last=True, seed=3)
    batches = list(d)
    assert len(batches) == len(d) == 6 and all(len(b) == 2 for b in batches)


def test_resume_skips_first_batches():
    s = GroupedBatchSampler(RATIOS, 2, seed=7)
    s.set_epoch(3)
    full = list(s)
    r = GroupedBatchSampler(RATIOS, 2, seed=7, start_batch=4)
    r.epoch = 3
    assert list(r) == full[4:] and len(r) == len(full) - 4
    s.set_epoch(3, start_batch=2)
    assert list(s) == full[2:]
    s.set_epoch(4)
    assert s.start_batch == 0 and len(list(s)) == 7
    with pytest.raises(ValueError):
        GroupedBatchSampler(RATIOS, 0)


@pytest.fixture
def small_cfg(write_coco, tmp_path):
    images, anns = [], []
    for i in range(7):
        w, h = (48, 32) if i % 3 else (32, 48)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0,
                     "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]], "area": 120})
    images.append({"id": 99, "file_name": "empty.png", "width": 40, "height": 40})
    ann_file, image_dir = write_coco(images, anns, [{"id": 1, "name": "thing"}])
    return DataConfig(train_ann=str(ann_file), train_images=str(image_dir), val_ann=str(ann_file),
                      val_images=str(image_dir), scale=(64, 64), batch_size=2, num_workers=0)


def test_train_loader_resume_gives_the_same_data(small_cfg):
    ds = build_dataset(small_cfg, "train")
    assert len(ds) == 7  # the image without instances is filtered for training
    def run(start):
        loader = build_train_loader(small_cfg, ds, seed=3, epoch=2, start_batch=start)
        return [(b.image_ids, b.images.clone(), b.flipped) for b, _, _ in loader]
    full, resumed = run(0), run(2)
    assert len(full) == 4 and len(resumed) == 2
    for (ia, xa, fa), (ib, xb, fb) in zip(full[2:], resumed):
        assert ia == ib and fa == fb and torch.equal(xa, xb)
    other = build_train_loader(small_cfg, ds, seed=3, epoch=3)
    assert [b.image_ids for b, _, _ in other] != [x[0] for x in full]
    batch = full[0][1]
    assert batch.shape[-1] % 32 == 0 and batch.shape[-2] % 32 == 0
    assert isinstance(build_train_loader(small_cfg, ds, seed=0, epoch=0).dataset, SkipBadSamples)
    strict = DataConfig(**{**small_cfg.__dict__, "strict": True})
    assert not isinstance(build_train_loader(strict, ds, seed=0, epoch=0).dataset, SkipBadSamples)


def test_test_loader_and_val_dataset(small_cfg):
    ds = build_dataset(small_cfg, "val")
    assert len(ds) == 8
    ids = [b.image_ids[0] for b, _, _ in build_test_loader(small_cfg, ds)]
    assert ids == [1, 2, 3, 4, 5, 6, 7, 99]
    batches = list(build_test_loader(small_cfg, ds, batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 3, 2] and not any(any(b[0].flipped) for b in batches)


def test_build_dataset_semantic_modes(small_cfg):
    with pytest.raises(DataError, match="data.train_stuff"):
        build_dataset(small_cfg, "train", semantic="stuff")
    d = build_dataset(small_cfg, "train", semantic="derive")
    assert d.num_semantic_classes == 2 and set(d[0].targets.semantic.unique().tolist()) <= {0, 1}
    with pytest.raises(DataError, match="val_ann"):
        build_dataset(DataConfig(), "val")
    with pytest.raises(ValueError):
        build_dataset(small_cfg, "test")


# ----------------------------------------------------------------------------- distributed shards


@pytest.mark.parametrize("world_size,batch_size", [(2, 1), (2, 2), (3, 2), (4, 1)])
def test_ranks_split_each_total_batch(world_size, batch_size):
    """Rank r's step k is its slice of the total batch k of one process with the total batch size,
    so the images of a step do not depend on how the total batch is split over processes."""
    total = world_size * batch_size
    single = GroupedBatchSampler(RATIOS, total, seed=2)
    single.set_epoch(5)
    ranks = [GroupedBatchSampler(RATIOS, batch_size, seed=2, rank=r, world_size=world_size) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(5)
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(single) == -(-13 // total)
    for k, whole in enumerate(single):
        joined = [i for r in range(world_size) for i in per_rank[r][k]]
        # every rank gets batch_size images every step; the short last total batch is filled up
        assert all(len(per_rank[r][k]) == batch_size for r in range(world_size))
        assert joined[: len(whole)] == whole
    covered = {i for b in per_rank for batch in b for i in batch}
    assert covered == set(range(13))


def test_distributed_resume_and_drop_last():
    a = GroupedBatchSampler(RATIOS, 2, seed=7, rank=1, world_size=2)
    a.set_epoch(2)
    b = GroupedBatchSampler(RATIOS, 2, seed=7, rank=1, world_size=2)
    b.set_epoch(2, start_batch=2)
    assert list(b) == list(a)[2:] and len(b) == len(a) - 2
    d = GroupedBatchSampler(RATIOS, 2, seed=7, rank=0, world_size=2, drop_last=True)
    assert len(list(d)) == len(d) == 3 and all(len(x) == 2 for x in d)
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler(RATIOS, 2, rank=2, world_size=2)
