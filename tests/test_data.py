import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import AugmentCfg, DataCfg, load_config
from harness.data import (
    CalibrationSet, DataError, Loader, autoaugment, crop_at, crop_offsets, cutout, cutout_at, cutout_centres,
    decode_images, flip_mask, load_dataset, random_crop, random_flip, split_indices, stratified_allocation,
    stratified_sample,
)

ARCHIVE = (Path(__file__).parents[1] / "../shared/data/cifar10-jpeg.tar.gz").resolve()
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def synthetic_cfg(**kw) -> DataCfg:
    synthetic = {"num_train": 300, "num_test": 100, "channels": 3, "size": 12, "num_classes": 5}
    return DataCfg(name="synthetic", synthetic=synthetic, **kw)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


# ---------------------------------------------------------------- datasets

def test_digits(tmp_path):
    ds = load_dataset(DataCfg(name="digits"), seed=0, cache_dir=tmp_path)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.in_chans == 1
    assert ds.num_classes == 10 and ds.train_y.dtype == torch.int64
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == 1797
    assert len(ds.test_y) == 359  # 20 % of every class
    assert int(ds.train_x.max()) == 255 and len(ds.mean) == len(ds.std) == 1
    assert list(tmp_path.glob("digits-*.pt"))  # cached
    again = load_dataset(DataCfg(name="digits"), seed=0, cache_dir=tmp_path)
    assert torch.equal(again.train_x, ds.train_x) and again.mean == ds.mean


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    load_dataset(DataCfg(name="digits"), seed=0)
    assert list(tmp_path.glob("digits-*.pt"))


def test_split_indices_disjoint_and_deterministic():
    y = torch.arange(1000) % 10
    train, val = split_indices(y, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    again = split_indices(y, 0.1, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(split_indices(y, 0.1, seed=4)[1], val)


def within_one_of_share(counts, population_counts, n):
    total = sum(population_counts)
    return all(abs(c - n * p / total) < 1 for c, p in zip(counts, population_counts))


@pytest.mark.parametrize("seed", range(5))
def test_stratified_sample_of_a_class_sorted_list_covers_every_class(seed):
    # the trap: the first N of a class-sorted list hold only the first classes
    sizes = [529, 505, 497, 469, 512, 488, 530, 470, 500, 500]
    y = torch.arange(10).repeat_interleave(torch.tensor(sizes))
    idx = stratified_sample(y, 2000, torch.Generator().manual_seed(seed))
    assert len(idx) == len(set(idx.tolist())) == 2000
    counts = torch.bincount(y[idx], minlength=10).tolist()
    assert within_one_of_share(counts, sizes, 2000), counts
    assert torch.bincount(y[:2000], minlength=10)[4:].sum() == 0  # what "the first 2000" gave
    assert not torch.equal(y[idx], y[idx].sort().values)  # random order, not class-sorted
    assert not torch.equal(idx, stratified_sample(y, 2000, torch.Generator().manual_seed(seed + 1)))


def test_stratified_allocation_sums_and_shares():
    gen = torch.Generator().manual_seed(0)
    for counts, n in [([10, 10, 10], 7), ([1] * 6, 3), ([100, 1, 1], 50), ([5, 3], 8), ([4, 4], 0)]:
        take = stratified_allocation(counts, n, gen)
        assert sum(take) == n and all(0 <= t <= c for t, c in zip(take, counts))
        assert within_one_of_share(take, counts, n)
    with pytest.raises(ValueError):
        stratified_allocation([3, 3], 7, gen)


def test_val_split_is_stratified(tmp_path):
    ds = load_dataset(DataCfg(name="digits"), seed=2, cache_dir=tmp_path)
    full = torch.bincount(torch.cat([ds.train_y, ds.val_y]), minlength=10).tolist()
    assert within_one_of_share(torch.bincount(ds.val_y, minlength=10).tolist(), full, len(ds.val_y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_subset_is_stratified_on_digits(tmp_path, seed):
    cfg = load_config(overrides=["noise.calib_samples=100", f"train.seed={seed}"])
    ds = load_dataset(cfg.data, seed, cache_dir=tmp_path)
    cal = CalibrationSet.from_dataset(ds, cfg.resolved(ds.image_size))
    val_counts = torch.bincount(ds.val_y, minlength=10).tolist()
    assert len(cal) == 100 and within_one_of_share(cal.class_counts(), val_counts, 100)
    assert cal.describe() == {"split": "val", "n_images": 100, "class_counts": cal.class_counts(),
                              "sampling": "class-stratified random subset of the validation split",
                              "augmented": False}
    # the images are validation images, at the recorded positions, never a test image
    assert torch.equal(cal.x, ds.val_x[cal.indices]) and torch.equal(cal.y, ds.val_y[cal.indices])
    again = CalibrationSet.from_dataset(ds, cfg.resolved(ds.image_size))
    assert torch.equal(again.indices, cal.indices)
    whole = CalibrationSet.from_dataset(ds, load_config(overrides=[f"train.seed={seed}"]).resolved(8))
    assert len(whole) == len(ds.val_y) and not whole.subset


def test_calibration_batches_augmented_per_epoch_only_when_asked(tmp_path):
    base = ["noise.calib_samples=64"]
    ds = load_dataset(DataCfg(name="digits"), 0, cache_dir=tmp_path)
    plain = CalibrationSet.from_dataset(ds, load_config(overrides=base).resolved(8))
    aug = CalibrationSet.from_dataset(ds, load_config(overrides=base + ["noise.calib_augment=true"]).resolved(8))
    p1, p2 = (torch.cat(list(plain.batches(20, e))) for e in (1, 2))
    a1, a1b, a2 = (torch.cat(list(aug.batches(20, e))) for e in (1, 1, 2))
    final = torch.cat(list(aug.batches(20, None)))
    assert torch.equal(p1, p2) and torch.equal(final, p1)  # not augmented; final never is
    assert torch.equal(a1, a1b) and not torch.equal(a1, a2) and not torch.equal(a1, p1)
    assert aug.describe()["augmented"] and not plain.describe()["augmented"]


def test_val_split_depends_on_seed_only_test_fixed(tmp_path):
    a = load_dataset(synthetic_cfg(), seed=0, cache_dir=tmp_path)
    b = load_dataset(synthetic_cfg(), seed=0, cache_dir=tmp_path)
    c = load_dataset(synthetic_cfg(), seed=1, cache_dir=tmp_path)
    assert len(a.train_y) + len(a.val_y) == 300 and len(a.val_y) == 30
    assert not rows(a.train_x) & rows(a.val_x)
    assert rows(a.train_x) | rows(a.val_x) == rows(c.train_x) | rows(c.val_x)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert rows(a.val_x) != rows(c.val_x)
    assert torch.equal(a.test_x, c.test_x) and torch.equal(a.test_y, c.test_y)
    assert a.mean == c.mean  # statistics come from the whole training set


def test_synthetic_is_class_conditional(tmp_path):
    ds = load_dataset(synthetic_cfg(), seed=0, cache_dir=tmp_path)
    assert ds.train_x.shape[1:] == (3, 12, 12) and ds.num_classes == 5
    x_train, x_test = ds.train_x.flatten(1).float(), ds.test_x.flatten(1).float()
    centroids = torch.stack([x_train[ds.train_y == k].mean(0) for k in range(5)])
    predicted = torch.cdist(x_test, centroids).argmin(1)
    assert (predicted == ds.test_y).float().mean() > 0.95


def make_images(root: Path, classes=("cat", "ant", "bee"), per_split={"train": 3, "test": 2}):
    """Write random PNGs in imagefolder layout; returns {split: (images, labels)} in load order."""
    gen = np.random.default_rng(0)
    expected = {}
    for split, n in per_split.items():
        images, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = gen.integers(0, 256, (5, 6, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i:03d}.png")
                images.append(img.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (torch.from_numpy(np.stack(images)), torch.tensor(labels))
    return expected


def check_imagefolder(ds, expected):
    assert ds.classes == ("ant", "bee", "cat")
    assert torch.equal(ds.test_x, expected["test"][0]) and torch.equal(ds.test_y, expected["test"][1])
    train_x = torch.cat([ds.train_x, ds.val_x])
    assert rows(train_x) == rows(expected["train"][0])
    assert sorted(torch.cat([ds.train_y, ds.val_y]).tolist()) == sorted(expected["train"][1].tolist())


def test_imagefolder_directory_and_archive(tmp_path):
    expected = make_images(tmp_path / "imgs" / "top")
    cfg = DataCfg(name="imagefolder", root=str(tmp_path / "imgs" / "top"), val_fraction=0.2)
    check_imagefolder(load_dataset(cfg, seed=0, cache_dir=tmp_path / "cache"), expected)

    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs" / "top", arcname="top")  # under one top-level folder
    cfg = DataCfg(name="imagefolder", root=str(archive), val_fraction=0.2)
    ds = load_dataset(cfg, seed=0, cache_dir=tmp_path / "cache")
    check_imagefolder(ds, expected)
    assert ds.source == str(archive) and ds.in_chans == 3
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 2


def test_decode_images_in_worker_pool(tmp_path):
    expected = make_images(tmp_path)
    paths = sorted((tmp_path / "train").glob("*/*.png"))
    blobs = [(p.name, p.read_bytes()) for p in paths]
    decoded = decode_images(blobs, workers=2, chunk=2)
    assert torch.equal(torch.from_numpy(decoded).permute(0, 3, 1, 2), expected["train"][0])
    assert np.array_equal(decode_images(paths, workers=1), decoded)


def test_missing_sources_raise_one_line_errors(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(DataCfg(name="imagefolder", root=str(tmp_path / "nope")), seed=0, cache_dir=tmp_path)
    assert str(info.value) == f"data error: data root '{tmp_path / 'nope'}' does not exist"

    with pytest.raises(DataError) as info:
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path)), seed=0, cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "data.download: true" in message and "--set data.download=true" in message


def test_cifar_pickles(tmp_path):
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    gen = np.random.default_rng(1)
    data = {"train": gen.integers(0, 256, (6, 3072), dtype=np.uint8),
            "test": gen.integers(0, 256, (4, 3072), dtype=np.uint8)}
    for split, x in data.items():
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": list(range(len(x)))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    ds = load_dataset(DataCfg(name="cifar100", root=str(tmp_path), val_fraction=0.5), 0, tmp_path / "cache")
    assert ds.num_classes == 100 and ds.classes[3] == "c3"
    assert torch.equal(ds.test_x, torch.from_numpy(data["test"]).view(4, 3, 32, 32))
    assert ds.test_y.tolist() == [0, 1, 2, 3]
    assert len(ds.train_y) == len(ds.val_y) == 3


@pytest.mark.slow
def test_cifar10_jpeg_archive(tmp_path):
    if not ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {ARCHIVE} (only on development/CI machines)")
    cfg = DataCfg(name="imagefolder", root=str(ARCHIVE))
    ds = load_dataset(cfg, seed=0, cache_dir=tmp_path)
    assert ds.classes == CIFAR10_CLASSES
    assert len(ds.train_y) + len(ds.val_y) == 50000 and len(ds.val_y) == 5000
    assert ds.test_x.shape == (10000, 3, 32, 32) and ds.test_x.dtype == torch.uint8
    assert torch.equal(ds.test_y, torch.arange(10).repeat_interleave(1000))
    assert torch.bincount(torch.cat([ds.train_y, ds.val_y])).tolist() == [5000] * 10
    assert ds.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.01)
    # `cifar10` pointed at the archive reads the same cached tensors
    same = load_dataset(DataCfg(name="cifar10", root=str(ARCHIVE)), seed=0, cache_dir=tmp_path)
    assert torch.equal(same.test_x, ds.test_x)
    # the archive is class-sorted: the calibration subset must still cover every class
    assert torch.bincount(ds.val_y).tolist() == [500] * 10  # the val split is stratified
    cfg = load_config(overrides=[f"data.root={ARCHIVE}", "data.name=imagefolder", "noise.calib_samples=2000"])
    cal = CalibrationSet.from_dataset(ds, cfg.resolved(32))
    assert cal.class_counts() == [200] * 10


# ---------------------------------------------------------------- augmentation

def images(n=16, c=3, h=7, w=9, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_matches_naive_reference():
    x, pad = images(), 3
    out = random_crop(x, pad, torch.Generator().manual_seed(5))
    dy, dx = crop_offsets(len(x), pad, torch.Generator().manual_seed(5))
    assert dy.min() >= 0 and dy.max() <= 2 * pad and len(set(dy.tolist())) > 1
    h, w = x.shape[-2:]
    for i in range(len(x)):
        padded = torch.zeros(x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        padded[:, pad:pad + h, pad:pad + w] = x[i]
        assert torch.equal(out[i], padded[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w])
    centred = crop_at(x, pad, torch.full((16,), pad), torch.full((16,), pad))
    assert torch.equal(centred, x)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_flip_flips_exactly_the_chosen_images():
    x = images(64)
    out = random_flip(x, torch.Generator().manual_seed(2))
    mask = flip_mask(len(x), torch.Generator().manual_seed(2))
    assert 0 < mask.sum() < len(x)
    assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])


def test_flip_rate_is_one_half():
    rate = flip_mask(20000, torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(rate - 0.5) < 0.02


@pytest.mark.parametrize("cy, cx, hole", [(3, 4, (slice(1, 5), slice(2, 6))),   # inside
                                          (0, 8, (slice(0, 2), slice(6, 9))),   # clipped corner
                                          (6, 0, (slice(4, 7), slice(0, 2)))])
def test_cutout_zeroes_a_clipped_square(cy, cx, hole):
    x = torch.full((1, 2, 7, 9), 7.0)
    out = cutout_at(x, 4, torch.tensor([cy]), torch.tensor([cx]))
    expected = x.clone()
    expected[0, :, hole[0], hole[1]] = 0
    assert torch.equal(out, expected)


def test_cutout_random_square():
    x = torch.full((200, 1, 10, 10), 255, dtype=torch.uint8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    cy, cx = cutout_centres(200, 10, 10, torch.Generator().manual_seed(0))
    assert cy.min() >= 0 and cy.max() <= 9 and cx.min() >= 0 and cx.max() <= 9
    zeros = (out == 0).sum((1, 2, 3))
    inside = (cy >= 2) & (cy <= 8) & (cx >= 2) & (cx <= 8)
    assert (zeros[inside] == 16).all() and (zeros[~inside] < 16).all() and (zeros > 0).all()
    assert torch.equal(cutout(x, 0, torch.Generator()), x)


def test_autoaugment_is_deterministic_and_leaves_global_rng_alone():
    x = images(8, h=32, w=32)
    state = torch.get_rng_state()
    a = autoaugment(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    b = autoaugment(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)


# ---------------------------------------------------------------- loader

def make_loader(x, y, **kw):
    kw = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "augment": AugmentCfg(crop_pad=4, flip=True, cutout=3, autoaugment=False),
          "shuffle": True, "seed": 7, **kw}
    return Loader(x, y, 10, **kw)


def test_loader_replays_epochs():
    x, y = images(45), torch.arange(45)
    loader = make_loader(x, y)
    assert len(loader) == 5 and len(make_loader(x, y, drop_last=True)) == 4
    first = list(loader.epoch_batches(3))
    again = list(make_loader(x, y).epoch_batches(3))
    assert [len(b) for _, b in first] == [10, 10, 10, 10, 5]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = list(loader.epoch_batches(4))
    assert not torch.equal(first[0][1], other[0][1])
    assert sorted(torch.cat([b for _, b in first]).tolist()) == list(range(45))
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (10, 3, 7, 9)


def test_loader_other_seed_differs_and_augmentation_applies():
    x, y = images(45), torch.arange(45)
    plain = next(make_loader(x, y, augment=None).epoch_batches(0))
    augmented = next(make_loader(x, y).epoch_batches(0))
    assert torch.equal(plain[1], augmented[1]) and not torch.equal(plain[0], augmented[0])
    assert not torch.equal(next(make_loader(x, y, seed=8).epoch_batches(0))[1], plain[1])


def test_loader_eval_batches_normalise_in_order():
    x, y = images(25), torch.arange(25)
    loader = make_loader(x, y)
    xs, ys = zip(*loader.eval_batches())
    assert torch.equal(torch.cat(ys), y)
    assert torch.allclose(torch.cat(xs), (x.float() / 255 - 0.5) / 0.25)
    unshuffled = make_loader(x, y, shuffle=False, augment=None)
    assert torch.equal(torch.cat([b for _, b in unshuffled.epoch_batches(0)]), y)
