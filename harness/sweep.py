"""`harness sweep SPACE.yaml`: a grid of training trials on Ray Tune, tracked in MLflow.

A search-space file has three parts:

    name: quickstart                 # default experiment name (else the file's stem)
    data: {...}  model: {...}  noise: {...}  train: {...}  eval: {...}   # the base config
    grid:                            # axes over dotted config keys; the trials are
      noise.mode: [qcfs, layerwise]  #   their cartesian product, in file order
      train.seed: [0, 1]
    overrides:                       # optional per-trial settings: every trial whose
      - match: {model.arch: resnet20}   #   values equal all of `match` also gets `set`
        set: {model.L: 8}
    resources: {cpu: 1, gpu: 0, max_concurrent: 2}     # per trial
    calibration: {mode: actor, cpu: 0, gpu: 0, max_concurrency: 4}   # or mode: local
    scheduler: {name: fifo}          # or {name: asha, grace_period: 2, reduction_factor: 3}

Every trial calls `harness.train.run` inside a Ray Tune function trainable; each epoch's
checkpoint is reported to Tune (failed trials restart from it, max_failures=2) and its
metrics are logged to the trial's MLflow child run (see harness.tracking). With
`calibration.mode: actor` all trials share one CalibrationActor (harness.actor).

Test hooks (environment of the driver): HARNESS_TEST_DIE_TRIAL="<trial index>:<epoch>"
kills that trial's worker (os._exit) right after that epoch's checkpoint, once per sweep;
HARNESS_SWEEP_MAX_FAILURES overrides max_failures (default 2).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Config, ConfigError, apply_override, format_validation_error, set_dotted
from .errors import BAD_INPUT, HarnessError

__all__ = ["SweepError", "SearchSpace", "Trial", "load_space", "main"]

SECTIONS = ("data", "model", "noise", "train", "eval")
PATH_KEYS = ("data.root",)  # relative values are resolved against the space file's folder or the CWD
STATE_FILE = "harness_sweep.json"
MAX_FAILURES = 2


class SweepError(HarnessError):
    """An expected sweep failure (impossible resources, nothing to resume, ...); one line
    starting with 'sweep error: '. Bad input (exit 2) unless raised with exit_code=1."""

    kind = "sweep error"
    exit_code = BAD_INPUT


# ---------------------------------------------------------------- search-space schema

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesCfg(_Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1)


class CalibrationCfg(_Section):
    mode: Literal["actor", "local"] = "actor"
    # The actor serves trials that wait for its answer, so by default it reserves no CPU
    # of its own (it borrows the waiting trial's); give it cpu/gpu for a dedicated device.
    cpu: float = Field(0.0, ge=0)
    gpu: float = Field(0.0, ge=0)
    max_concurrency: int = Field(4, ge=1)
    threads: int | None = Field(None, ge=1)  # torch threads in the actor (default: a trial's CPUs)


class SchedulerCfg(_Section):
    name: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the largest train.epochs of the sweep


class OverrideCfg(_Section):
    match: dict[str, Any] = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1)


class SpaceCfg(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    overrides: list[OverrideCfg] = Field(default_factory=list)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    calibration: CalibrationCfg = Field(default_factory=CalibrationCfg)
    scheduler: SchedulerCfg = Field(default_factory=SchedulerCfg)


@dataclass
class Trial:
    index: int
    label: str           # e.g. "mode=qcfs,seed=0": MLflow run name and harness.trial tag
    config: dict          # validated Config.to_dict()
    cfg: Config

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}_{self.label}"


@dataclass
class SearchSpace:
    path: Path
    name: str
    base: Config
    trials: list[Trial]
    resources: ResourcesCfg
    calibration: CalibrationCfg
    scheduler: SchedulerCfg
    axes: dict[str, list[Any]] = field(default_factory=dict)


# ---------------------------------------------------------------- loading and expansion

def load_space(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpace:
    """Parse, expand and validate a search space; every problem is a one-line ConfigError.
    `overrides` (`section.key=value`) apply to the base config."""
    import yaml

    path = Path(path).expanduser().absolute()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"search space {str(path)!r} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read search space {str(path)!r} ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"search space {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {str(path)!r} must be a mapping (base config, grid, resources)")
    try:
        space = SpaceCfg.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=SpaceCfg)) from None

    base = {s: copy.deepcopy(getattr(space, s)) or {} for s in SECTIONS if getattr(space, s) is not None}
    for o in overrides:
        apply_override(base, o)
    _resolve_paths(base, path.parent)
    base_cfg = Config.from_dict(base)

    axes = _check_grid(space.grid or {})
    for i, o in enumerate(space.overrides):
        for part in ("match", "set"):
            for key in getattr(o, part):
                _check_key(key, f"overrides[{i}].{part}")

    trials: list[Trial] = []
    labels = _labels(axes)
    for index, combo in enumerate(itertools.product(*axes.values())):
        d = copy.deepcopy(base)
        for key, value in zip(axes, combo):
            set_dotted(d, key, copy.deepcopy(value))
        applied = []
        for i, o in enumerate(space.overrides):
            if all(_get(d, k) == v for k, v in o.match.items()):
                applied.append(i)
                for k, v in o.set.items():
                    set_dotted(d, k, copy.deepcopy(v))
        _resolve_paths(d, path.parent)
        label = labels[index]
        try:
            cfg = Config.model_validate(d)
        except ValidationError as e:
            raise ConfigError(_trial_error(e, axes, space.overrides, applied, label)) from None
        trials.append(Trial(index, label, cfg.to_dict(), cfg))
    if not trials:
        raise ConfigError("the search space has zero trials")
    name = space.name or re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem)
    return SearchSpace(path, name, base_cfg, trials, space.resources, space.calibration, space.scheduler, axes)


def _check_key(key: str, where: str) -> None:
    """`key` must be a dotted path of the training config (section.key[.sub])."""
    parts = key.split(".")
    current: Any = Config
    for i, part in enumerate(parts):
        fields = getattr(current, "model_fields", None)
        if fields is None:
            raise ConfigError(f"unknown key {where}.{key} ({'.'.join(parts[:i])} is not a section)")
        if part not in fields:
            raise ConfigError(f"unknown key {where}.{'.'.join(parts[:i + 1])} "
                              f"(accepted: {', '.join(fields)})")
        ann = fields[part].annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if len(parts) < 2:
        raise ConfigError(f"{where}.{key} names a whole section (expected section.key)")


def _check_grid(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for key, values in grid.items():
        _check_key(str(key), "grid")
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} = {values!r} (expected a non-empty list of values)")
        if not values:
            raise ConfigError(f"grid.{key} = [] (expected a non-empty list of values; "
                              "an empty axis gives zero trials)")
        axes[str(key)] = values
    return axes


def _trial_error(e: ValidationError, axes, overrides, applied, label: str) -> str:
    loc = ".".join(str(p) for p in e.errors(include_url=False)[0]["loc"])
    for key in sorted(axes, key=len, reverse=True):
        if loc == key or loc.startswith(key + "."):
            return format_validation_error(e, prefix_loc=("grid",), model=Config)
    for i in applied:
        for key in overrides[i].set:
            if loc == key or loc.startswith(key + "."):
                return format_validation_error(e, prefix_loc=("overrides", i, "set"), model=Config)
    return f"trial {label}: {format_validation_error(e, model=Config)}"


def _labels(axes: Mapping[str, list[Any]]) -> list[str]:
    """Readable, unique trial labels from the varying axes: 'mode=qcfs,seed=0'."""
    varying = [k for k, v in axes.items() if len(v) > 1]
    last = [k.split(".")[-1] for k in varying]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(varying, last)}
    out = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        parts = [f"{short[k]}={_short_value(values[k])}" for k in varying]
        out.append(",".join(parts) or "trial")
    if len(set(out)) < len(out):
        out = [f"{lab}#{i}" for i, lab in enumerate(out)]
    return out


def _short_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short_value(e) for e in v)
    if isinstance(v, Mapping):
        return "+".join(f"{k}:{_short_value(e)}" for k, e in v.items())
    s = str(v)
    if isinstance(v, str) and "/" in s:
        s = Path(s).name
    return re.sub(r"[^A-Za-z0-9_.\-+:]", "_", s)[:40]


def _get(d: Mapping[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _default(key)
        node = node[part]
    return node


def _default(key: str) -> Any:
    node: Any = Config().to_dict()
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _resolve_paths(d: dict[str, Any], space_dir: Path) -> None:
    """Relative data paths: against the space file's folder if that exists, else the CWD.
    (Trials chdir into their own folders, so every path they get must be absolute.)"""
    for key in PATH_KEYS:
        v = _get(d, key)
        if isinstance(v, str) and v and "://" not in v:
            p = Path(v).expanduser()
            if not p.is_absolute():
                p = space_dir / p if (space_dir / p).exists() else Path.cwd() / p
            set_dotted(d, key, os.path.normpath(p.absolute()))


# ---------------------------------------------------------------- the trainable (runs in a Ray worker)

def _tune_trial_name(trial) -> str:
    return trial.config["trial"]["label"]


def _tune_trial_dirname(trial) -> str:
    return _dirname(trial.config["trial"])


def _dirname(t: Mapping[str, Any]) -> str:
    return f"{t['index']:02d}_{t['label']}"


def train_trial(config: dict) -> None:
    """Ray Tune function trainable: one trial = one `harness.train.run`, one MLflow child run."""
    import torch
    from ray import tune

    from . import tracking
    from .train import BEST, CKPT, read_checkpoint_extra, run

    t, s = config["trial"], config["sweep"]
    cfg = Config.from_dict(t["config"])
    label = t["label"]
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # The trial's own folder under the storage path (get_trial_dir() would be the driver's
    # staging copy, which Tune syncs concurrently)
    out = Path(s["exp_dir"]) / _dirname(t) / "work"
    out.mkdir(parents=True, exist_ok=True)

    # Continue from Tune's last checkpoint (a retry or --resume); otherwise start clean (a
    # checkpoint in `out` newer than Tune's would skip epochs that were never logged).
    ckpt = tune.get_checkpoint()
    for name in (CKPT, BEST):
        (out / name).unlink(missing_ok=True)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            for name in (CKPT, BEST):
                if (Path(d) / name).exists():
                    shutil.copy2(Path(d) / name, out / name)

    die = s.get("test_die")
    if die and die[0] == t["index"] and not (out / ".test_died").exists():
        (out / ".test_died").touch()
        os.environ["HARNESS_TEST_DIE_AFTER_EPOCH"] = str(die[1])
    else:
        os.environ.pop("HARNESS_TEST_DIE_AFTER_EPOCH", None)

    client = tracking.client(s["tracking_uri"])
    run_id = read_checkpoint_extra(out).get("mlflow_run_id") if ckpt is not None else None
    run_id = run_id or tracking.find_child(client, s["experiment_id"], s["parent_run_id"], label)
    if run_id is None:
        run_id = tracking.create_child(client, s["experiment_id"], s["parent_run_id"], label, cfg)
        done: set[int] = set()
    else:
        tracking.set_status(client, run_id, "RUNNING")
        done = tracking.logged_epochs(client, run_id)

    calibrator = None
    if s["calibration_mode"] == "actor":
        from .actor import ActorCalibrator
        calibrator = ActorCalibrator(s["actor_name"], t["data_key"], t["model_spec"],
                                     cfg.data.eval_batch_size)
    last_sel = {"v": 0.0}
    layers: list[str] = []

    def on_start(info: dict) -> None:
        layers[:] = info["layers"]
        tracking.log_trial_params(client, run_id, info)

    def report(rec: dict, out_dir: Path) -> None:
        if rec["epoch"] not in done:  # a retried epoch that was already logged keeps its first values
            tracking.log_epoch(client, run_id, rec, layers)
            done.add(rec["epoch"])
        if rec.get("snn_sel_acc") is not None:
            last_sel["v"] = float(rec["snn_sel_acc"])
        stage = out_dir / "_tune_checkpoint"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        for name in (CKPT, BEST):
            if (out_dir / name).exists():
                try:
                    os.link(out_dir / name, stage / name)
                except OSError:
                    shutil.copy2(out_dir / name, stage / name)
        shown = {k: rec[k] for k in ("train_loss", "ann_test_acc", "calib_s", "epoch_s") if k in rec}
        tune.report({**shown, "epoch": rec["epoch"], "snn_sel_acc": last_sel["v"]},
                    checkpoint=tune.Checkpoint.from_directory(str(stage)))
        shutil.rmtree(stage, ignore_errors=True)

    try:
        result = run(cfg, out, calibrator=calibrator, callbacks=[report], on_start=on_start,
                     extra={"mlflow_run_id": run_id}, progress=False, trial_id=label)
        tracking.log_final(client, run_id, result, out)
        tracking.set_status(client, run_id, "FINISHED")
    except BaseException as e:
        # Tune stops a trial (scheduler / Ctrl-C) by raising SystemExit in tune.report
        status = "KILLED" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "FAILED"
        try:
            tracking.set_status(client, run_id, status)
        except Exception:  # noqa: BLE001
            pass
        raise


# ---------------------------------------------------------------- driver

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness sweep",
                                description="Run a grid of trials from a search-space file on Ray Tune, "
                                            "tracked in MLflow.")
    p.add_argument("space", help="search-space YAML (base config + grid + resources)")
    p.add_argument("--name", help="experiment name (default: the file's `name:` or its stem)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--storage-path", help="Ray Tune results folder (default: <cwd>/ray_results)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto'); default: start a local one")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials "
                                                         "are not rerun; errored ones continue)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the base config (repeatable)")
    return p


def _quiet_env() -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # one legacy CLIReporter table
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "harness" / "inductor"))
    os.environ.setdefault("MPLBACKEND", "Agg")


def _worker_env() -> dict[str, str]:
    keys = ("TORCHINDUCTOR_CACHE_DIR", "HARNESS_CACHE", "RAY_DEDUP_LOGS", "MPLBACKEND")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _init_ray(address: str | None) -> bool:
    """Start (or join) Ray; True if this call started it."""
    import ray
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
              configure_logging=True)
    if address:
        ray.init(address=address, runtime_env={"env_vars": _worker_env()}, **kw)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, **kw)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def check_resources(space: SearchSpace, joined: bool) -> None:
    """A request that can never be met is an error (a warning when joining a cluster,
    whose autoscaler may add nodes)."""
    import ray
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    res, cal = space.resources, space.calibration
    problems = []
    for kind, key, need, what in [("cpu", "CPU", res.cpu, "resources.cpu"), ("gpu", "GPU", res.gpu, "resources.gpu")] + (
            [("cpu", "CPU", cal.cpu, "calibration.cpu"), ("gpu", "GPU", cal.gpu, "calibration.gpu")]
            if cal.mode == "actor" else []):
        if need <= 0:
            continue
        have_total = total.get(key, 0.0)
        have_node = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if have_node < need:
            per = " per trial" if what.startswith("resources") else ""
            where = (f"the cluster has {have_total:g} {key}" if have_node == have_total
                     else f"the largest node has {have_node:g} {key}")
            problems.append(f"{what} = {need:g}{per}, but {where}")
    if cal.mode == "actor" and not problems:
        for key, a, b in (("CPU", res.cpu, cal.cpu), ("GPU", res.gpu, cal.gpu)):
            if b > 0 and a + b > total.get(key, 0.0):
                problems.append(f"resources.{key.lower()} + calibration.{key.lower()} = {a + b:g}, "
                                f"but the cluster has {total.get(key, 0.0):g} {key} (no trial could run "
                                "next to the calibration actor)")
    if problems:
        if joined:
            print(f"notice: {problems[0]}; waiting for the cluster to scale up", file=sys.stderr)
        else:
            raise SweepError(problems[0])


def _state_matches(saved: dict, space: SearchSpace) -> bool:
    return [t["config"] for t in saved.get("trials", [])] == [t.config for t in space.trials]


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    space = load_space(a.space, a.overrides)  # ConfigError: one line, exit 2
    name = a.name or space.name
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", name):
        raise ConfigError(f"--name {name!r} (expected letters, digits, '_', '.', '-')")
    from . import tracking
    uri = tracking.normalize_uri(a.tracking_uri)
    if a.storage_path and "://" in a.storage_path:
        raise SweepError(f"--storage-path {a.storage_path!r}: only a filesystem path is supported "
                         "(on a multi-node cluster, a shared mount such as EFS/NFS)")
    storage = Path(a.storage_path or "ray_results").expanduser().absolute()
    exp_dir = storage / name
    state_path = exp_dir / STATE_FILE
    threads = max(1, int(space.resources.cpu))
    for t in space.trials:  # each trial uses as many torch threads as it has CPUs
        t.config["train"]["threads"] = threads
        t.cfg = Config.from_dict(t.config)

    _quiet_env()
    from ray import tune
    if a.resume:
        if not (tune.Tuner.can_restore(str(exp_dir)) and state_path.exists()):
            raise SweepError(f"nothing to resume at {exp_dir} (no sweep named {name!r} was started there)")
        saved = json.loads(state_path.read_text())
        if not _state_matches(saved, space):
            raise SweepError(f"the search space changed since sweep {name!r} started; "
                             "run it under a new --name instead of --resume")
    elif tune.Tuner.can_restore(str(exp_dir)):
        raise SweepError(f"sweep {name!r} already exists at {exp_dir}; pass --resume to continue it "
                         "or --name NEW for a fresh one")
    for t in space.trials:  # data that is not there fails here, before any run is created
        root = t.cfg.data.root
        if t.cfg.data.name in ("imagefolder",) and root and not Path(root).exists():
            raise SweepError(f"data.root {root!r} does not exist (trial {t.label})")

    t_start = time.perf_counter()
    started = _init_ray(a.address)
    t_ray = time.perf_counter() - t_start
    import ray

    actor = None
    client = parent_id = None
    ok = False
    try:
        check_resources(space, joined=bool(a.address))
        # --- shared calibration actor
        data_keys: dict[str, dict] = {}
        model_specs: dict[int, dict] = {}
        actor_name = None
        if space.calibration.mode == "actor":
            from .actor import actor_name as _actor_name, data_key, model_spec, start_actor
            actor_name = _actor_name(name)
            configs = {}
            for t in space.trials:
                data_keys[t.index] = data_key(t.cfg)
                configs.setdefault(data_keys[t.index], t.config)
            cal = space.calibration
            try:
                actor, ready = start_actor(actor_name, configs, cpu=cal.cpu, gpu=cal.gpu,
                                           max_concurrency=cal.max_concurrency,
                                           threads=cal.threads or threads)
            except ray.exceptions.RayActorError as e:
                raise SweepError(f"the calibration actor could not start: {_cause(e)}") from None
            for t in space.trials:
                split = ready["splits"][data_keys[t.index]]
                model_specs[t.index] = model_spec(t.cfg, split["num_classes"], split["in_chans"])

        # --- MLflow: DB, experiment and parent run (trials only add child runs)
        client = tracking.client(uri)
        exp_id = tracking.ensure_experiment(client, name, uri)
        if a.resume and saved.get("parent_run_id"):
            parent_id = saved["parent_run_id"]
            tracking.set_status(client, parent_id, "RUNNING")
        else:
            parent_id = tracking.create_parent(client, exp_id, name, space.path)
        exp_dir.mkdir(parents=True, exist_ok=True)
        tracking.write_json(state_path, {
            "name": name, "space": str(space.path), "tracking_uri": uri, "experiment_id": exp_id,
            "parent_run_id": parent_id, "trials": [{"index": t.index, "label": t.label, "config": t.config}
                                                   for t in space.trials]})

        die = os.environ.get("HARNESS_TEST_DIE_TRIAL")
        sweep_cfg = {"tracking_uri": uri, "exp_dir": str(exp_dir), "experiment_id": exp_id,
                     "parent_run_id": parent_id,
                     "calibration_mode": space.calibration.mode, "actor_name": actor_name,
                     "test_die": [int(x) for x in die.split(":")] if die else None}
        trial_dicts = [{"index": t.index, "label": t.label, "config": t.config,
                        "data_key": data_keys.get(t.index), "model_spec": model_specs.get(t.index)}
                       for t in space.trials]
        trainable = tune.with_resources(train_trial, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
        tuner = _make_tuner(a, space, name, storage, trainable, sweep_cfg, trial_dicts, exp_dir)
        print(f"sweep {name}: {len(space.trials)} trials, {space.resources.cpu:g} CPU"
              f"{f' + {space.resources.gpu:g} GPU' if space.resources.gpu else ''} each, "
              f"calibration {space.calibration.mode}, scheduler {space.scheduler.name}"
              f"{' (resumed)' if a.resume else ''}; Ray ready in {t_ray:.1f} s", flush=True)
        grid = tuner.fit()

        errors = [r for r in grid if r.error is not None]
        n_ok = len(grid) - len(errors)
        ok = not errors and len(grid) == len(space.trials)
        if actor is not None:
            hist = ray.get(actor.all_histories.remote())
            tracking.write_json(exp_dir / "calibration_history.json", hist)
            client.log_artifact(parent_id, str(exp_dir / "calibration_history.json"))
        _close_children(client, exp_id, parent_id, "FAILED")
        tracking.set_status(client, parent_id, "FINISHED" if ok else "FAILED")
        wall = time.perf_counter() - t_start
        print(f"\nsweep {name}: {n_ok}/{len(space.trials)} trials finished in {wall:.0f} s"
              + (f"; {len(errors)} failed (harness sweep {a.space} --resume continues them)" if errors else ""))
        db = tracking.db_path(uri)
        print(f"MLflow: {db if db else uri} (experiment {name!r}, parent run {parent_id})")
        print(f"Ray Tune results: {exp_dir}")
        default = tracking.default_tracking_uri()
        print(f"next: harness report --experiment {name}"
              + (f" --tracking-uri {uri}" if uri != default else ""))
        return 0 if ok else 1
    except KeyboardInterrupt:
        if client is not None and parent_id is not None:
            _close_children(client, None, parent_id, "KILLED")
            tracking.set_status(client, parent_id, "KILLED")
        raise
    except BaseException:
        if client is not None and parent_id is not None and not ok:
            try:
                tracking.set_status(client, parent_id, "FAILED")
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        if started:
            ray.shutdown()


def _cause(e: BaseException) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):
        if "error:" in line.lower() and line.strip():
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def _close_children(client, exp_id, parent_id: str, status: str) -> None:
    """After fit() no trial runs: a child still RUNNING died without closing its run."""
    from . import tracking
    exp_ids = [exp_id] if exp_id else [client.get_run(parent_id).info.experiment_id]
    for r in tracking.retry(lambda: client.search_runs(
            exp_ids, filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")):
        tracking.set_status(client, r.info.run_id, status)


def _make_tuner(a, space: SearchSpace, name: str, storage: Path, trainable, sweep_cfg, trial_dicts, exp_dir):
    from ray import tune
    if a.resume:
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    max_failures = int(os.environ.get("HARNESS_SWEEP_MAX_FAILURES", MAX_FAILURES))
    select = "snn_sel_acc"
    scheduler = None
    if space.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler
        sc = space.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=select, mode="max",
                                  max_t=sc.max_t or max(t.cfg.train.epochs for t in space.trials),
                                  grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", "ann_test_acc": "ANN test",
                        "snn_sel_acc": "SNN sel", "epoch_s": "s/epoch"},
        parameter_columns={"trial/index": "#"}, max_report_frequency=30, max_column_length=40,
        print_intermediate_tables=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trial_dicts), "sweep": sweep_cfg},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=space.resources.max_concurrent,
                                    trial_name_creator=_tune_trial_name,
                                    trial_dirname_creator=_tune_trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=1, progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
