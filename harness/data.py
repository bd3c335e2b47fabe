"""Datasets held in memory as uint8 tensors, and a device-side batch loader with
vectorised augmentation.

Each loader decodes its source once and caches the tensors (torch.save) under
`cache_dir or $HARNESS_CACHE or ~/.cache/harness`, keyed by a hash of the source
(absolute path, size and mtime of its files). The validation split is carved out
of the training set from the run's seed; the test set never depends on it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness.config import AugmentCfg, Config, DataCfg, SyntheticCfg
from harness.errors import BAD_INPUT, HarnessError

CACHE_VERSION = 1
DIGITS_TEST_SEED = 12345  # the digits test split is fixed: it never depends on a run's seed
SYNTHETIC_SEED = 20240611  # the synthetic dataset is one fixed dataset
# epoch e of seed s draws order and augmentation from seed s * stride + e: a prime larger
# than any epoch count, so (s, e) pairs never share a stream
EPOCH_SEED_STRIDE = 1_000_003
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
SPLITS = ("train", "test")


class DataError(HarnessError):
    """A data problem; str() is a single line starting with 'data error: '."""

    kind = "data error"
    exit_code = BAD_INPUT


@dataclass
class Dataset:
    name: str
    train_x: Tensor = field(repr=False)  # uint8 [N, C, H, W]
    train_y: Tensor = field(repr=False)  # int64 [N]
    val_x: Tensor = field(repr=False)
    val_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    in_chans: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    source: str
    classes: tuple[str, ...] = ()
    _digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        """Height of the images (the size that crop padding and Cutout scale with)."""
        return int(self.train_x.shape[-2])

    def digest(self) -> str:
        """sha256 (first 16 hex digits) of every image and label of every split: two runs
        with the same digest saw the same data, split the same way."""
        if self._digest is None:
            h = hashlib.sha256()
            for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
                h.update(memoryview(t.contiguous().numpy()).cast("B"))
            self._digest = h.hexdigest()[:16]
        return self._digest

    def describe(self) -> dict[str, Any]:
        """What result.json and MLflow record about the data."""
        return {"name": self.name, "source": self.source, "digest": self.digest(),
                "n_train": len(self.train_y), "n_val": len(self.val_y), "n_test": len(self.test_y),
                "num_classes": self.num_classes, "image_shape": list(self.train_x.shape[1:])}


# A loader returns the full splits as a dict: train_x, train_y, test_x, test_y,
# classes (list of names), source (str), mean and std (lists of floats).
DatasetLoader = Callable[[DataCfg, Path], dict[str, Any]]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def deco(fn: DatasetLoader) -> DatasetLoader:
        _DATASETS[name] = fn
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def default_cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()


def load_dataset(data_cfg: DataCfg, seed: int, cache_dir: str | Path | None = None) -> Dataset:
    """Load `data_cfg.name` (decoding or reading the cache) and split off validation by `seed`."""
    try:
        loader = _DATASETS[data_cfg.name]
    except KeyError:
        raise DataError(f"unknown dataset {data_cfg.name!r} (known: {', '.join(list_datasets())})") from None
    raw = loader(data_cfg, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    train_idx, val_idx = split_indices(raw["train_y"], data_cfg.val_fraction, seed)
    x, y = raw["train_x"], raw["train_y"]
    return Dataset(
        name=data_cfg.name,
        train_x=x[train_idx], train_y=y[train_idx], val_x=x[val_idx], val_y=y[val_idx],
        test_x=raw["test_x"], test_y=raw["test_y"],
        num_classes=len(raw["classes"]), in_chans=x.shape[1],
        mean=tuple(raw["mean"]), std=tuple(raw["std"]), source=raw["source"],
        classes=tuple(raw["classes"]),
    )


def split_indices(y: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint sorted (train, val) indices of the training labels `y`: val is a seeded,
    class-stratified random subset of round(len(y) * val_fraction) images."""
    n = len(y)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val = stratified_sample(y, n_val, torch.Generator().manual_seed(seed))
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().flatten(), val.sort().values


def stratified_allocation(counts: Sequence[int], n: int, gen: torch.Generator) -> list[int]:
    """Per-class sample sizes that sum to `n`, each within one of its share
    n * count_c / sum(counts) (largest remainder; ties broken at random by `gen`)."""
    counts_t = torch.as_tensor(list(counts), dtype=torch.float64)
    total = float(counts_t.sum())
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} of {int(total)} images")
    quota = counts_t * (n / total)
    take = quota.floor()
    short = n - int(take.sum())
    if short:
        # largest fractional part first; a random key breaks ties (equal class sizes)
        frac = quota - take
        key = frac + torch.rand(len(frac), generator=gen, dtype=torch.float64) * 1e-9
        key[take >= counts_t] = -1.0  # a class with nothing left cannot take more
        take[key.argsort(descending=True)[:short]] += 1
    return [int(v) for v in take]


def stratified_sample(y: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Indices of `n` samples of `y` drawn at random within each class, each class
    getting its share within one image (`stratified_allocation`), in random order."""
    classes = y.unique(sorted=True)
    members = [(y == c).nonzero().flatten() for c in classes.tolist()]
    take = stratified_allocation([len(m) for m in members], n, gen)
    picked = [m[torch.randperm(len(m), generator=gen)[:k]] for m, k in zip(members, take)]
    out = torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)
    return out[torch.randperm(len(out), generator=gen)]


# ---------------------------------------------------------------- caching

def _file_key(paths: Sequence[Path]) -> list[list[Any]]:
    return [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in paths]


def _cached(cache_dir: Path, tag: str, key: Any, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """build() once per key; the result (with channel stats added) is kept on disk."""
    blob = json.dumps([CACHE_VERSION, tag, key], sort_keys=True, default=str).encode()
    path = cache_dir / f"{tag}-{hashlib.sha256(blob).hexdigest()[:16]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated or stale file: rebuild it
            pass
    data = _with_stats(build())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def _with_stats(raw: dict[str, Any]) -> dict[str, Any]:
    mean, std = channel_stats(raw["train_x"])
    return {**raw, "mean": mean, "std": std}


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.double().transpose(0, 1).flatten(1) / 255
        total += part.sum(1)
        total_sq += part.square().sum(1)
    count = x.numel() // x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------- digits

@register_dataset("digits")
def _digits(cfg: DataCfg, cache_dir: Path) -> dict[str, Any]:
    import sklearn

    return _cached(cache_dir, "digits", ["sklearn", sklearn.__version__], _build_digits)


def _build_digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16)).to(torch.uint8)[:, None]
    y = torch.from_numpy(d.target).long()
    test = stratified_holdout(y, 0.2, torch.Generator().manual_seed(DIGITS_TEST_SEED))
    return {"train_x": x[~test], "train_y": y[~test], "test_x": x[test], "test_y": y[test],
            "classes": [str(c) for c in range(10)], "source": "sklearn.datasets.load_digits"}


def stratified_holdout(y: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Boolean mask holding out round(fraction * count) random samples of every class."""
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        mask[idx[: round(fraction * len(idx))]] = True
    return mask


# ---------------------------------------------------------------- synthetic

@register_dataset("synthetic")
def _synthetic(cfg: DataCfg, cache_dir: Path) -> dict[str, Any]:
    s = cfg.synthetic
    protos = _prototypes(s)
    train_x, train_y = _synthetic_split(protos, s.num_train, SYNTHETIC_SEED + 1)
    test_x, test_y = _synthetic_split(protos, s.num_test, SYNTHETIC_SEED + 2)
    raw = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
           "classes": [str(c) for c in range(s.num_classes)], "source": f"synthetic({s.model_dump()})"}
    return _with_stats(raw)


def _prototypes(s: SyntheticCfg) -> Tensor:
    """One smooth random image per class: 4x4 noise upsampled to the image size."""
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    coarse = torch.rand(s.num_classes, s.channels, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(s.size, s.size), mode="bilinear", align_corners=False)


def _synthetic_split(protos: Tensor, n: int, seed: int, noise: float = 0.15) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % len(protos))[torch.randperm(n, generator=gen)]
    x = protos[y] + noise * torch.randn((n, *protos.shape[1:]), generator=gen)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8), y


# ---------------------------------------------------------------- CIFAR (torchvision pickles)

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", names="label_names", labels="labels"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"],
                     meta="meta", names="fine_label_names", labels="fine_labels"),
}


@register_dataset("cifar10")
@register_dataset("cifar100")
def _cifar(cfg: DataCfg, cache_dir: Path) -> dict[str, Any]:
    """torchvision's pickles under data.root (default <cache>/datasets); a root that is an
    archive or has a train/ folder is read as an image folder (the JPEG copy)."""
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir / "datasets"
    if root.is_file() or (root / "train").is_dir():  # a JPEG copy in imagefolder layout
        return _imagefolder_at(root, cache_dir)
    spec = _CIFAR[cfg.name]
    folder = root / spec["folder"]
    files = [folder / f for f in [*spec["train"], *spec["test"], spec["meta"]]]
    if not all(f.is_file() for f in files):
        if not cfg.download:
            raise DataError(f"{cfg.name} files not found in {str(folder)!r}; set data.download: true "
                            f"(or --set data.download=true) on a machine with internet access")
        _download_cifar(cfg.name, root)
    return _cached(cache_dir, cfg.name, _file_key(files), lambda: _read_cifar(folder, spec))


def _download_cifar(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DataError(f"downloading {name} into {str(root)!r} failed: {exc}") from None


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's pickles hold (dicts, lists, strings, numbers and numpy
    arrays): a crafted file in data.root cannot run code (pickle.load would)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
               *(("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray",
                                           "str", "int", "float", "complex", "bool"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    def load(name: str) -> dict[str, Any]:
        with open(folder / name, "rb") as f:
            try:
                return _CifarUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise DataError(f"{folder / name} is not a CIFAR batch ({e})") from None

    def split(names: list[str]) -> tuple[Tensor, Tensor]:
        parts = [load(n) for n in names]
        x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[spec["labels"]] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y).long()

    train_x, train_y = split(spec["train"])
    test_x, test_y = split(spec["test"])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "classes": list(load(spec["meta"])[spec["names"]]), "source": str(folder.resolve())}


# ---------------------------------------------------------------- image folders / archives

@register_dataset("imagefolder")
def _imagefolder(cfg: DataCfg, cache_dir: Path) -> dict[str, Any]:
    if not cfg.root:
        raise DataError("imagefolder needs data.root (a folder or a .tar.gz archive)")
    return _imagefolder_at(Path(cfg.root), cache_dir)


def _imagefolder_at(root: Path, cache_dir: Path) -> dict[str, Any]:
    root = root.expanduser().resolve()
    if not root.exists():
        raise DataError(f"data root {str(root)!r} does not exist")
    if root.is_file():
        return _cached(cache_dir, "imagefolder", _file_key([root]),
                       lambda: _build_imagefolder(_scan_archive(root), str(root)))
    entries = _scan_folder(root)
    files = sorted(p for split in entries.values() for _, p in split)
    return _cached(cache_dir, "imagefolder", [str(root), _file_key(files)],
                   lambda: _build_imagefolder(entries, str(root)))


def _is_image(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _scan_folder(root: Path) -> dict[str, list[tuple[str, Any]]]:
    """{split: [(class, path)]} from root/<split>/<class>/<file>. Symbolic links (files or
    class folders) are skipped, counted: they could reach outside the data root."""
    out: dict[str, list[tuple[str, Any]]] = {}
    links = 0
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        items = []
        for d in sorted((root / split).iterdir()):
            if d.is_symlink():
                links += sum(1 for p in d.iterdir() if _is_image(p.name)) if d.is_dir() else 1
                continue
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if _is_image(p.name):
                    if p.is_symlink() or not p.is_file():
                        links += 1
                    else:
                        items.append((d.name, p))
        out[split] = items
    _warn_skipped(links, str(root))
    return out


def _split_and_class(name: str) -> tuple[str, str] | None:
    """('train', 'cat') for '[top/]train/cat/0001.jpg', None for anything else."""
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    for depth in (0, 1):
        if len(parts) == depth + 3 and parts[depth] in SPLITS:
            return parts[depth], parts[depth + 1]
    return None


def _scan_archive(path: Path) -> dict[str, list[tuple[str, Any]]]:
    """{split: [(class, (member name, bytes))]} read straight from a tar(.gz) archive.
    Links and members whose path leaves its folder (`..`, absolute) are skipped, counted."""
    entries: dict[str, list[tuple[str, Any]]] = {}
    unsafe = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not _is_image(member.name):
                    continue
                if not member.isfile() or not _safe_member(member.name):
                    unsafe += 1
                    continue
                where = _split_and_class(member.name)
                if not where:
                    continue
                data = tar.extractfile(member).read()
                entries.setdefault(where[0], []).append((where[1], (member.name, data)))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read archive {str(path)!r} ({type(exc).__name__}: {exc or 'truncated'}); "
                        "expected a complete .tar or .tar.gz of train/<class>/ and test/<class>/") from None
    _warn_skipped(unsafe, str(path))
    return entries


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


def _warn_skipped(n: int, source: str) -> None:
    if n:
        warnings.warn(f"{source}: skipped {n} image(s) that are links or whose path leaves their folder",
                      stacklevel=3)


def _build_imagefolder(entries: dict[str, list[tuple[str, Any]]], source: str) -> dict[str, Any]:
    if not entries.get("train") or not entries.get("test"):
        raise DataError(f"{source!r} has no images under train/<class>/ and test/<class>/")
    classes = sorted({c for c, _ in entries["train"]})
    unknown = sorted({c for c, _ in entries["test"]} - set(classes))
    if unknown:
        raise DataError(f"{source!r}: test classes {unknown} have no training images")
    label = {c: i for i, c in enumerate(classes)}
    out: dict[str, Any] = {"classes": classes, "source": source}
    for split in SPLITS:
        items = sorted(entries[split], key=lambda e: (e[0], str(_item_name(e[1]))))
        out[f"{split}_x"] = torch.from_numpy(decode_images([p for _, p in items])).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor([label[c] for c, _ in items], dtype=torch.long)
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:
        raise DataError(f"{source!r}: train images are {tuple(out['train_x'].shape[2:])}, "
                        f"test images {tuple(out['test_x'].shape[2:])}")
    return out


def _item_name(item: Any) -> str:
    return item[0] if isinstance(item, tuple) else str(item)


def decode_images(items: Sequence[Any], workers: int | None = None, chunk: int = 1000) -> np.ndarray:
    """Decode image files (paths, or (name, bytes) pairs) to one uint8 array [N, H, W, 3].

    Chunks are decoded by a process pool of `workers` (default os.cpu_count())."""
    workers = workers or os.cpu_count() or 1
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if workers > 1 and len(chunks) > 1:
        with multiprocessing.get_context().Pool(min(workers, len(chunks))) as pool:
            arrays = pool.map(_decode_chunk, chunks)
    else:
        arrays = [_decode_chunk(c) for c in chunks]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images differ in size: {sorted(shapes)}; all must share one size")
    return np.concatenate(arrays)


def _decode_chunk(items: Sequence[Any]) -> np.ndarray:
    from PIL import Image

    images = []
    for item in items:
        source = io.BytesIO(item[1]) if isinstance(item, tuple) else item
        try:
            with Image.open(source) as img:
                images.append(np.asarray(img.convert("RGB")))
        except Exception as exc:
            raise DataError(f"cannot decode image {_item_name(item)}: {exc}") from None
        if images[-1].shape != images[0].shape:
            raise DataError(f"image {_item_name(item)} is {images[-1].shape[:2]}, "
                            f"others are {images[0].shape[:2]}; all must share one size")
    return np.stack(images)


# ---------------------------------------------------------------- augmentation
# Random draws come from an explicit CPU torch.Generator, so a batch is
# augmented identically on any device; sampling and applying are separate
# functions so tests can replay the same draws.

def crop_offsets(n: int, pad: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample (dy, dx) offsets into the padded image, uniform in [0, 2 * pad]."""
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    return offsets[0], offsets[1]


def crop_at(x: Tensor, pad: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Zero-pad by `pad` and cut each image's HxW window at its (dy, dx)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy.to(x.device)[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx.to(x.device)[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    if pad == 0:
        return x
    return crop_at(x, pad, *crop_offsets(len(x), pad, gen))


def flip_mask(n: int, gen: torch.Generator, p: float = 0.5) -> Tensor:
    return torch.rand(n, generator=gen) < p


def flip_where(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror (left-right) the images selected by the boolean `mask`."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    return flip_where(x, flip_mask(len(x), gen))


def cutout_centres(n: int, h: int, w: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    centres = torch.rand(2, n, generator=gen)
    return (centres[0] * h).long(), (centres[1] * w).long()


def cutout_at(x: Tensor, size: int, cy: Tensor, cx: Tensor) -> Tensor:
    """Zero one size x size square per image centred at (cy, cx), clipped at the borders."""
    h, w = x.shape[-2:]
    y0 = (cy.to(x.device) - size // 2)[:, None, None]
    x0 = (cx.to(x.device) - size // 2)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return x.masked_fill(hole[:, None], 0)


def cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    if size == 0:
        return x
    return cutout_at(x, size, *cutout_centres(len(x), *x.shape[-2:], gen))


_AUTOAUGMENT = None


def autoaugment(x: Tensor, gen: torch.Generator) -> Tensor:
    """torchvision's CIFAR-10 AutoAugment policy, drawn independently per image.

    Slow: a Python loop over the batch (roughly 0.1-0.5 ms per 32x32 image on a CPU,
    i.e. seconds per CIFAR epoch); enable it only for full-length runs. torchvision
    draws from torch's global RNG, so it runs inside fork_rng seeded from `gen`:
    deterministic, and the global RNG is left untouched.
    """
    global _AUTOAUGMENT
    if _AUTOAUGMENT is None:
        from torchvision.transforms import v2

        _AUTOAUGMENT = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([_AUTOAUGMENT(img) for img in x])


# ---------------------------------------------------------------- loader

class Loader:
    """Batches from uint8 images kept on `device`, augmented and normalised there.

    Order and augmentation of epoch e depend only on (seed, e), so a resumed run
    replays the same batches. Per batch: crop, flip, autoaugment (uint8), then
    /255 and normalise, then cutout (holes are 0 after normalisation, i.e. the
    mean colour, as in DeVries & Taylor and QCFS).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], augment: AugmentCfg | None = None, shuffle: bool = False,
                 drop_last: bool = False, device: str | torch.device = "cpu", seed: int = 0):
        if x.dtype != torch.uint8:
            raise TypeError(f"Loader expects uint8 images, got {x.dtype}")
        if augment is not None and None in augment.model_dump().values():
            raise ValueError(f"augment {augment} has dataset defaults left unresolved (null); "
                             "pass Config.resolved(image_size).data.augment")
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size, self.augment, self.shuffle = batch_size, augment, shuffle
        self.drop_last, self.seed = drop_last, seed
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size].to(self.device)
            yield self._prepare(self.x[idx], gen), self.y[idx]

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.y), self.batch_size):
            end = start + self.batch_size
            yield self._normalise(self.x[start:end]), self.y[start:end]

    def _prepare(self, x: Tensor, gen: torch.Generator) -> Tensor:
        aug = self.augment
        if aug is None:
            return self._normalise(x)
        x = random_crop(x, aug.crop_pad, gen)
        if aug.flip:
            x = random_flip(x, gen)
        if aug.autoaugment:
            x = autoaugment(x, gen)
        return cutout(self._normalise(x), aug.cutout, gen)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.float() / 255 - self.mean) / self.std


# ---------------------------------------------------------------- calibration split

CALIB_SUBSET_SEED = 7_919  # offset: the calibration subset's draw is independent of the val split's
CALIB_AUGMENT_SEED = 104_729  # offset: augmentation draws of calibration images vs. training batches


@dataclass
class CalibrationSet:
    """The images that delta is estimated on: the validation split, or a seeded,
    class-stratified random subset of it (`noise.calib_samples`), kept as uint8 and
    normalised per batch. Never the test set. With `noise.calib_augment` the images get
    the training augmentation, drawn from (seed, epoch), so every calibrator (local or
    the shared actor) sees the same images for the same epoch; the final calibration
    (epoch None) is never augmented."""

    x: Tensor = field(repr=False)  # uint8 [N, C, H, W]
    y: Tensor = field(repr=False)
    indices: Tensor = field(repr=False)  # positions in the validation split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentCfg | None
    seed: int
    subset: bool  # a stratified subset (True) or the whole validation split

    @classmethod
    def from_dataset(cls, data: Dataset, cfg: Config) -> CalibrationSet:
        n = cfg.noise.calib_samples
        subset = n is not None and n < len(data.val_y)
        if subset:
            gen = torch.Generator().manual_seed(cfg.train.seed + CALIB_SUBSET_SEED)
            idx = stratified_sample(data.val_y, n, gen)
        else:
            idx = torch.arange(len(data.val_y))
        return cls(data.val_x[idx], data.val_y[idx], idx, data.num_classes, data.mean, data.std,
                   cfg.data.augment if cfg.noise.calib_augment else None, cfg.train.seed, subset)

    def __len__(self) -> int:
        return len(self.y)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def describe(self) -> dict[str, Any]:
        """What result.json and MLflow record about the calibration images."""
        return {"split": "val", "n_images": len(self), "class_counts": self.class_counts(),
                "sampling": ("class-stratified random subset of the validation split" if self.subset
                             else "the whole validation split (itself class-stratified)"),
                "augmented": self.augment is not None}

    def batches(self, batch_size: int, epoch: int | None = None,
                device: str | torch.device = "cpu") -> Iterator[Tensor]:
        """Normalised image batches in a fixed order (augmented when configured and epoch
        is not None)."""
        loader = Loader(self.x, self.y, batch_size, mean=self.mean, std=self.std,
                        augment=self.augment if epoch is not None else None, device=device,
                        seed=self.seed + CALIB_AUGMENT_SEED)
        it = loader.epoch_batches(epoch) if (self.augment is not None and epoch is not None) \
            else loader.eval_batches()
        for x, _ in it:
            yield x
