"""Calibration cost against its ideal, and as a share of a training epoch (ResNet-20, tau = 4).

    python benchmarks/calibration.py [--quick] [--threads N]

Calibration is what `run` does after every epoch:
`LocalCalibrator(CalibrationSet.from_dataset(data, cfg)).calibrate(model, tau=4)`, i.e.
`residual_error` on the calibration images. Its ideal is tau + 1 forward passes per
image (one ANN pass and tau SNN steps), each counted as one ANN inference pass over
the same images at the same batch size, measured in the same run: the primary figure
is calibration time / ((tau + 1) * ANN inference time). The unfused reference (the
neurons' own recording, record=True, with phi, zbar and both residuals materialised:
the implementation before the fused statistics) and the floor that this code can reach
(one ANN pass + a plain tau-step SNN simulation, nothing recorded) are measured
alongside. Wall time is primary; process CPU time, which other processes' load does
not inflate as much, is given beside it.

Secondary: the share of a training epoch. No full epoch is trained: the time of a few
training steps at batch 128 (with data loading and augmentation, as in
`harness.train.run`) is measured and extrapolated to the epoch's number of steps.
Everything is measured interleaved.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._common import DEFAULT_REPS, command, main, section, set_threads, table, target

SCRIPT = "calibration.py"
TITLE = "Calibration overhead"
TAU, BATCH, DELTA = 4, 128, 0.1
TARGET_RATIO = 1.3  # calibration / its ideal, (tau + 1) ANN inference passes
CIFAR_EPOCH_STEPS = 45000 // BATCH  # 45,000 training images after the 10% validation split
# calib: calibration splits (None: the whole validation split, val_fraction 0.1); ref: the
# split that the unfused reference also runs on
FULL = dict(steps=10, calib=[None, 2000], ref=2000, eval_batch=512)
QUICK = dict(steps=2, calib=[500], ref=500, eval_batch=500)  # synthetic: 5,000 training images, 500 for validation


def _config(quick: bool, calib_samples: int | None):
    from harness.config import load_config

    from benchmarks.data_pipeline import archive_path

    spec = QUICK if quick else FULL
    over = ["model.arch=resnet20", f"noise.tau={TAU}", "data.val_fraction=0.1", f"data.batch_size={BATCH}",
            f"data.eval_batch_size={spec['eval_batch']}"]
    if quick:
        over += ["data.name=synthetic", "data.synthetic.num_train=5000"]
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
    from harness.calibration import LocalCalibrator, residual_error, set_deltas
    from harness.convert import simulation_chunk
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
    splits = []
    # the images per ANN pass and simulation that calibration uses on this machine
    chunk = simulation_chunk(model, data.train_x[:spec["eval_batch"]].float())
    for cs in spec["calib"]:
        c = _config(quick, cs).resolved(data.image_size)
        cset = CalibrationSet.from_dataset(data, c)
        cal = LocalCalibrator(cset, c.data.eval_batch_size)
        n_images = len(cset)
        label = (f"calib_samples {cs} (class-stratified, {n_images:,} images)" if cset.subset
                 else f"val_fraction 0.1 (whole validation split, {n_images:,} images)")
        key = f"{cs}"
        splits.append((key, label, cs))

        def ann_pass(cset=cset, bs=c.data.eval_batch_size):
            model.eval()
            with torch.no_grad():
                for x in cset.batches(bs, 1):
                    model(x)

        def ann_chunked(cset=cset, bs=c.data.eval_batch_size):
            model.eval()
            with torch.no_grad():
                for x in cset.batches(bs, 1):
                    for xc in x.split(chunk):
                        model(xc)

        fns[f"ann {key}"] = ann_pass
        fns[f"annchunk {key}"] = ann_chunked
        fns[f"calib {key}"] = (lambda cal=cal: cal.calibrate(model, tau=TAU, epoch=1))  # per-epoch: no histograms
        if cs == spec["ref"]:
            fns[f"nochunk {key}"] = (lambda cset=cset, bs=c.data.eval_batch_size:
                                     residual_error(model, cset.batches(bs, 1), TAU, histograms=False, chunk=bs))
            fns[f"ref {key}"] = (lambda cset=cset, bs=c.data.eval_batch_size:
                                 unfused_reference(model, cset.batches(bs, 1), TAU))
            fns[f"sim {key}"] = (lambda cset=cset, bs=c.data.eval_batch_size:
                                 plain_simulation(model, cset.batches(bs, 1), TAU, chunk))
    # the fused statistics against the unfused reference, once, before timing
    c = _config(quick, spec["ref"]).resolved(data.image_size)
    cset = CalibrationSet.from_dataset(data, c)
    fused = LocalCalibrator(cset, c.data.eval_batch_size).calibrate(model, tau=TAU, epoch=1).std
    ref = unfused_reference(model, cset.batches(c.data.eval_batch_size, 1), TAU)
    diff = {r: max(abs(a - b) for a, b in zip(fused[r], ref[r])) for r in ref}
    setup_s = time.perf_counter() - t0
    med, cpu = interleaved_wall_cpu(fns, reps)
    step_s = med["train"] / spec["steps"]
    n_steps = CIFAR_EPOCH_STEPS
    epoch_s = step_s * n_steps
    rows, ann_notes = [], []
    for key, label, cs in splits:
        # the ideal counts the faster ANN pass: at the eval batch or in calibration's chunks
        best = min(("ann", "annchunk"), key=lambda a: med[f"{a} {key}"])
        ideal = (TAU + 1) * med[f"{best} {key}"]
        ideal_cpu = (TAU + 1) * cpu[f"{best} {key}"]
        ann_notes.append(f"{label.split(' (')[0]}: {med[f'ann {key}']:.3f} s at batch {spec['eval_batch']}, "
                         f"{med[f'annchunk {key}']:.3f} s in chunks of {chunk}")
        for what, name in (("calib", f"fused (harness; chunks of {chunk} images)"),
                           ("nochunk", f"fused, unchunked (one chunk per eval batch of {spec['eval_batch']})"),
                           ("ref", "unfused reference (before the fused statistics)"),
                           ("sim", f"floor here: ANN pass + plain SNN simulation (chunks of {chunk})")):
            if f"{what} {key}" not in fns:
                continue
            t, c = med[f"{what} {key}"], cpu[f"{what} {key}"]
            if what == "sim":  # the simulation alone; the floor adds the ANN pass
                t, c = t + med[f"{best} {key}"], c + cpu[f"{best} {key}"]
            r = t / ideal
            rows.append([label, name, t, ideal, f"{r:.2f}×", f"{c / ideal_cpu:.2f}×",
                         target(r <= TARGET_RATIO) if what == "calib" else "",
                         f"{100 * t / epoch_s:.2f}%", f"{100 * ideal / epoch_s:.2f}%"])
    src = ("synthetic 32×32 data (quick mode: 5,000 training images, 10% validation)" if quick
           else f"CIFAR-10 from `{cfg.data.root}` ({len(data.train_y):,} training images, epoch = "
                f"{epoch_steps} steps)")
    body = (f"ResNet-20 (NQ, δ = {DELTA} in every layer while training), τ = {TAU}, {src}, eval batch "
            f"{spec['eval_batch']}. Calibration: `LocalCalibrator.calibrate` (ANN pass + SNN simulation at "
            f"τ = {TAU}, both residual definitions; no histograms, as every epoch but the last), which on CPU "
            f"runs each batch in chunks of {chunk} images (`harness.convert.simulation_chunk`: a layer's "
            f"largest tensor ≈ 8 MiB, so a step's tensors stay in the cache). "
            f"**Ideal** = (τ + 1) × one ANN inference pass over the same images (`model.eval()`, no grad), "
            f"measured in this run at the eval batch and in the same chunks, whichever is faster "
            f"({'; '.join(ann_notes)}); the ratio to it is the primary figure "
            f"(target ≤ {TARGET_RATIO}×); the same ratio of process CPU time (all threads; robust to other "
            "processes' load, which slows wall time) is given beside it. 'unfused reference': the neurons' own "
            "recording (`record=True`) with φ, z̄ and both residuals materialised, the implementation before "
            "the fused statistics. 'floor here': one ANN pass plus a τ-step SNN simulation without any "
            "recording or statistics (`SpikingNet.simulate`, unchanged by calibration), i.e. what calibration "
            "costs with free statistics: it is above the ideal by as much as an SNN step costs more than an "
            "ANN pass. "
            f"Training: median time of {spec['steps']} step(s) at batch {BATCH} (augmented batch from the "
            f"harness Loader + forward + backward + SGD) = {step_s * 1e3:.1f} ms/step, extrapolated to a "
            f"CIFAR-10 epoch of 45,000/{BATCH} = {n_steps} steps = **{epoch_s:.1f} s** (an extrapolation, "
            f"not a trained epoch); the share of it is secondary. Medians of {reps} interleaved repetitions "
            f"after one warm-up (untimed set-up {setup_s:.0f} s). Largest difference of a layer's δ (residual std) "
            f"between fused and unfused reference, before timing: end_to_end {diff['end_to_end']:.1e}, "
            f"layer_local {diff['layer_local']:.1e}.\n\n"
            + table(["calibration split", "implementation", "wall s", "ideal s ((τ+1) × ANN)",
                     "ratio to ideal", "CPU-time ratio", f"target ≤ {TARGET_RATIO}×", "% of epoch",
                     "ideal % of epoch"], rows))
    return section(TITLE, cmd, body)


def interleaved_wall_cpu(fns: dict, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """`_common.interleaved` that also takes each call's process CPU time (all threads):
    (median wall s, median CPU s) per callable."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    wall: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def plain_simulation(model, batches, tau: int, chunk: int | None = None) -> None:
    """Convert and simulate tau steps (in chunks of `chunk` images), nothing recorded:
    calibration's floor in this code."""
    from harness.convert import to_snn

    was_training = model.training
    model.eval()
    snn = to_snn(model)
    try:
        with torch.no_grad():
            for x in batches:
                for xc in x.split(chunk or len(x)):
                    snn.simulate(xc, tau)
    finally:
        model.train(was_training)


def unfused_reference(model, batches, tau: int) -> dict:
    """The statistics as computed before the fused reduction: the neurons' own recording
    (record=True: summed input and output), phi, zbar and both residuals materialised,
    per-batch sums in the residual's dtype accumulated in float64. Returns per-layer std."""
    from harness.convert import activation_layers, to_snn
    from harness.neurons import qcfs

    was_training = model.training
    model.eval()
    acts = activation_layers(model)
    snn = to_snn(model)
    outs: list = []
    hooks = [a.register_forward_hook(lambda m, i, o: outs.append(o)) for _, a in acts]
    sums = {r: [[0.0, 0.0, 0] for _ in acts] for r in ("end_to_end", "layer_local")}
    try:
        with torch.no_grad():
            for x in batches:
                outs.clear()
                model(x)
                snn.simulate(x, tau, record=True)
                for l, ((_, a), n) in enumerate(zip(acts, snn.neurons)):
                    phi = n.sum_out / tau
                    zbar = n.sum_in.div_(tau)
                    lam = a.lam.detach().to(phi.dtype)
                    for r, g in (("layer_local", qcfs(zbar, lam, a.L).neg_().add_(phi)),
                                 ("end_to_end", phi.sub_(outs[l]))):
                        acc = sums[r][l]
                        acc[0] += float(g.sum().double())
                        acc[1] += float(torch.linalg.vector_norm(g).double().square())
                        acc[2] += g.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {r: [max(ss / n - (s / n) ** 2, 0.0) ** 0.5 for s, ss, n in v] for r, v in sums.items()}


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
