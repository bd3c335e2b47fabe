"""`harness sweep SPACE.yaml`: the driver of a grid of trials on Ray Tune, tracked in MLflow.

    space = load_space(file)                     harness.space: schema and expansion (no Ray)
    plan  = validate(space, options)             names, URIs, storage, --resume state
    start Ray; check_resources(space)            impossible requests fail before any run
    actor = start_calibration_actor(...)         one shared actor (calibration.mode: actor)
    parent = open_parent_run(...)                one MLflow parent run per invocation
    grid  = fit(...)                             harness.trainable.train_trial per trial
    return summarise(grid, ...)                  counted from Tune's own trial statuses

A sweep succeeds only when every trial finished: a failed trial makes the parent run
FAILED and the exit code 1; an interrupt (Ctrl-C) makes it KILLED, prints what finished,
what failed and what never finished, the --resume command, and exits 130.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import Config, ConfigError
from .errors import BAD_INPUT, INTERRUPTED, RUN_FAILED, HarnessError
from .io import atomic_write_json
from .space import NAME_PATTERN, SearchSpace, load_space, trial_dirname
from .trainable import train_trial

__all__ = ["SweepError", "SweepOptions", "run_sweep", "main", "check_resources"]

STATE_FILE = "harness_sweep.json"
ACTOR_HISTORY = "calibration_history"  # the actor's delta history, one file per trial (kept on --resume)
CHECKPOINTS_KEPT = 2  # Tune keeps the last two epoch checkpoints of each trial
PROGRESS_EVERY_S = 30  # Tune's progress table at most this often


class SweepError(HarnessError):
    """An expected sweep failure (impossible resources, nothing to resume, ...); one line
    starting with 'sweep error: '. Bad input (exit 2)."""

    kind = "sweep error"
    exit_code = BAD_INPUT


@dataclass
class SweepOptions:
    space_file: str
    name: str | None = None
    tracking_uri: str | None = None
    storage_path: str | None = None
    address: str | None = None
    resume: bool = False
    overrides: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A validated sweep invocation."""
    space: SearchSpace
    opts: SweepOptions
    name: str
    uri: str
    exp_dir: Path
    saved: dict | None  # the state file of the sweep being resumed

    @property
    def state_path(self) -> Path:
        return self.exp_dir / STATE_FILE


# ---------------------------------------------------------------- 1. validate (no Ray yet)

def validate(space: SearchSpace, opts: SweepOptions) -> Plan:
    """Every check that needs no cluster: names, URIs, data, --resume state."""
    from ray import tune

    from . import tracking

    name = opts.name or space.name
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"--name {name!r} (expected letters, digits, '_', '.', '-')")
    uri = tracking.normalize_uri(opts.tracking_uri)
    if opts.storage_path and "://" in opts.storage_path:
        raise SweepError(f"--storage-path {opts.storage_path!r}: only a filesystem path is supported "
                         "(on a multi-node cluster, a shared mount such as EFS/NFS)")
    exp_dir = Path(opts.storage_path or "ray_results").expanduser().absolute() / name
    saved = None
    if opts.resume:
        if not (tune.Tuner.can_restore(str(exp_dir)) and (exp_dir / STATE_FILE).exists()):
            raise SweepError(f"nothing to resume at {exp_dir} (no sweep named {name!r} was started there)")
        saved = json.loads((exp_dir / STATE_FILE).read_text())
        if [t["config"] for t in saved.get("trials", [])] != [t.config for t in space.trials]:
            raise SweepError(f"the search space changed since sweep {name!r} started; "
                             "run it under a new --name instead of --resume")
    elif tune.Tuner.can_restore(str(exp_dir)):
        raise SweepError(f"sweep {name!r} already exists at {exp_dir}; pass --resume to continue it "
                         "or --name NEW for a fresh one")
    for t in space.trials:  # data that is not there fails here, before any run is created
        root = t.cfg.data.root
        if t.cfg.data.name == "imagefolder" and root and not Path(root).exists():
            raise SweepError(f"data.root {root!r} does not exist (trial {t.label})")
    return Plan(space, opts, name, uri, exp_dir, saved)


# ---------------------------------------------------------------- 2. Ray

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
    """A request that can never be met is an error (a notice when joining a cluster,
    whose autoscaler may add nodes)."""
    import ray
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    res, cal = space.resources, space.calibration
    wanted = [("CPU", res.cpu, "resources.cpu"), ("GPU", res.gpu, "resources.gpu")]
    if cal.mode == "actor":
        wanted += [("CPU", cal.cpu, "calibration.cpu"), ("GPU", cal.gpu, "calibration.gpu")]
    problems = []
    for key, need, what in wanted:
        have_total = total.get(key, 0.0)
        have_node = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if need > 0 and have_node < need:
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
    if problems and joined:
        print(f"notice: {problems[0]}; waiting for the cluster to scale up", file=sys.stderr)
    elif problems:
        raise SweepError(problems[0])


# ---------------------------------------------------------------- 3. the shared calibration actor

def start_calibration_actor(space: SearchSpace, name: str, history_dir: Path | None = None) -> tuple[Any, list[dict]]:
    """(actor handle or None, the trials as Tune sees them: index, label, config and, with
    the actor, the trial's calibration-set key and model spec). `history_dir`: where the
    actor persists (and on a restart or --resume reloads) its delta history."""
    trials = [{"index": t.index, "label": t.label, "config": t.config, "data_key": None, "model_spec": None}
              for t in space.trials]
    if space.calibration.mode != "actor":
        return None, trials
    import ray

    from .actor import actor_name, data_key, model_spec, start_actor
    keys = {t.index: data_key(t.cfg) for t in space.trials}
    configs = {}
    for t in space.trials:
        configs.setdefault(keys[t.index], t.config)
    cal = space.calibration
    try:
        actor, ready = start_actor(actor_name(name), configs, cpu=cal.cpu, gpu=cal.gpu,
                                   max_concurrency=cal.max_concurrency,
                                   threads=cal.threads or _threads(space), history_dir=history_dir)
    except ray.exceptions.RayActorError as e:
        raise SweepError(f"the calibration actor could not start: {_cause(e)}", exit_code=RUN_FAILED) from None
    for d, t in zip(trials, space.trials):
        split = ready["splits"][keys[t.index]]
        d.update(data_key=keys[t.index], model_spec=model_spec(t.cfg, split["num_classes"], split["in_chans"]))
    return actor, trials


def _threads(space: SearchSpace) -> int:
    """Each trial uses as many torch threads as it has CPUs."""
    return max(1, int(space.resources.cpu))


# ---------------------------------------------------------------- 4. MLflow parent run

def open_parent_run(plan: Plan, trials: list[dict]) -> tuple[Any, str, str]:
    """(client, experiment id, parent run id): a new parent run, or the resumed sweep's,
    and the state file that --resume reads."""
    from . import tracking
    client = tracking.client(plan.uri)
    exp_id = tracking.ensure_experiment(client, plan.name, plan.uri)
    if plan.saved and plan.saved.get("parent_run_id"):
        parent_id = plan.saved["parent_run_id"]
        tracking.set_status(client, parent_id, "RUNNING")
    else:
        parent_id = tracking.create_parent(client, exp_id, plan.name, plan.space.path)
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.state_path, {
        "name": plan.name, "space": str(plan.space.path), "tracking_uri": plan.uri, "experiment_id": exp_id,
        "parent_run_id": parent_id,
        "trials": [{"index": t["index"], "label": t["label"], "config": t["config"]} for t in trials]})
    return client, exp_id, parent_id


# ---------------------------------------------------------------- 5. fit

def fit(plan: Plan, trainable: Callable, trials: list[dict], sweep_cfg: dict):
    """Run (or restore and continue) the Tune experiment; Tune's ResultGrid."""
    from ray import tune
    space = plan.space
    trainable = tune.with_resources(trainable, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    if plan.opts.resume:
        return tune.Tuner.restore(str(plan.exp_dir), trainable=trainable, resume_errored=True).fit()
    scheduler = None
    if space.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler
        sc = space.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="snn_sel_acc", mode="max",
                                  max_t=sc.max_t or max(t.cfg.train.epochs for t in space.trials),
                                  grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", "ann_test_acc": "ANN test",
                        "snn_sel_acc": "SNN sel", "epoch_s": "s/epoch"},
        parameter_columns={"trial/index": "#"}, max_report_frequency=PROGRESS_EVERY_S, max_column_length=40,
        print_intermediate_tables=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials), "sweep": sweep_cfg},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=space.resources.max_concurrent,
                                    trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_dirname),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=str(plan.exp_dir.parent), verbose=1, progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=space.failure.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))
    return tuner.fit()


def _tune_trial_name(trial) -> str:
    return trial.config["trial"]["label"]


def _tune_trial_dirname(trial) -> str:
    return trial_dirname(trial.config["trial"]["index"], trial.config["trial"]["label"])


# ---------------------------------------------------------------- 6. summarise

@dataclass
class Outcome:
    finished: int
    failed: int
    unfinished: int  # never started, or stopped by the interrupt

    @property
    def status(self) -> str:
        return "KILLED" if self.unfinished else ("FAILED" if self.failed else "FINISHED")

    @property
    def exit_code(self) -> int:
        return INTERRUPTED if self.unfinished else (RUN_FAILED if self.failed else 0)


def outcome(grid, n_trials: int) -> Outcome:
    """Counted from Tune's own trial statuses (TERMINATED, ERROR), never from errors alone:
    an interrupted trial has no error but did not finish."""
    finished, failed = grid.num_terminated, grid.num_errors
    return Outcome(finished, failed, n_trials - finished - failed)


def summarise(plan: Plan, grid, client, exp_id: str, parent_id: str, actor, wall_s: float) -> int:
    from . import tracking
    o = outcome(grid, len(plan.space.trials))
    if actor is not None:
        import ray
        hist_path = plan.exp_dir / "calibration_history.json"
        atomic_write_json(hist_path, ray.get(actor.all_histories.remote()))
        client.log_artifact(parent_id, str(hist_path))
    _close_children(client, exp_id, parent_id, "KILLED" if o.unfinished else "FAILED")
    tracking.set_status(client, parent_id, o.status)
    resume = f"harness sweep {plan.opts.space_file} --name {plan.name} --resume"
    counts = f"{o.finished} finished, {o.failed} failed, {o.unfinished} not finished, of {len(plan.space.trials)}"
    if o.unfinished:
        print(f"\nsweep {plan.name}: INTERRUPTED after {wall_s:.0f} s: {counts}; `{resume}` continues it")
    elif o.failed:
        print(f"\nsweep {plan.name}: FAILED after {wall_s:.0f} s: {counts}; `{resume}` retries the failed trials")
    else:
        print(f"\nsweep {plan.name}: {o.finished}/{len(plan.space.trials)} trials finished in {wall_s:.0f} s")
    db = tracking.db_path(plan.uri)
    print(f"MLflow: {db if db else plan.uri} (experiment {plan.name!r}, parent run {parent_id}, {o.status})")
    print(f"Ray Tune results: {plan.exp_dir}")
    if o.finished:
        print(f"next: harness report --experiment {plan.name}"
              + (f" --tracking-uri {plan.uri}" if plan.uri != tracking.default_tracking_uri() else ""))
    return o.exit_code


def _close_children(client, exp_id: str, parent_id: str, status: str) -> None:
    """After fit() no trial runs: a child still RUNNING died without closing its run."""
    from . import tracking
    for r in tracking.retry(lambda: client.search_runs(
            [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")):
        tracking.set_status(client, r.info.run_id, status)


# ---------------------------------------------------------------- the whole sweep

def run_sweep(space: SearchSpace, opts: SweepOptions, trainable: Callable = train_trial) -> int:
    """Validate, start Ray, the actor and the parent run, fit, summarise: the exit code.
    `trainable` is `train_trial` or a wrapper of it (e.g. one that injects a fault)."""
    from . import tracking
    for t in space.trials:
        t.config["train"]["threads"] = _threads(space)
        t.cfg = Config.from_dict(t.config)
    plan = validate(space, opts)
    _quiet_env()
    t_start = time.perf_counter()
    started = _init_ray(opts.address)
    actor = client = parent_id = exp_id = None
    try:
        check_resources(space, joined=bool(opts.address))
        history_dir = plan.exp_dir / ACTOR_HISTORY
        if not opts.resume:  # left over from a sweep of this name that never got going
            shutil.rmtree(history_dir, ignore_errors=True)
        actor, trials = start_calibration_actor(space, plan.name, history_dir)
        client, exp_id, parent_id = open_parent_run(plan, trials)
        sweep_cfg = {"name": plan.name, "tracking_uri": plan.uri, "experiment_id": exp_id,
                     "parent_run_id": parent_id, "calibration_mode": space.calibration.mode,
                     "actor_name": _actor_name(space, plan.name)}
        print(f"sweep {plan.name}: {len(space.trials)} trials, {space.resources.cpu:g} CPU"
              f"{f' + {space.resources.gpu:g} GPU' if space.resources.gpu else ''} each, "
              f"calibration {space.calibration.mode}, scheduler {space.scheduler.name}"
              f"{' (resumed)' if opts.resume else ''}; Ray ready in {time.perf_counter() - t_start:.1f} s", flush=True)
        grid = fit(plan, trainable, trials, sweep_cfg)
        return summarise(plan, grid, client, exp_id, parent_id, actor, time.perf_counter() - t_start)
    except BaseException as e:
        if parent_id is not None:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                _close_children(client, exp_id, parent_id, status)
                tracking.set_status(client, parent_id, status)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        raise
    finally:
        if actor is not None:
            import ray
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        if started:
            import ray
            ray.shutdown()


def _actor_name(space: SearchSpace, name: str) -> str | None:
    if space.calibration.mode != "actor":
        return None
    from .actor import actor_name
    return actor_name(name)


def _cause(e: BaseException) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):
        if "error:" in line.lower() and line.strip():
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(opts: SweepOptions) -> int:
    return run_sweep(load_space(opts.space_file, opts.overrides), opts)
