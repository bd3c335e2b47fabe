"""A shared calibration service for sweeps: one Ray actor holds every calibration split
of the sweep in memory and computes residual statistics for all trials.

    driver:  handle = start_actor(name, data_configs, cpu=.., gpu=.., max_concurrency=..)
    trial:   run(cfg, out, calibrator=ActorCalibrator(name, data_key(cfg), cfg.data.eval_batch_size))

The actor is created once, before Tuner.fit(), by the driver (so it outlives trials);
it restarts if it dies (max_restarts=-1) and calls are retried while it does. It keeps
each trial's per-epoch delta history (lost if the actor restarts). Importing this module
does not import ray or torch.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Mapping

# images per calibration pass; the same value as harness.calibration.DEFAULT_BATCH, which
# is not imported because this module must import without torch
DEFAULT_BATCH = 500

NAMESPACE = "harness"
# Data-config keys that do not change the calibration images (augment does, with
# noise.calib_augment).
_NOT_CALIBRATION = ("batch_size", "eval_batch_size", "download")


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
                lam_init=1.0, grad=cfg.model.grad)


class CalibrationActor:
    """Ray actor (wrap with ray.remote): calibration splits in memory, delta histories per trial."""

    def __init__(self, configs: Mapping[str, Mapping[str, Any]], threads: int = 1, device: str = "cpu"):
        """`configs`: data_key -> a Config dict whose calibration split to load."""
        import torch

        from .config import Config
        from .data import CalibrationSet, load_dataset

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.sets: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for key, d in configs.items():
            cfg = Config.from_dict(d)
            data = load_dataset(cfg.data, cfg.train.seed)
            self.sets[key] = CalibrationSet.from_dataset(data, cfg.resolved(data.image_size))
            self.shapes[key] = (data.num_classes, data.in_chans)
        self._history: dict[str, dict[Any, dict]] = {}
        self._lock = threading.Lock()

    def ready(self) -> dict[str, Any]:
        """Loaded calibration sets: data_key -> {n_images, class_counts, num_classes, in_chans};
        and the device."""
        return {"device": str(self.device),
                "splits": {k: {"n_images": len(v), "class_counts": v.class_counts(),
                               "num_classes": self.shapes[k][0], "in_chans": self.shapes[k][1]}
                           for k, v in self.sets.items()}}

    def calibrate(self, model_spec: Mapping[str, Any], state_dict: Mapping[str, Any], tau: int,
                  data_key: str, trial_id: str | None = None, epoch: int | None = None,
                  batch_size: int = DEFAULT_BATCH) -> dict:
        """ResidualStats.to_dict() of the model on the calibration set `data_key`."""
        import torch

        from .calibration import residual_error
        from .models import create_model

        if data_key not in self.sets:
            raise KeyError(f"unknown data_key {data_key!r} (known: {', '.join(self.sets)})")
        torch.manual_seed(0)  # model init is overwritten by the state dict; keep it deterministic
        model = create_model(**model_spec)
        model.load_state_dict(state_dict)
        model.to(self.device)
        batches = self.sets[data_key].batches(batch_size, epoch, self.device)
        stats = residual_error(model, batches, tau, histograms=epoch is None)
        if trial_id is not None:
            entry = {"epoch": epoch, "tau": tau, "n_images": stats.n_images,
                     "delta": {r: stats.delta(r) for r in stats.std},
                     "std": dict(stats.std), "mean": dict(stats.mean)}
            with self._lock:
                self._history.setdefault(trial_id, {})[epoch if epoch is not None else "final"] = entry
        return stats.to_dict()

    def history(self, trial_id: str) -> list[dict]:
        """Per-epoch entries (epoch order; a retried epoch replaces the earlier one), then the
        final calibration of the selected checkpoint (epoch None) if it ran."""
        with self._lock:
            h = dict(self._history.get(trial_id, {}))
        epochs = sorted(k for k in h if k != "final")
        return [h[e] for e in epochs] + ([h["final"]] if "final" in h else [])

    def trials(self) -> list[str]:
        with self._lock:
            return sorted(self._history)

    def all_histories(self) -> dict[str, list[dict]]:
        return {t: self.history(t) for t in self.trials()}


def start_actor(name: str, configs: Mapping[str, Mapping[str, Any]], *, cpu: float = 0.0, gpu: float = 0.0,
                max_concurrency: int = 4, threads: int = 1):
    """Create (or get) the named actor and wait until its data is loaded: (handle, ready())."""
    import ray

    cls = ray.remote(CalibrationActor)
    handle = cls.options(name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
                         max_task_retries=-1, max_concurrency=max_concurrency,
                         num_cpus=cpu, num_gpus=gpu).remote(dict(configs), threads,
                                                            "cuda" if gpu > 0 else "cpu")
    return handle, ray.get(handle.ready.remote())


class ActorCalibrator:
    """The Calibrator protocol, served by the named CalibrationActor (used inside trials)."""

    def __init__(self, name: str, data_key: str, model_spec: Mapping[str, Any], batch_size: int = DEFAULT_BATCH, *,
                 retries: int = 5, backoff: float = 1.0):
        """`model_spec`: create_model kwargs (arch, num_classes, L, lam_init, in_chans)."""
        self.name, self.data_key, self.batch_size = name, data_key, batch_size
        self.model_spec = dict(model_spec)
        self.retries, self.backoff = retries, backoff
        self._handle = None

    def _actor(self, refresh: bool = False):
        import ray
        if self._handle is None or refresh:
            self._handle = ray.get_actor(self.name, namespace=NAMESPACE)
        return self._handle

    def calibrate(self, model, *, tau: int, trial_id: str | None = None, epoch: int | None = None):
        import ray

        from .calibration import ResidualStats

        spec = self.model_spec
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for attempt in range(self.retries + 1):
            try:
                ref = self._actor(refresh=attempt > 0).calibrate.remote(
                    spec, state, tau, self.data_key, trial_id, epoch, self.batch_size)
                return ResidualStats.from_dict(ray.get(ref))
            except (ray.exceptions.RayActorError, ValueError) as e:
                # RayActorError: the actor died / is restarting; ValueError: get_actor found
                # no actor yet (between death and restart)
                if attempt == self.retries or (isinstance(e, ValueError) and "actor" not in str(e).lower()):
                    raise
                time.sleep(self.backoff * 2 ** attempt)
