"""A shared calibration service for sweeps: one Ray actor holds every calibration split
of the sweep in memory and computes residual statistics for all trials.

    driver:  handle, ready = start_actor(name, data_configs, cpu=.., gpu=.., max_concurrency=..,
                                         threads=.., history_dir=<sweep storage>/calibration_history)
    trial:   run(cfg, out, calibrator=ActorCalibrator(name, data_key(cfg), spec, cfg.data.eval_batch_size))

The actor is created once, before Tuner.fit(), by the driver (so it outlives trials).

Concurrency. The actor is a threaded Ray actor. `max_concurrency` calibrations compute
at once (compute slots, each with `threads` torch threads); up to `queue` more calls wait
inside the actor for a slot (a bounded queue: beyond it, Ray holds the calls back). All
calls on one calibration split share its images (one uint8 copy in the actor). Every
call reports the time it spent queued (from its submission by the trial, wall clock,
to the start of its computation: Ray's queue and the actor's) and computing; both are
returned with the statistics and kept in the history. Inductor's CPU kernels (the IF
step, QCFS, the fused statistics) hold the GIL, so concurrent calibrations in one
process overlap only in the ATen operators (convolutions, BN, adds);
benchmarks/actor_scale.py measures what that gives.

Failure. The actor restarts if it dies (max_restarts=-1): Ray runs __init__ again, which
reloads the calibration splits and the delta history from `history_dir`; calls that were
in flight are retried by Ray (max_task_retries=-1) and by ActorCalibrator (on
RayActorError, with backoff). The history is persisted after every call, one JSON file
per trial written atomically, so it survives a restart and `harness sweep --resume`
(the driver creates the actor anew, on the same folder). A retried epoch replaces the
entry of that epoch: the history stays in epoch order.

Importing this module does not import ray or torch.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .memory import release_freed_memory

# images per calibration pass; the same value as harness.calibration.DEFAULT_BATCH, which
# is not imported because this module must import without torch
DEFAULT_BATCH = 500
DEFAULT_QUEUE = 16  # calls that may wait inside the actor for a compute slot

NAMESPACE = "harness"
# Data-config keys that do not change the calibration images (augment does, with
# noise.calib_augment).
_NOT_CALIBRATION = ("batch_size", "eval_batch_size", "download")
FINAL = "final"  # the history key of the final calibration (epoch None)


def actor_name(sweep: str) -> str:
    return f"harness-calibrator-{sweep}"


def data_key(cfg) -> str:
    """Identifies a calibration set: data source, seed (val split and subset draw),
    val_fraction, calib_samples and, when calibration images are augmented, the augmentation."""
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in _NOT_CALIBRATION}
    if not cfg.noise.calib_augment:
        data.pop("augment")
    spec = {"data": data, "seed": cfg.train.seed, "calib_samples": cfg.noise.calib_samples,
            "calib_augment": cfg.noise.calib_augment}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def model_spec(cfg, num_classes: int, in_chans: int) -> dict[str, Any]:
    """create_model kwargs of a trial's network. lambda's initial value is irrelevant (the
    state dict overwrites it), so the config need not be resolved."""
    return dict(arch=cfg.model.arch, num_classes=num_classes, in_chans=in_chans, L=cfg.model.L,
                lam_init=1.0, grad=cfg.model.grad, cifar_stem=cfg.model.cifar_stem)


# ---------------------------------------------------------------- the history, persisted

class History:
    """Per-trial calibration entries keyed by epoch (FINAL for the final calibration),
    optionally persisted to `folder`: one JSON file per trial, rewritten atomically
    after every change, so a crash leaves either the old or the new file."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._entries: dict[str, dict[Any, dict]] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def _path(self, trial_id: str) -> Path:
        return self.folder / f"{hashlib.sha1(trial_id.encode()).hexdigest()[:16]}.json"

    def _load(self) -> None:
        for p in sorted(self.folder.glob("*.json")):
            try:
                d = json.loads(p.read_text())
                self._entries[d["trial_id"]] = {_key(k): e for k, e in d["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError):  # not one of ours: ignored
                continue

    def put(self, trial_id: str, epoch: int | None, entry: dict) -> None:
        from .io import atomic_write_json

        with self._lock:  # one writer at a time: atomic_write's temporary name is per process
            h = self._entries.setdefault(trial_id, {})
            h[FINAL if epoch is None else int(epoch)] = entry
            if self.folder is not None:
                atomic_write_json(self._path(trial_id), {"trial_id": trial_id,
                                                        "entries": {str(k): e for k, e in h.items()}})

    def get(self, trial_id: str) -> list[dict]:
        """Per-epoch entries in epoch order (a retried epoch replaced the earlier one), then
        the final calibration if it ran."""
        with self._lock:
            h = dict(self._entries.get(trial_id, {}))
        epochs = sorted(k for k in h if k != FINAL)
        return [h[e] for e in epochs] + ([h[FINAL]] if FINAL in h else [])

    def trials(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)


def _key(k: str):
    return FINAL if k == FINAL else int(k)


# ---------------------------------------------------------------- the actor

class CalibrationActor:
    """Ray actor (wrap with ray.remote; see start_actor): calibration splits in memory,
    concurrent calibrations, delta histories per trial (persisted to `history_dir`)."""

    def __init__(self, configs: Mapping[str, Mapping[str, Any]], threads: int = 1, device: str = "cpu",
                 history_dir: str | None = None, slots: int = 1):
        """`configs`: data_key -> a Config dict whose calibration split to load. `slots`:
        calibrations computed at once, each with `threads` torch threads."""
        import torch

        from .config import Config
        from .data import CalibrationSet, load_dataset

        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.sets: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for key, d in configs.items():
            cfg = Config.from_dict(d)
            data = load_dataset(cfg.data, cfg.train.seed)
            self.sets[key] = CalibrationSet.from_dataset(data, cfg.resolved(data.image_size))
            self.shapes[key] = (data.num_classes, data.in_chans)
        self.slots = max(1, int(slots))
        self._slots = threading.BoundedSemaphore(self.slots)
        self._history = History(history_dir)
        self.started = time.time()

    def ready(self) -> dict[str, Any]:
        """Loaded calibration sets: data_key -> {n_images, class_counts, num_classes, in_chans};
        the device, compute slots, and the trials whose history was reloaded."""
        return {"device": str(self.device), "slots": self.slots, "threads": self.threads,
                "history_trials": self._history.trials(),
                "splits": {k: {"n_images": len(v), "class_counts": v.class_counts(),
                               "num_classes": self.shapes[k][0], "in_chans": self.shapes[k][1]}
                           for k, v in self.sets.items()}}

    def calibrate(self, model_spec: Mapping[str, Any], state_dict: Mapping[str, Any], tau: int,
                  data_key: str, trial_id: str | None = None, epoch: int | None = None,
                  batch_size: int = DEFAULT_BATCH, submitted: float | None = None) -> dict:
        """ResidualStats.to_dict() of the model on the calibration set `data_key`, plus
        "timing": {"queue_s", "compute_s"}. `submitted`: the caller's time.time() when it
        sent the call (default: when the call reached this method)."""
        import torch

        from .calibration import residual_error
        from .models import create_model

        arrived = time.time()
        if data_key not in self.sets:
            raise KeyError(f"unknown data_key {data_key!r} (known: {', '.join(self.sets)})")
        with self._slots:
            start = time.time()
            t0 = time.perf_counter()
            torch.set_num_threads(self.threads)  # per thread: OpenMP settings are thread-local
            torch.manual_seed(0)  # model init is overwritten by the state dict; keep it deterministic
            model = create_model(**model_spec)
            model.load_state_dict(state_dict)
            model.to(self.device)
            batches = self.sets[data_key].batches(batch_size, epoch, self.device)
            stats = residual_error(model, batches, tau, histograms=epoch is None)
            compute_s = time.perf_counter() - t0
        del model, batches
        release_freed_memory()  # harness.memory: the actor's RSS grew with every call without it
        timing = {"queue_s": max(0.0, start - (submitted if submitted is not None else arrived)),
                  "compute_s": compute_s}
        if trial_id is not None:
            self._history.put(trial_id, epoch, {
                "epoch": epoch, "tau": tau, "n_images": stats.n_images,
                "delta": {r: stats.delta(r) for r in stats.std},
                "std": dict(stats.std), "mean": dict(stats.mean), **timing})
        return {**stats.to_dict(), "timing": timing}

    def history(self, trial_id: str) -> list[dict]:
        """Per-epoch entries (epoch order; a retried epoch replaces the earlier one), then the
        final calibration of the selected checkpoint (epoch None) if it ran."""
        return self._history.get(trial_id)

    def trials(self) -> list[str]:
        return self._history.trials()

    def all_histories(self) -> dict[str, list[dict]]:
        return {t: self.history(t) for t in self.trials()}

    def pid(self) -> int:
        """The actor's process id (tests and benchmarks kill it to exercise restarts)."""
        import os
        return os.getpid()


def start_actor(name: str, configs: Mapping[str, Mapping[str, Any]], *, cpu: float = 0.0, gpu: float = 0.0,
                max_concurrency: int = 4, threads: int = 1, history_dir: str | Path | None = None,
                queue: int = DEFAULT_QUEUE):
    """Create (or get) the named actor and wait until its data is loaded: (handle, ready()).
    `max_concurrency`: calibrations computed at once; `queue`: further calls that wait in
    the actor (Ray's max_concurrency is their sum, plus one thread for history/ready calls);
    `history_dir`: where the delta history is persisted (reloaded on restart and resume)."""
    import ray

    cls = ray.remote(CalibrationActor)
    handle = cls.options(name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
                         max_task_retries=-1, max_concurrency=max_concurrency + queue + 1,
                         num_cpus=cpu, num_gpus=gpu).remote(
        dict(configs), threads, "cuda" if gpu > 0 else "cpu",
        str(history_dir) if history_dir is not None else None, max_concurrency)
    return handle, ray.get(handle.ready.remote())


# ---------------------------------------------------------------- the trial's side

def _ray_connect(name: str):
    import ray
    return ray.get_actor(name, namespace=NAMESPACE)


def _ray_call(handle, *args) -> dict:
    import ray
    return ray.get(handle.calibrate.remote(*args))


def _retryable() -> tuple[type[BaseException], ...]:
    import ray.exceptions
    return (ray.exceptions.RayActorError,)


class ActorCalibrator:
    """The Calibrator protocol, served by the named CalibrationActor (used inside trials).
    Retries a call when the actor dies or is restarting (RayActorError), and when the
    named actor cannot be found for a moment (between death and restart). The timing of
    each epoch's call is kept in `timings` (epoch -> queue_s, compute_s, round_trip_s)."""

    def __init__(self, name: str, data_key: str, model_spec: Mapping[str, Any], batch_size: int = DEFAULT_BATCH, *,
                 retries: int = 5, backoff: float = 1.0, connect: Callable[[str], Any] | None = None,
                 call: Callable[..., dict] | None = None,
                 retry_on: tuple[type[BaseException], ...] | None = None):
        """`model_spec`: create_model kwargs (arch, num_classes, L, lam_init, in_chans).
        `connect(name)` -> handle, `call(handle, *args)` -> the actor's reply and `retry_on`
        default to Ray's (ray.get_actor, ray.get(handle.calibrate.remote(...)),
        RayActorError); tests pass fakes."""
        self.name, self.data_key, self.batch_size = name, data_key, batch_size
        self.model_spec = dict(model_spec)
        self.retries, self.backoff = retries, backoff
        self._connect = connect or _ray_connect
        self._call = call or _ray_call
        self._retry_on = retry_on
        self._handle = None
        self.timings: dict[Any, dict[str, float]] = {}

    def _actor(self, refresh: bool = False):
        if self._handle is None or refresh:
            self._handle = self._connect(self.name)
        return self._handle

    def calibrate(self, model, *, tau: int, trial_id: str | None = None, epoch: int | None = None):
        from .calibration import ResidualStats

        retry_on = self._retry_on if self._retry_on is not None else _retryable()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                reply = self._call(self._actor(refresh=attempt > 0), self.model_spec, state, tau, self.data_key,
                                   trial_id, epoch, self.batch_size, time.time())
                break
            except (*retry_on, ValueError) as e:
                # RayActorError: the actor died / is restarting; ValueError: get_actor found
                # no actor yet (between death and restart)
                if attempt == self.retries or (isinstance(e, ValueError) and "actor" not in str(e).lower()):
                    raise
                time.sleep(self.backoff * 2 ** attempt)
        reply = dict(reply)
        timing = dict(reply.pop("timing", None) or {})
        timing["round_trip_s"] = time.perf_counter() - t0
        timing["attempts"] = attempt + 1
        self.timings[FINAL if epoch is None else epoch] = timing
        return ResidualStats.from_dict(reply)

    def timing(self, epoch: int | None) -> dict[str, float]:
        """The last call's timing for `epoch`: queue_s, compute_s (the actor's, of the call
        that answered), round_trip_s (the trial's wait, retries included), attempts."""
        return dict(self.timings.get(FINAL if epoch is None else epoch, {}))
