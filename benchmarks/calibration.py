"""Calibration cost as a share of a training epoch (ResNet-20, CIFAR-10, tau = 4).

    python benchmarks/calibration.py [--quick] [--threads N]

No full epoch is trained: the time of a few training steps at batch 128 (with data
loading and augmentation, as in `harness.train.run`) is measured and extrapolated to
the epoch's number of steps. Calibration is what `run` does after every epoch:
`LocalCalibrator(CalibrationSet.from_dataset(data, cfg)).calibrate(model, tau=4)`, i.e.
`residual_error` on the calibration images. Both are measured interleaved.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._common import DEFAULT_REPS, command, interleaved, main, section, set_threads, table, target

SCRIPT = "calibration.py"
TITLE = "Calibration overhead"
TAU, BATCH, DELTA = 4, 128, 0.1
TARGET_PCT = 5.0
CIFAR_EPOCH_STEPS = 45000 // BATCH  # 45,000 training images after the 10% validation split
FULL = dict(steps=10, calib=[None, 2000])   # None: the whole validation split (val_fraction 0.1)
QUICK = dict(steps=2, calib=[200])         # synthetic: 2,000 training images, 200 for validation


def _config(quick: bool, calib_samples: int | None):
    from harness.config import load_config

    from benchmarks.data_pipeline import archive_path

    over = ["model.arch=resnet20", f"noise.tau={TAU}", "data.val_fraction=0.1", f"data.batch_size={BATCH}"]
    if quick:
        over += ["data.name=synthetic"]
    else:
        archive = archive_path()
        if archive is None:
            return None
        over += ["data.name=imagefolder", f"data.root={archive}"]
    if calib_samples is not None:
        over.append(f"noise.calib_samples={calib_samples}")
    return load_config(None, over)


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    import harness
    from harness.calibration import LocalCalibrator, set_deltas
    from harness.data import CalibrationSet, Loader, load_dataset

    set_threads(threads)
    spec = QUICK if quick else FULL
    cmd = command(SCRIPT, quick, threads)
    cfg = _config(quick, None)
    if cfg is None:
        return section(TITLE, cmd, "Skipped: the CIFAR-10 JPEG archive (`../shared/data/cifar10-jpeg.tar.gz`, "
                       "or `$HARNESS_CIFAR10_JPEG`) is not on this machine.")
    t0 = time.perf_counter()
    data = load_dataset(cfg.data, cfg.train.seed)
    cfg = cfg.resolved(data.image_size)
    torch.manual_seed(0)
    model = harness.create_model("resnet20", num_classes=data.num_classes, L=cfg.model.L,
                                 lam_init=cfg.model.lam_init, in_chans=data.in_chans)
    set_deltas(model, DELTA)  # epochs after the first train with noise
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = Loader(data.train_x, data.train_y, BATCH, mean=data.mean, std=data.std, augment=cfg.data.augment,
                    shuffle=True, drop_last=True, seed=0)
    epoch_steps = len(loader)
    batches = iter(())
    epoch = [0]

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            epoch[0] += 1
            batches = loader.epoch_batches(epoch[0])
            return next(batches)

    def train_steps():
        model.train()
        for _ in range(spec["steps"]):
            x, y = next_batch()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    fns = {"train": train_steps}
    labels = {}
    for cs in spec["calib"]:
        c = _config(quick, cs).resolved(data.image_size)
        cal = LocalCalibrator(CalibrationSet.from_dataset(data, c), c.data.eval_batch_size)
        key = f"calib {cs}"
        n_images = len(cal.calib_set)
        labels[key] = (f"val_fraction 0.1 (whole validation split, {n_images:,} images)" if cs is None
                       else f"calib_samples {cs} (class-stratified, {n_images:,} images)", cs)
        fns[key] = (lambda cal=cal: cal.calibrate(model, tau=TAU, epoch=1))  # per-epoch: no histograms
    setup_s = time.perf_counter() - t0
    med = interleaved(fns, reps)
    step_s = med["train"] / spec["steps"]
    n_steps = CIFAR_EPOCH_STEPS
    epoch_s = step_s * n_steps
    rows = []
    for key, (label, cs) in labels.items():
        pct = 100 * med[key] / epoch_s
        rows.append([label, med[key], f"{pct:.2f}%",
                     target(pct <= TARGET_PCT) if cs is not None else ""])
    src = ("synthetic 32×32 data (quick mode: 2,000 training images, 10% validation)" if quick
           else f"CIFAR-10 from `{cfg.data.root}` ({len(data.train_y):,} training images, epoch = "
                f"{epoch_steps} steps)")
    body = (f"ResNet-20 (NQ, δ = {DELTA} in every layer while training), τ = {TAU}, {src}. "
            f"Training: median time of {spec['steps']} step(s) at batch {BATCH} (augmented batch from the "
            f"harness Loader + forward + backward + SGD) = {step_s * 1e3:.1f} ms/step, extrapolated to a "
            f"CIFAR-10 epoch of 45,000/{BATCH} = {n_steps} steps = **{epoch_s:.1f} s** (an extrapolation, "
            "not a trained epoch). Calibration: `LocalCalibrator.calibrate` (ANN pass + SNN simulation "
            f"with recording at τ = {TAU}, both residual definitions; no histograms, as every epoch but the last), eval batch "
            f"{cfg.data.eval_batch_size}. Medians of {reps} interleaved repetitions after one warm-up "
            f"(untimed set-up {setup_s:.0f} s).\n\n"
            + table(["calibration split", "calibration s", "% of epoch", f"target ≤ {TARGET_PCT:.0f}%"], rows))
    return section(TITLE, cmd, body)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
