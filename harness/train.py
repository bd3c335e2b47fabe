"""One trial of NQ / QCFS training: train, calibrate delta, evaluate, select, resume.

    trial = build(cfg, out)                         data, resolved config, model, optimiser
    state = resume(trial)                           the checkpoint's state, or a fresh one
    for epoch in state.epoch+1 .. E:
        rec = train_epoch(trial, state, epoch)      with delta_trained = state.delta_next
                                                    (epoch 1: delta = 0)
        calibrate(trial, state, rec)                residual of ANN vs SNN(tau) on the
                                                    calibration set -> delta_next
                                                    (layerwise: scale * std_l; fixed: delta; qcfs: 0)
        evaluate(trial, state, rec)                 ANN (val, test), SNN(T <= select_T) on select_on
        select_and_save(trial, state, rec)          keep the best SNN; atomic checkpoint
    finish(trial, state)                            best checkpoint on test at every T, one simulation

`delta_trained` is the noise the weights of an epoch were trained with (what `best.pt`'s
buffers hold); `delta_next` is the one calibrated after it, which the next epoch uses.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .calibration import Calibrator, LocalCalibrator, ResidualStats, get_deltas, set_deltas
from .config import Config, ConfigError
from .convert import activation_layers, observe_conversions, simulation_chunk, to_snn
from .data import CalibrationSet, Dataset, Loader, load_dataset
from .energy import EnergyRecorder
from .errors import BAD_INPUT, HarnessError
from .io import atomic_torch_save, atomic_write_json
from .models import create_model

__all__ = ["run", "TrainingError", "CheckpointError", "RunDirError", "TrialState", "evaluate_ann",
           "evaluate_snn", "count_macs", "cosine_lr", "read_checkpoint_extra", "CKPT", "BEST"]

CKPT, BEST = "checkpoint.pt", "best.pt"
LOCK_FILE, PID_FILE = ".harness.lock", ".harness.pid"
CKPT_FORMAT = 2
# keys whose change does not make a resumed run a different run (more epochs extend it)
RESUMABLE_CHANGES = ("train.epochs", "train.threads")
NOISY_EVAL_SEED = 2_718  # the noisy-ANN evaluation draws its noise from its own seeded stream


class TrainingError(HarnessError):
    kind = "training error"


class CheckpointError(HarnessError):
    kind = "checkpoint error"
    exit_code = BAD_INPUT


class RunDirError(HarnessError):
    """The --out folder is in use or holds a different run."""
    kind = "run directory error"
    exit_code = BAD_INPUT


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_ann(model, batches: Iterable, noisy: bool = False, seed: int = NOISY_EVAL_SEED) -> float:
    """ANN accuracy (%). BN in eval mode; `noisy=True` keeps the NQ noise on (delta from the
    buffers), as the official NQ code measures its ANN, with noise from its own seed."""
    was = model.training
    model.eval()
    acts = [a for _, a in activation_layers(model)]
    if noisy:
        for a in acts:
            a.train()
    correct = total = 0
    with torch.random.fork_rng(devices=[]):  # never disturb the training RNG stream
        torch.manual_seed(seed)
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def evaluate_snn(model, batches: Iterable, T: int) -> list[float]:
    """SNN accuracy (%) for every T' = 1..T from one simulation per batch (per cache-sized
    chunk of it on CPU: `convert.simulation_chunk`)."""
    snn = to_snn(model)
    correct = torch.zeros(T, dtype=torch.int64)
    total, chunk = 0, None
    for x, y in batches:
        chunk = chunk or simulation_chunk(model, x)
        for xc, yc in zip(x.split(chunk), y.split(chunk)):
            out = snn.simulate(xc, T)
            correct += (out.argmax(-1) == yc.unsqueeze(0)).sum(1).cpu()
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


def cosine_lr(base: float, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step `step` (0-based): cosine from `base` to 0."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total_steps))


# ---------------------------------------------------------------------------- checkpoints

def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'corrupted'}); "
                              "delete it to start over") from None


def read_checkpoint_extra(out_dir: str | Path) -> dict:
    """The `extra` dict stored with a trial's checkpoint ({} when there is none)."""
    p = Path(out_dir) / CKPT
    return dict(_load(p).get("extra", {})) if p.exists() else {}


@contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Exclusive use of a run directory by this process; a second process fails at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            pid = (out / PID_FILE).read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise RunDirError(f"--out {out} is in use by another harness process (pid {pid}); "
                          "wait for it to finish or choose another --out") from None
    try:
        (out / PID_FILE).write_text(str(os.getpid()))
        yield
    finally:
        (out / PID_FILE).unlink(missing_ok=True)
        lock.release()


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = Config.from_dict(old).flat(), Config.from_dict(new).flat()
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# ---------------------------------------------------------------------------- the trial

@dataclass
class TrialState:
    """What a checkpoint carries between epochs (besides weights and optimiser)."""
    epoch: int = 0                     # last completed epoch
    step: int = 0                      # optimiser steps taken
    best_acc: float = -1.0             # best SNN accuracy at select_T on select_on
    best_epoch: int = 0
    delta_next: list[float] = field(default_factory=list)  # the delta the next epoch trains with
    history: list[dict] = field(default_factory=list)      # one record per epoch
    extended_from: int | None = None   # train.epochs before a resume raised it


@dataclass
class Trial:
    """Everything built once per trial (nothing here changes between epochs)."""
    cfg: Config                        # resolved: no null defaults left
    out: Path
    device: torch.device
    data: Dataset
    loaders: dict[str, Loader]
    calib_set: CalibrationSet
    calibrator: Calibrator
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    mem_fmt: torch.memory_format
    layers: list[str]
    defaults_resolved: dict            # config keys left null, with the values they resolved to
    progress: bool = True
    trial_id: str | None = None

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * len(self.loaders["train"])

    def fixed_delta(self) -> list[float]:
        """The delta of the non-adaptive modes (fixed: noise.delta everywhere; qcfs: 0)."""
        d = self.cfg.noise.delta if self.cfg.noise.mode == "fixed" else 0.0
        return [d] * len(self.layers)


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' (expected auto or cpu: torch finds no CUDA device here)")
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_out_dir(out: Path) -> None:
    """`out` must be a folder, or creatable as one, before anything is loaded or written."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file (expected a folder, existing or new)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"--out {out} cannot be created: {parent} is a file (expected a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {out} cannot be created: {parent} is not writable")


def build(cfg: Config, out_dir: str | Path, calibrator: Calibrator | None = None,
          progress: bool = True, trial_id: str | None = None) -> Trial:
    """Load the data, resolve the config's dataset defaults and build model and optimiser.
    Writes nothing."""
    t_cfg = cfg.train
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    device = _device(cfg)
    if device.type == "cpu" and (t_cfg.amp or t_cfg.channels_last):
        _say("notice: train.amp / train.channels_last only apply on CUDA; ignored on CPU")
    data = load_dataset(cfg.data, t_cfg.seed)
    auto = cfg.auto_keys()
    cfg = cfg.resolved(data.image_size)
    norm = dict(mean=data.mean, std=data.std, device=device)
    loaders = dict(
        train=Loader(data.train_x, data.train_y, cfg.data.batch_size, augment=cfg.data.augment,
                     shuffle=True, drop_last=True, seed=t_cfg.seed, **norm),
        val=Loader(data.val_x, data.val_y, cfg.data.eval_batch_size, **norm),
        test=Loader(data.test_x, data.test_y, cfg.data.eval_batch_size, **norm),
    )
    if len(loaders["train"]) == 0:
        raise TrainingError(f"data.batch_size = {cfg.data.batch_size} exceeds the "
                            f"{loaders['train'].num_samples} training images", exit_code=BAD_INPUT)
    calib_set = CalibrationSet.from_dataset(data, cfg)
    calibrator = calibrator or LocalCalibrator(calib_set, cfg.data.eval_batch_size)

    use_amp = device.type == "cuda" and t_cfg.amp
    mem_fmt = torch.channels_last if device.type == "cuda" and t_cfg.channels_last else torch.contiguous_format
    torch.manual_seed(t_cfg.seed)
    model = create_model(cfg.model.arch, num_classes=data.num_classes, in_chans=data.in_chans, L=cfg.model.L,
                         lam_init=cfg.model.lam_init, grad=cfg.model.grad,
                         cifar_stem=cfg.model.cifar_stem).to(device, memory_format=mem_fmt)
    # timm metadata of the input this model is trained on (to_snn traces with it; NIR export records it)
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "num_classes": data.num_classes,
                            "input_size": tuple(data.test_x.shape[1:]), "mean": tuple(data.mean), "std": tuple(data.std)}
    acts = activation_layers(model)
    lam_ids = {id(a.lam) for _, a in acts}
    wd = t_cfg.weight_decay
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in lam_ids], "weight_decay": wd},
                           {"params": [a.lam for _, a in acts],
                            "weight_decay": wd if t_cfg.lam_weight_decay else 0.0}],
                          lr=cfg.lr, momentum=t_cfg.momentum, nesterov=t_cfg.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    flat = cfg.flat()
    return Trial(cfg, Path(out_dir).absolute(), device, data, loaders, calib_set, calibrator, model, opt,
                 scaler, use_amp, mem_fmt, [n for n, _ in acts], {k: flat[k] for k in auto}, progress, trial_id)


def resume(trial: Trial, extra: dict) -> TrialState:
    """The state after the last checkpointed epoch (model, optimiser and RNG restored), or
    a fresh state. Refuses a checkpoint of a different run. Updates `extra` in place."""
    path = trial.out / CKPT
    if not path.exists():
        return TrialState(delta_next=[0.0] * len(trial.layers))
    ck = _load(path)
    if ck.get("format") != CKPT_FORMAT or "config" not in ck:
        raise CheckpointError(f"{path} was written by another version of the harness (checkpoint format "
                              f"{ck.get('format', 1)}, expected {CKPT_FORMAT}); delete it or choose another --out")
    new = trial.cfg.to_dict()
    changed = config_changes(ck["config"], new)
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    state = TrialState(**ck["state"])
    if refused:
        raise RunDirError(f"{trial.out} holds a run with a different config ({', '.join(refused)} differ); "
                          "choose another --out, or delete the folder to start over")
    if trial.cfg.train.epochs < state.epoch:
        raise RunDirError(f"train.epochs = {trial.cfg.train.epochs}, but {trial.out} has already trained "
                          f"{state.epoch} epochs (expected train.epochs >= {state.epoch})")
    _check_fits(trial.model, ck["model"], path, trial.cfg.model.arch)
    trial.model.load_state_dict(ck["model"])
    try:
        trial.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit ({str(e).splitlines()[0]})") from None
    if "train.epochs" in changed and state.extended_from is None:
        state.extended_from = ck["config"]["train"]["epochs"]
        _say(f"notice: extending the run from {state.extended_from} to {trial.cfg.train.epochs} epochs; the "
             "cosine schedule is stretched from here on, so it is not the same as a fresh run")
    trial.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["cpu"])
    if trial.device.type == "cuda" and ck["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    for k, v in ck.get("extra", {}).items():
        extra.setdefault(k, v)
    if trial.progress:
        _say(f"resumed from {path} after epoch {state.epoch}")
    return state


def _check_fits(model: torch.nn.Module, state_dict: dict, path: Path, arch: str) -> None:
    mine = model.state_dict()
    missing = [k for k in mine if k not in state_dict]
    unexpected = [k for k in state_dict if k not in mine]
    shapes = [k for k in mine if k in state_dict and tuple(mine[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path} does not fit model.arch = {arch} ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected and {len(shapes)} mis-shaped tensors); delete it or choose another --out")


def train_epoch(trial: Trial, state: TrialState, epoch: int) -> dict:
    """One epoch of SGD with delta_trained = state.delta_next in every noisy layer."""
    cfg, model, opt = trial.cfg, trial.model, trial.opt
    delta = state.delta_next if cfg.noise.mode == "layerwise" else trial.fixed_delta()
    set_deltas(model, delta)
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=trial.device)
    correct = torch.zeros((), device=trial.device, dtype=torch.int64)
    seen = 0
    batches = trial.loaders["train"].epoch_batches(epoch)
    for i, (x, y) in enumerate(_progress(batches, len(trial.loaders["train"]),
                                         f"epoch {epoch}/{cfg.train.epochs}", trial.progress)):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(cfg.lr, state.step, trial.total_steps)
        with torch.autocast(trial.device.type, enabled=trial.use_amp):
            logits = model(x.contiguous(memory_format=trial.mem_fmt))
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss at epoch {epoch}, step {i + 1}")
        opt.zero_grad(set_to_none=True)
        trial.scaler.scale(loss).backward()
        trial.scaler.step(opt)
        trial.scaler.update()
        state.step += 1
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return dict(epoch=epoch, train_loss=loss_sum.item() / seen, train_acc=100.0 * correct.item() / seen,
                lr=cosine_lr(cfg.lr, state.step - 1, trial.total_steps), delta_trained=get_deltas(model),
                train_s=time.perf_counter() - t0)


def calibrate(trial: Trial, state: TrialState, rec: dict) -> ResidualStats:
    """Residual statistics after the epoch (every mode records them) and the next delta.
    The model's delta buffers keep delta_trained until the next epoch starts."""
    cfg = trial.cfg
    t0 = time.perf_counter()
    stats = trial.calibrator.calibrate(trial.model, tau=cfg.noise.tau, trial_id=trial.trial_id,
                                       epoch=rec["epoch"])
    state.delta_next = (stats.delta(cfg.noise.residual, cfg.noise.scale) if cfg.noise.mode == "layerwise"
                        else trial.fixed_delta())
    rec.update(delta_next=list(state.delta_next), calib_s=time.perf_counter() - t0,
               residual_mean=stats.mean[cfg.noise.residual], residual_std=stats.std[cfg.noise.residual],
               residual_mean_e2e=stats.mean["end_to_end"], residual_std_e2e=stats.std["end_to_end"],
               residual_mean_local=stats.mean["layer_local"], residual_std_local=stats.std["layer_local"])
    return stats


def evaluate(trial: Trial, state: TrialState, rec: dict) -> None:
    """ANN accuracy (noise off) on val and test; SNN accuracy at T = 1..select_T on the
    selection split (`snn_acc`, index T-1), every `eval.every` epochs and at the last."""
    cfg, model = trial.cfg, trial.model
    if rec["epoch"] % cfg.eval.every and rec["epoch"] != cfg.train.epochs:
        return
    t0 = time.perf_counter()
    rec["ann_val_acc"] = evaluate_ann(model, trial.loaders["val"].eval_batches())
    rec["ann_test_acc"] = evaluate_ann(model, trial.loaders["test"].eval_batches())
    rec["snn_acc"] = evaluate_snn(model, trial.loaders[cfg.eval.select_on].eval_batches(), cfg.eval.select_T)
    rec["snn_split"] = cfg.eval.select_on
    rec["snn_sel_acc"] = rec["snn_acc"][-1]
    rec["eval_s"] = time.perf_counter() - t0


def select_and_save(trial: Trial, state: TrialState, rec: dict, extra: dict) -> None:
    """Keep the best SNN (at select_T on select_on) in best.pt and checkpoint the epoch.
    Both files hold the weights with their delta_trained buffers."""
    if rec.get("snn_sel_acc") is not None and rec["snn_sel_acc"] > state.best_acc:
        state.best_acc, state.best_epoch = rec["snn_sel_acc"], rec["epoch"]
        atomic_torch_save({"model": trial.model.state_dict(), "epoch": rec["epoch"],
                           "delta_trained": rec["delta_trained"], "delta_next": rec["delta_next"]},
                          trial.out / BEST)
    state.history.append(rec)
    state.epoch = rec["epoch"]
    cuda = trial.device.type == "cuda"
    atomic_torch_save({"format": CKPT_FORMAT, "config": trial.cfg.to_dict(), "model": trial.model.state_dict(),
                       "optimizer": trial.opt.state_dict(), "scaler": trial.scaler.state_dict(),
                       "state": asdict(state), "extra": extra,
                       "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None}},
                      trial.out / CKPT)


def finish(trial: Trial, state: TrialState) -> dict:
    """Evaluate the selected checkpoint on test at every T (one simulation to max T),
    calibrate it once more with histograms, and write result.json and residual_hist.json."""
    cfg, model = trial.cfg, trial.model
    best = _load(trial.out / BEST)
    model.load_state_dict(best["model"])  # with its delta_trained buffers
    test = trial.loaders["test"]
    input_shape = tuple(trial.data.test_x.shape[1:])
    # the final evaluation also counts spikes, SOPs and energy (harness.energy), from the same simulation
    energy = EnergyRecorder(input_shape, max(cfg.eval.T))
    with observe_conversions(energy.attach):  # hooks the IF neurons of the SNN that evaluate_snn makes
        accs = evaluate_snn(model, test.eval_batches(), max(cfg.eval.T))
    energy.detach()
    macs = count_macs(model, input_shape)
    noisy = cfg.noise.mode != "qcfs" and any(d > 0 for d in best["delta_trained"])
    best_rec = next(r for r in state.history if r["epoch"] == state.best_epoch)
    final_stats = trial.calibrator.calibrate(model, tau=cfg.noise.tau, trial_id=trial.trial_id, epoch=None)
    result = dict(
        method=cfg.method, config=cfg.to_dict(), defaults_resolved=trial.defaults_resolved,
        data_source=trial.data.source, protocol=protocol(trial, state),
        ann_test_acc=best_rec["ann_test_acc"], ann_val_acc=best_rec["ann_val_acc"],
        ann_noisy_test_acc=evaluate_ann(model, test.eval_batches(), noisy=True) if noisy else None,
        snn_test_acc={str(t): accs[t - 1] for t in cfg.eval.T},
        best_epoch=state.best_epoch, selected_on=cfg.eval.select_on, select_T=cfg.eval.select_T,
        layers=trial.layers, delta_trained=best["delta_trained"], delta_next=best["delta_next"],
        calibration=trial.calib_set.describe(), data=trial.data.describe(), num_classes=trial.data.num_classes,
        macs=macs, input_shape=list(input_shape), input_mean=list(trial.data.mean), input_std=list(trial.data.std),
        model_adaptations=list(getattr(model, "harness_adaptations", [])),
        energy=energy.summary(cfg.eval.T, ann_macs=macs),
        history=state.history,
    )
    hist = dict(layers=final_stats.layers, lam=final_stats.lam, edges=final_stats.hist_edges,
                edges_unit="residual / lambda", counts=final_stats.hist[cfg.noise.residual],
                counts_by_residual=final_stats.hist, mean=final_stats.mean[cfg.noise.residual],
                std=final_stats.std[cfg.noise.residual], residual=cfg.noise.residual,
                tau=cfg.noise.tau, n_images=final_stats.n_images)
    atomic_write_json(trial.out / "result.json", result)
    atomic_write_json(trial.out / "residual_hist.json", hist)
    return result


def protocol(trial: Trial, state: TrialState) -> dict:
    """Every protocol choice that the numbers depend on, as result.json records it."""
    cfg = trial.cfg
    return {"selection": f"best SNN at T={cfg.eval.select_T} on the {cfg.eval.select_on} split",
            "select_on": cfg.eval.select_on, "select_T": cfg.eval.select_T,
            "grad": cfg.model.grad, "ann_accuracy": "noise off (eval mode); ann_noisy_test_acc has it on",
            "calibration": trial.calib_set.describe(), "residual": cfg.noise.residual,
            "epochs": cfg.train.epochs, "extended_from_epochs": state.extended_from}


def run(cfg: Config, out_dir: str | Path, *, calibrator: Calibrator | None = None,
        callbacks: Iterable[Callable[[dict, Path], None]] = (), on_start: Callable[[dict], None] | None = None,
        extra: dict | None = None, progress: bool = True, trial_id: str | None = None) -> dict:
    """Train one trial into `out_dir`, resuming from its checkpoint if there is one.
    `on_start(info)` runs once the config is resolved and the run directory is locked (info:
    resolved config, calibration set); `callbacks(record, out_dir)` run after each epoch's
    checkpoint is written. `extra` is stored in the checkpoint (e.g. an MLflow run id).
    Returns what result.json holds."""
    check_out_dir(Path(out_dir).absolute())
    trial = build(cfg, out_dir, calibrator, progress, trial_id)
    trial.out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good
    extra = dict(extra or {})
    with run_dir_lock(trial.out):
        state = resume(trial, extra)
        if on_start is not None:
            on_start({"config": trial.cfg.to_dict(), "defaults_resolved": trial.defaults_resolved,
                      "layers": list(trial.layers), "data": trial.data.describe(),
                      "calibration": trial.calib_set.describe()})
        for epoch in range(state.epoch + 1, trial.cfg.train.epochs + 1):
            t0 = time.perf_counter()
            rec = train_epoch(trial, state, epoch)
            calibrate(trial, state, rec)
            evaluate(trial, state, rec)
            rec["epoch_s"] = time.perf_counter() - t0
            select_and_save(trial, state, rec, extra)
            if progress:
                _say(_summary(rec, trial.cfg))
            for cb in callbacks:
                cb(rec, trial.out)
        return finish(trial, state)


# ---------------------------------------------------------------------------- console

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _summary(rec: dict, cfg: Config) -> str:
    s = f"epoch {rec['epoch']}/{cfg.train.epochs}  loss {rec['train_loss']:.4f}  lr {rec['lr']:.4g}"
    if "ann_val_acc" in rec:
        s += (f"  ann val {rec['ann_val_acc']:.2f} test {rec['ann_test_acc']:.2f}  "
              f"snn {cfg.eval.select_on} T={cfg.eval.select_T} {rec['snn_sel_acc']:.2f}")
    d = rec["delta_next"]
    s += f"  delta_next mean {sum(d) / len(d):.4f}  {rec['epoch_s']:.1f}s (calib {rec['calib_s']:.1f}s)"
    return s


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
