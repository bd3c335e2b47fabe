"""Training data pipeline: the harness's batched augmentation against a torchvision
DataLoader with per-sample PIL transforms.

    python benchmarks/data_pipeline.py [--quick] [--threads N]

Both produce normalised float batches of 256 CIFAR-10 images with random crop (pad 4),
horizontal flip and cutout 16, shuffled, for one pass over N images:
  - ours: `harness.data.Loader` over the decoded uint8 tensor (one process, CPU);
  - peer A: `torchvision.datasets.ImageFolder` over the extracted JPEG files,
    `DataLoader(num_workers=2)`, per-sample transforms (decodes every JPEG each epoch,
    as a per-sample pipeline over image files does);
  - peer B (fairer): the same DataLoader over the same decoded uint8 images held in
    memory, converted to PIL per sample (as torchvision's CIFAR10 dataset does).
Workers are persistent, so worker start-up is paid in the warm-up, not per epoch.
"""
from __future__ import annotations

import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import (DEFAULT_REPS, ROOT, command, interleaved, main, section, set_threads,
                                table, target)

SCRIPT = "data_pipeline.py"
TITLE = "Data pipeline (batched augmentation vs per-sample DataLoader)"
BATCH, PAD, CUTOUT, WORKERS = 256, 4, 16, 2
TARGET = 5.0
FULL = dict(n=None)  # all 50,000 training images
QUICK = dict(n=2000)


def archive_path() -> Path | None:
    cands = [os.environ.get("HARNESS_CIFAR10_JPEG"), ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def extracted(archive: Path) -> Path:
    """The archive extracted once under ~/.cache/harness/bench/cifar10-jpeg (reused)."""
    from harness.data import default_cache_dir

    dest = default_cache_dir() / "bench" / "cifar10-jpeg"
    marker = dest / ".complete"
    if marker.exists() and marker.read_text() == f"{archive.resolve()} {archive.stat().st_size}":
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ".complete").write_text(f"{archive.resolve()} {archive.stat().st_size}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


class Cutout:
    """DeVries & Taylor cutout on a normalised C x H x W tensor: zero one size x size
    square (clipped at the borders) at a uniformly drawn centre."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - self.size // 2, 0), min(cy + self.size - self.size // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + self.size - self.size // 2, w)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0
        return img


def peer_transform(mean, std):
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=PAD), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std), Cutout(CUTOUT)])


class InMemory(torch.utils.data.Dataset):
    """Decoded uint8 images (HWC numpy, as torchvision.datasets.CIFAR10 keeps them),
    converted to PIL per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x = x.permute(0, 2, 3, 1).contiguous().numpy()
        self.y = y.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def _load(archive: Path, n: int | None):
    """(ImageFolder or its subset, uint8 images [N,3,32,32] of the same files, labels, mean, std)."""
    from torchvision.datasets import ImageFolder

    from harness.data import channel_stats, decode_images

    root = extracted(archive)
    folder = ImageFolder(str(root / "train"))
    if n is None:  # everything: the harness's own cached decode of the archive
        from harness.config import load_config
        from harness.data import load_dataset

        cfg = load_config(None, ["data.name=imagefolder", f"data.root={archive}"])
        d = load_dataset(cfg.data, 0)
        x, y = torch.cat([d.train_x, d.val_x]), torch.cat([d.train_y, d.val_y])
        return folder, x, y, list(d.mean), list(d.std)
    idx = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
    paths = [folder.samples[i][0] for i in idx]
    x = torch.from_numpy(decode_images(paths)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([folder.samples[i][1] for i in idx])
    mean, std = channel_stats(x)
    return torch.utils.data.Subset(folder, idx), x, y, mean, std


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    set_threads(threads)
    cmd = command(SCRIPT, quick, threads)
    archive = archive_path()
    if archive is None:
        return section(TITLE, cmd, "Skipped: the CIFAR-10 JPEG archive (`../shared/data/cifar10-jpeg.tar.gz`, "
                       "or `$HARNESS_CIFAR10_JPEG`) is not on this machine.")
    from harness.config import AugmentCfg
    from harness.data import Loader

    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    folder, x, y, mean, std = _load(archive, cfg["n"])
    setup_s = time.perf_counter() - t0
    N = len(y)
    ours = Loader(x, y, BATCH, mean=mean, std=std, augment=AugmentCfg(crop_pad=PAD, flip=True, cutout=CUTOUT, autoaugment=False),
                  shuffle=True, drop_last=False, device="cpu", seed=0)
    epoch = [0]

    def run_ours():
        epoch[0] += 1
        n = 0
        for xb, yb in ours.epoch_batches(epoch[0]):
            n += len(yb)
        assert n == N

    tf = peer_transform(mean, std)
    if isinstance(folder, torch.utils.data.Subset):
        folder.dataset.transform = tf
    else:
        folder.transform = tf

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                           persistent_workers=True, drop_last=False)

    jpeg, mem = loader(folder), loader(InMemory(x, y, tf))

    def consume(dl):
        def f():
            n = 0
            for xb, yb in dl:
                n += len(yb)
            assert n == N
        return f

    names = {"ours: harness Loader (batched, uint8 in memory)": run_ours,
             "peer A: ImageFolder JPEG + per-sample PIL transforms": consume(jpeg),
             "peer B: in-memory uint8 → PIL + per-sample transforms": consume(mem)}
    med = interleaved(names, reps)
    # shut the persistent workers down
    del jpeg, mem
    ours_s = med[next(iter(names))]
    rows = []
    for name, s in med.items():
        r = ours_s and s / ours_s
        rows.append([name, s * 1e3, N / s, f"{r:.2f}×", "" if name.startswith("ours") else
                     target(r >= TARGET)])
    body = (f"CIFAR-10 training images from `{archive}` (N = {N:,} per pass, batch {BATCH}, crop pad {PAD} + "
            f"flip + cutout {CUTOUT}, shuffled), CPU. Peers: `DataLoader(num_workers={WORKERS}, "
            "persistent_workers=True)` with RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize, "
            f"Cutout({CUTOUT}); extracted once to `{extracted(archive)}`. Median of {reps} interleaved "
            f"passes after one warm-up pass each (untimed set-up: {setup_s:.0f} s).\n\n"
            + table(["pipeline", "ms / pass", "images/s", "ours speed-up", f"target ≥ {TARGET:.0f}×"], rows)
            + f"\n\nOurs runs in the main process with {threads} torch thread(s); each peer uses "
            f"{WORKERS} worker processes plus the main process.")
    return section(TITLE, cmd, body)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
