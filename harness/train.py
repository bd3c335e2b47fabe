"""One trial of NQ / QCFS training: train, calibrate delta, evaluate, select, resume.

    for epoch in 1..E:
        train one epoch with the current deltas (epoch 1: delta = 0)
        calibrate: residual stats of ANN vs SNN(tau) on the calibration split
        layerwise: delta_l <- scale * std_l          fixed: delta_l = delta   qcfs: 0
        evaluate ANN (val, test) and SNN(select_T) on `select_on`; keep the best SNN
        write the checkpoint atomically
    evaluate the best checkpoint on test at every T with one simulation
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .calibration import Calibrator, LocalCalibrator, ResidualStats, get_deltas, set_deltas
from .config import Config
from .convert import activation_layers, to_snn
from .data import Dataset, Loader, load_dataset
from .models import create_model

__all__ = ["run", "TrainingError", "CheckpointError", "evaluate_ann", "evaluate_snn",
           "count_macs", "make_calibrator", "read_checkpoint_extra", "CKPT", "BEST"]

CKPT, BEST = "checkpoint.pt", "best.pt"


class TrainingError(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_ann(model, batches: Iterable) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def evaluate_snn(model, batches: Iterable, T: int) -> list[float]:
    """SNN accuracy (%) for every T' = 1..T from one simulation per batch."""
    snn = to_snn(model)
    correct = torch.zeros(T, dtype=torch.int64)
    total = 0
    for x, y in batches:
        out = snn.simulate(x, T)
        correct += (out.argmax(-1) == y.unsqueeze(0)).sum(1).cpu()
        total += len(y)
    return (100.0 * correct.double() / max(total, 1)).tolist()


def count_macs(model, input_shape) -> int:
    """Multiply-accumulates of one ANN inference (conv and linear layers)."""
    macs = 0

    def hook(m, i, o):
        nonlocal macs
        if isinstance(m, torch.nn.Conv2d):
            macs += o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            macs += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    model.train(was)
    for h in hs:
        h.remove()
    return int(macs)


# ---------------------------------------------------------------------------- checkpoints

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'corrupted'}); "
                              "delete it to start over") from None


def read_checkpoint_extra(out_dir: str | Path) -> dict:
    """The `extra` dict stored with a trial's checkpoint ({} when there is none)."""
    p = Path(out_dir) / CKPT
    return dict(_load(p).get("extra", {})) if p.exists() else {}


# ---------------------------------------------------------------------------- the run

@dataclass
class _Setup:
    data: Dataset
    train: Loader
    val: Loader
    test: Loader
    device: torch.device


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def calibration_images(data: Dataset, cfg: Config) -> torch.Tensor:
    """The calibration split, normalised, never augmented: the validation split
    (its first `calib_samples` images; the split is already a random subset)."""
    x = data.val_x if cfg.noise.calib_samples is None else data.val_x[: cfg.noise.calib_samples]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def make_calibrator(cfg: Config, data: Dataset | None = None, device="cpu") -> LocalCalibrator:
    data = data or load_dataset(cfg.data, cfg.train.seed)
    return LocalCalibrator(calibration_images(data, cfg).to(device), cfg.data.eval_batch_size)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, out_dir: str | Path, *, calibrator: Calibrator | None = None,
        callbacks: Iterable[Callable[[dict, Path], None]] = (), extra: dict | None = None,
        progress: bool = True, trial_id: str | None = None) -> dict:
    """Train one trial into `out_dir`, resuming from its checkpoint if there is one.
    `callbacks(record, out_dir)` run after each epoch's checkpoint is written.
    `extra` is stored in the checkpoint (e.g. an MLflow run id). Returns result.json."""
    out = Path(out_dir).absolute()
    t_cfg = cfg.train
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    device = _device(cfg)
    if device.type == "cpu" and (t_cfg.amp or t_cfg.channels_last):
        _say("notice: train.amp / train.channels_last only apply on CUDA; ignored on CPU")
    use_amp = device.type == "cuda" and t_cfg.amp
    mem_fmt = torch.channels_last if device.type == "cuda" and t_cfg.channels_last else torch.contiguous_format

    data = load_dataset(cfg.data, t_cfg.seed)
    loaders = dict(
        train=Loader(data.train_x, data.train_y, cfg.data.batch_size, mean=data.mean, std=data.std,
                     augment=cfg.data.augment, shuffle=True, drop_last=True, device=device, seed=t_cfg.seed),
        val=Loader(data.val_x, data.val_y, cfg.data.eval_batch_size, mean=data.mean, std=data.std, device=device),
        test=Loader(data.test_x, data.test_y, cfg.data.eval_batch_size, mean=data.mean, std=data.std, device=device),
    )
    if len(loaders["train"]) == 0:
        raise TrainingError(f"data.batch_size = {cfg.data.batch_size} exceeds the {loaders['train'].num_samples} "
                            "training images")
    if calibrator is None:
        calibrator = make_calibrator(cfg, data, device)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    torch.manual_seed(t_cfg.seed)
    model = create_model(cfg.model.arch, num_classes=data.num_classes, L=cfg.model.L,
                         lam_init=cfg.model.lam_init, in_chans=data.in_chans).to(device, memory_format=mem_fmt)
    lam_params = [a.lam for _, a in activation_layers(model)]
    lam_ids = {id(p) for p in lam_params}
    others = [p for p in model.parameters() if id(p) not in lam_ids]
    wd = t_cfg.weight_decay
    opt = torch.optim.SGD([{"params": others, "weight_decay": wd},
                           {"params": lam_params, "weight_decay": wd if t_cfg.lam_weight_decay else 0.0}],
                          lr=cfg.lr, momentum=t_cfg.momentum, nesterov=t_cfg.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    steps_per_epoch = len(loaders["train"])
    total_steps = t_cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # cosine over all steps
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    state = dict(epoch=0, step=0, history=[], best_acc=-1.0, best_epoch=0, deltas=[0.0] * len(lam_params))
    ckpt_path, best_path = out / CKPT, out / BEST
    extra = dict(extra or {})
    if ckpt_path.exists():
        ck = _load(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        state = ck["state"]
        extra = {**ck.get("extra", {}), **extra}
        torch.set_rng_state(ck["rng"]["cpu"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        if progress:
            _say(f"resumed from {ckpt_path} after epoch {state['epoch']}")

    layers = [n for n, _ in activation_layers(model)]
    select_key = f"snn_{cfg.eval.select_on}_acc_T{cfg.eval.select_T}"
    for epoch in range(state["epoch"] + 1, t_cfg.epochs + 1):
        # 1. train with the current deltas
        mode = cfg.noise.mode
        set_deltas(model, state["deltas"] if mode == "layerwise" else
                   (cfg.noise.delta if mode == "fixed" else 0.0))
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        batches = loaders["train"].epoch_batches(epoch)
        bar = _progress(batches, steps_per_epoch, f"epoch {epoch}/{t_cfg.epochs}", progress)
        for i, (x, y) in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"])
            x = x.contiguous(memory_format=mem_fmt)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=t_cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss at epoch {epoch}, step {i + 1}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state["step"] += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_s = time.perf_counter() - t0

        # 2. calibrate (every mode records the residual; layerwise sets delta from it)
        t1 = time.perf_counter()
        stats = calibrator.calibrate(model, tau=cfg.noise.tau, trial_id=trial_id, epoch=epoch)
        calib_s = time.perf_counter() - t1
        if mode == "layerwise":
            state["deltas"] = stats.delta(cfg.noise.residual, cfg.noise.scale)
        set_deltas(model, state["deltas"] if mode == "layerwise" else
                   (cfg.noise.delta if mode == "fixed" else 0.0))

        # 3. evaluate and select
        rec = dict(epoch=epoch, train_loss=loss_sum.item() / seen, train_acc=100.0 * correct.item() / seen,
                   lr=lr_at(state["step"] - 1), delta=get_deltas(model),
                   residual_mean=stats.mean[cfg.noise.residual], residual_std=stats.std[cfg.noise.residual],
                   residual_mean_e2e=stats.mean["end_to_end"], residual_std_e2e=stats.std["end_to_end"],
                   residual_mean_local=stats.mean["layer_local"], residual_std_local=stats.std["layer_local"],
                   calib_s=calib_s, train_s=train_s)
        if epoch % cfg.eval.every == 0 or epoch == t_cfg.epochs:
            t2 = time.perf_counter()
            rec["ann_val_acc"] = evaluate_ann(model, loaders["val"].eval_batches())
            rec["ann_test_acc"] = evaluate_ann(model, loaders["test"].eval_batches())
            sel = evaluate_snn(model, loaders[cfg.eval.select_on].eval_batches(), cfg.eval.select_T)
            rec[select_key] = rec["snn_sel_acc"] = sel[-1]
            rec["eval_s"] = time.perf_counter() - t2
            if sel[-1] > state["best_acc"]:
                state["best_acc"], state["best_epoch"] = sel[-1], epoch
                _atomic_save({"model": model.state_dict(), "epoch": epoch}, best_path)
        rec["epoch_s"] = time.perf_counter() - t0
        state["history"].append(rec)
        state["epoch"] = epoch
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scaler": scaler.state_dict(), "state": state, "extra": extra,
                      "rng": {"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}},
                     ckpt_path)
        if progress:
            _say(_summary(rec, cfg, stats))
        if os.environ.get("HARNESS_TEST_DIE_AFTER_EPOCH") == str(epoch):
            os._exit(137)  # test hook: simulate a kill right after a checkpoint
        for cb in callbacks:
            cb(rec, out)

    return _finish(cfg, model, data, loaders, state, out, calibrator, layers, trial_id)


def _finish(cfg, model, data, loaders, state, out: Path, calibrator, layers, trial_id) -> dict:
    ck = _load(out / BEST)
    model.load_state_dict(ck["model"])
    T_max = max(cfg.eval.T)
    accs = evaluate_snn(model, loaders["test"].eval_batches(), T_max)
    best_rec = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    final_stats = calibrator.calibrate(model, tau=cfg.noise.tau, trial_id=trial_id, epoch=None)
    result = dict(
        method=cfg.method, config=cfg.to_dict(), data_source=data.source,
        ann_test_acc=best_rec["ann_test_acc"], ann_val_acc=best_rec["ann_val_acc"],
        snn_test_acc={str(t): accs[t - 1] for t in cfg.eval.T},
        best_epoch=state["best_epoch"], selected_on=cfg.eval.select_on, select_T=cfg.eval.select_T,
        layers=layers, deltas=get_deltas(model),
        macs=count_macs(model, tuple(data.test_x.shape[1:])),
        history=state["history"],
    )
    hist = dict(layers=final_stats.layers, lam=final_stats.lam, edges=final_stats.hist_edges,
                edges_unit="residual / lambda", counts=final_stats.hist[cfg.noise.residual],
                counts_by_residual=final_stats.hist, mean=final_stats.mean[cfg.noise.residual],
                std=final_stats.std[cfg.noise.residual], residual=cfg.noise.residual,
                tau=cfg.noise.tau, n_images=final_stats.n_images)
    _write_json(out / "result.json", result)
    _write_json(out / "residual_hist.json", hist)
    return result


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _summary(rec: dict, cfg: Config, stats: ResidualStats) -> str:
    s = (f"epoch {rec['epoch']}/{cfg.train.epochs}  loss {rec['train_loss']:.4f}  "
         f"lr {rec['lr']:.4g}")
    if "ann_val_acc" in rec:
        s += (f"  ann val {rec['ann_val_acc']:.2f} test {rec['ann_test_acc']:.2f}  "
              f"snn {cfg.eval.select_on} T={cfg.eval.select_T} {rec['snn_sel_acc']:.2f}")
    d = rec["delta"]
    s += f"  delta mean {sum(d) / len(d):.4f}  {rec['epoch_s']:.1f}s (calib {rec['calib_s']:.1f}s)"
    return s


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
