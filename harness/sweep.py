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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError
from .errors import BAD_INPUT, INTERRUPTED, RUN_FAILED, HarnessError
from .space import NAME_PATTERN, SearchSpace, load_space
from .trainable import train_trial

__all__ = ["SweepError", "SweepOptions", "run_sweep", "main", "check_resources"]

STATE_FILE = "harness_sweep.json"
ACTOR_HISTORY = "calibration_history"  # the actor's delta history, one file per trial (kept on --resume)
CALIBRATION_KEYS = ("train.seed", "noise.calib_samples", "noise.calib_augment")  # besides data.*
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "9p", "efs", "glusterfs")
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


class Storage:
    """The sweep's storage: a local folder, or a URI that pyarrow understands (file://,
    s3://, gs://, ...), as Ray Tune accepts it. The driver keeps its state file there."""

    def __init__(self, location: str):
        import pyarrow.fs as pafs
        self.is_uri = "://" in location
        if self.is_uri:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except Exception as e:  # noqa: BLE001 - pyarrow's errors name the problem
                raise SweepError(f"--storage-path {location!r} is not a storage URI pyarrow can open "
                                 f"({str(e).splitlines()[0]}); expected a folder, file://, s3:// or gs://") from None
            self.location = location.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())
            self.location = self.root

    def uri(self, *parts: str) -> str:
        return "/".join([self.location, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self._path(*parts)) as f:
            return f.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        """Written to a temporary name, then moved over the target."""
        self.fs.create_dir(self._path(*parts[:-1]), recursive=True)
        tmp = self._path(*parts) + f".{os.getpid()}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, self._path(*parts))


@dataclass
class Plan:
    """A validated sweep invocation."""
    space: SearchSpace
    opts: SweepOptions
    name: str
    uri: str
    storage: Storage
    saved: dict | None  # the state file of the sweep being resumed

    @property
    def exp_uri(self) -> str:
        return self.storage.uri(self.name)

    @property
    def log_from(self) -> str:
        """Who writes MLflow: the driver for a SQLite store (one writer, no node needs the
        file), the trials for a tracking server."""
        return "trial" if self.uri.startswith(("http://", "https://")) else "driver"

    @property
    def actor_history_dir(self) -> Path | None:
        """Where the calibration actor persists its delta history: a folder of the storage
        when that is a local (or file://) file system; None (history kept in memory only)
        for object stores."""
        import pyarrow.fs as pafs
        if not isinstance(self.storage.fs, pafs.LocalFileSystem):
            return None
        return Path(self.storage.root) / self.name / ACTOR_HISTORY


# ---------------------------------------------------------------- 1. validate (no Ray yet)

def validate(space: SearchSpace, opts: SweepOptions) -> Plan:
    """Every check that needs no cluster: names, URIs, data, --resume state."""
    from ray import tune

    from . import tracking

    name = opts.name or space.name
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"--name {name!r} (expected letters, digits, '_', '.', '-')")
    uri = tracking.normalize_uri(opts.tracking_uri)
    storage = Storage(opts.storage_path or "ray_results")
    exp = storage.uri(name)
    saved = None
    if opts.resume:
        if not (tune.Tuner.can_restore(exp) and storage.exists(name, STATE_FILE)):
            raise SweepError(f"nothing to resume at {exp} (no sweep named {name!r} was started there)")
        saved = json.loads(storage.read_text(name, STATE_FILE))
        from .space import with_defaults
        if with_defaults(saved.get("space") or {}) != space.raw:
            raise SweepError(f"the search space changed since sweep {name!r} started; "
                             "run it under a new --name instead of --resume")
    elif tune.Tuner.can_restore(exp):
        raise SweepError(f"sweep {name!r} already exists at {exp}; pass --resume to continue it "
                         "or --name NEW for a fresh one")
    for t in space.trials:  # data that is not there fails here, before any run is created
        root = t.cfg.data.root
        if t.cfg.data.name == "imagefolder" and root and not Path(root).exists():
            raise SweepError(f"data.root {root!r} does not exist (trial {t.label})")
    if space.calibration.mode == "actor":
        moving = [k for k in space.sample if k.startswith("data.") or k in CALIBRATION_KEYS]
        if moving:
            raise ConfigError(f"sample.{moving[0]} changes the calibration images from trial to trial, which "
                              "the shared actor loads before the sweep (expected calibration.mode: local, or "
                              "the axis under grid)")
    return Plan(space, opts, name, uri, storage, saved)


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
        # "local": a new Ray of this process. Without it ray.init() joins the cluster last
        # started on this machine (`ray start`, /tmp/ray/ray_current_cluster) and then
        # refuses num_cpus with a traceback.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kw)
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


def check_shared_storage(storage: Storage) -> None:
    """On a cluster of several nodes, trials of other nodes must reach the storage: a
    local folder on a node-local file system is refused (a URI is the user's statement
    that every node reaches it)."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage.is_uri or len(nodes) < 2:
        return
    fstype = _fs_type(Path(storage.root))
    if fstype not in SHARED_FS_TYPES and not fstype.startswith("fuse"):
        raise SweepError(f"--storage-path {storage.root} is on a node-local file system ({fstype}) but the cluster "
                         f"has {len(nodes)} nodes (expected a shared mount such as NFS/EFS, or a URI: s3://, gs://, "
                         "file:// for a path every node reaches)")


def _fs_type(path: Path) -> str:
    """The file-system type of the mount that holds `path` (from /proc/mounts)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


# ---------------------------------------------------------------- 3. the shared calibration actor

def start_calibration_actor(space: SearchSpace, name: str, history_dir: Path | None = None) -> tuple[Any, dict]:
    """(actor handle or None, its calibration sets: data key -> {n_images, class_counts,
    num_classes, in_chans}). The grid's trials name every set (samplers never move the
    calibration images when the actor serves them: `validate`). `history_dir`: where the
    actor persists (and on a restart or --resume reloads) its delta history."""
    if space.calibration.mode != "actor":
        return None, {}
    import ray

    from .actor import actor_name, data_key, start_actor
    configs = {}
    for t in space.trials:
        configs.setdefault(data_key(t.cfg), t.config)
    cal = space.calibration
    try:
        actor, ready = start_actor(actor_name(name), configs, cpu=cal.cpu, gpu=cal.gpu,
                                   max_concurrency=cal.max_concurrency,
                                   threads=cal.threads or _threads(space), history_dir=history_dir)
    except ray.exceptions.RayActorError as e:
        raise SweepError(f"the calibration actor could not start: {_cause(e)}", exit_code=RUN_FAILED) from None
    return actor, ready["splits"]


def _threads(space: SearchSpace) -> int:
    """Each trial uses as many torch threads as it has CPUs."""
    return max(1, int(space.resources.cpu))


# ---------------------------------------------------------------- 4. MLflow parent run

def open_parent_run(plan: Plan) -> tuple[Any, str, str]:
    """(client, experiment id, parent run id): a new parent run, or the resumed sweep's,
    and the state file that --resume reads."""
    from . import tracking
    client = tracking.client(plan.uri)
    exp_id = tracking.ensure_experiment(client, plan.name, plan.uri)
    if plan.saved and plan.saved.get("parent_run_id"):
        parent_id = plan.saved["parent_run_id"]
        tracking.set_status(client, parent_id, "RUNNING")
    else:
        planned = {"harness.n_planned": str(plan.space.n_trials)}
        if plan.space.is_grid:  # every trial's label is known: the report names those that never ran
            planned["harness.planned_trials"] = json.dumps([t.label for t in plan.space.trials])
        parent_id = tracking.create_parent(client, exp_id, plan.name, plan.space.path, plan.space.raw,
                                           extra_tags=planned)
    plan.storage.write_text(json.dumps({
        "name": plan.name, "space_file": str(plan.space.path), "space": plan.space.raw, "tracking_uri": plan.uri,
        "experiment_id": exp_id, "parent_run_id": parent_id}, indent=1), plan.name, STATE_FILE)
    return client, exp_id, parent_id


# ---------------------------------------------------------------- 5. fit

def fit(plan: Plan, trainable: Callable, sweep_cfg: dict, callbacks: list):
    """Run (or restore and continue) the Tune experiment; Tune's ResultGrid."""
    from ray import tune
    space = plan.space
    trainable = tune.with_resources(trainable, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    run_config = tune.RunConfig(
        name=plan.name, storage_path=plan.storage.location, verbose=1, progress_reporter=_reporter(),
        callbacks=callbacks, failure_config=tune.FailureConfig(max_failures=space.failure.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT))
    if plan.opts.resume:
        # the run config (with the MLflow callback, pickled before it ever ran) is Tune's own
        return tune.Tuner.restore(plan.exp_uri, trainable=trainable, resume_errored=True,
                                  param_space=space.param_space(sweep_cfg)).fit()
    tuner = tune.Tuner(
        trainable, param_space=space.param_space(sweep_cfg),
        tune_config=tune.TuneConfig(scheduler=_scheduler(space), search_alg=_search_alg(space),
                                    num_samples=space.num_samples, max_concurrent_trials=space.resources.max_concurrent,
                                    reuse_actors=True, trial_name_creator=_tune_trial_name,
                                    trial_dirname_creator=_tune_trial_dirname),
        run_config=run_config)
    return tuner.fit()


def _scheduler(space: SearchSpace):
    if space.scheduler.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler
    sc = space.scheduler
    # the trial's final report (after its last epoch) carries epoch = train.epochs: max_t one
    # above it lets a trial that survives every rung finish its final evaluation
    max_t = sc.max_t or max(t.cfg.train.epochs for t in space.trials) + 1
    return ASHAScheduler(time_attr="epoch", metric=sc.metric, mode=sc.mode, max_t=max_t,
                         grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)


def _search_alg(space: SearchSpace):
    if space.search.algorithm != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch
    s = space.search
    return OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed)


def _reporter():
    from ray import tune
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "train_loss": "loss", "ann_test_acc": "ANN test",
                        "snn_sel_acc": "SNN sel", "epoch_s": "s/epoch"},
        parameter_columns=[], max_report_frequency=PROGRESS_EVERY_S, max_column_length=40,
        print_intermediate_tables=True)


def _tune_trial_name(trial) -> str:
    from .space import trial_label
    return trial_label(trial.config["axes"], trial.config["space"]["label_keys"])


def _tune_trial_dirname(trial) -> str:
    return f"{_tune_trial_name(trial)}_{trial.trial_id}"


# ---------------------------------------------------------------- 6. summarise

@dataclass
class Outcome:
    finished: int
    failed: int
    unfinished: int  # never started, or stopped by the interrupt
    stopped: int = 0  # stopped early by the scheduler (ASHA): an outcome of the search, not a failure

    @property
    def status(self) -> str:
        return "KILLED" if self.unfinished else ("FAILED" if self.failed else "FINISHED")

    @property
    def exit_code(self) -> int:
        return INTERRUPTED if self.unfinished else (RUN_FAILED if self.failed else 0)


def outcome(grid, n_trials: int) -> Outcome:
    """Counted from Tune's own result grid, trial by trial (its status and last result),
    never from errors alone.

    Tune marks a trial TERMINATED in three cases: it returned (its last report is the
    trainable's `final` one), the scheduler stopped it (Tune sets `done` on its last
    result), or the sweep was interrupted while it ran (Tune's clean-up after Ctrl-C stops
    it without a `done` result). Only the first is finished; the last is not. ERROR is
    failed (after its retries); PENDING, PAUSED, RUNNING and trials never created (a
    searcher's) are not finished."""
    from ray.tune.experiment import Trial
    finished = failed = stopped = 0
    for t in grid._experiment_analysis.trials:  # what ResultGrid.num_terminated / num_errors count
        last = t.last_result or {}
        if t.status == Trial.ERROR:
            failed += 1
        elif t.status == Trial.TERMINATED and last.get("final"):
            finished += 1
        elif t.status == Trial.TERMINATED and last.get("done"):
            stopped += 1
    return Outcome(finished, failed, n_trials - finished - failed - stopped, stopped)


def summarise(plan: Plan, grid, client, exp_id: str, parent_id: str, actor, wall_s: float) -> int:
    from . import tracking
    o = outcome(grid, plan.space.n_trials)
    if actor is not None:
        import ray
        text = json.dumps(ray.get(actor.all_histories.remote()), indent=1)
        plan.storage.write_text(text, plan.name, "calibration_history.json")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "calibration_history.json").write_text(text)
            client.log_artifact(parent_id, str(Path(tmp) / "calibration_history.json"))
    _close_children(client, exp_id, parent_id, "KILLED" if o.unfinished else "FAILED")
    if o.finished:
        tracking.summarise_parent(client, exp_id, parent_id, plan.space.label_keys)
    tracking.set_status(client, parent_id, o.status)
    resume = _resume_command(plan)
    counts = (f"{o.finished} finished, " + (f"{o.stopped} stopped early by {plan.space.scheduler.name.upper()}, "
                                            if o.stopped else "")
              + f"{o.failed} failed, {o.unfinished} not finished, of {plan.space.n_trials}")
    if o.unfinished:
        print(f"\nsweep {plan.name}: INTERRUPTED after {wall_s:.0f} s: {counts}; `{resume}` continues it")
    elif o.failed:
        print(f"\nsweep {plan.name}: FAILED after {wall_s:.0f} s: {counts}; `{resume}` retries the failed trials")
    elif o.stopped:
        print(f"\nsweep {plan.name}: done in {wall_s:.0f} s: {counts}")
    else:
        print(f"\nsweep {plan.name}: {o.finished}/{plan.space.n_trials} trials finished in {wall_s:.0f} s")
    db = tracking.db_path(plan.uri)
    print(f"MLflow: {db if db else plan.uri} (experiment {plan.name!r}, parent run {parent_id}, {o.status})")
    print(f"Ray Tune results: {plan.exp_uri}")
    if o.finished:
        print(f"next: harness report --experiment {plan.name}"
              + (f" --tracking-uri {plan.uri}" if plan.uri != tracking.default_tracking_uri() else ""))
    return o.exit_code


def _resume_command(plan: Plan) -> str:
    """The command that continues this sweep: the same store, storage, cluster and --set
    overrides (--resume refuses a space that differs, and finds nothing elsewhere)."""
    import shlex
    o = plan.opts
    parts = ["harness", "sweep", o.space_file, "--name", plan.name]
    if o.tracking_uri:
        parts += ["--tracking-uri", plan.uri]
    if o.storage_path:
        parts += ["--storage-path", plan.storage.location]
    if o.address:
        parts += ["--address", o.address]
    for override in o.overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(p) for p in parts) + " --resume"


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
    plan = validate(space, opts)
    _quiet_env()
    t_start = time.perf_counter()
    started = _init_ray(opts.address)
    actor = client = parent_id = exp_id = None
    try:
        check_resources(space, joined=bool(opts.address))
        check_shared_storage(plan.storage)
        history_dir = plan.actor_history_dir
        if history_dir is not None and not opts.resume:  # left over from a sweep of this name that never got going
            shutil.rmtree(history_dir, ignore_errors=True)
        actor, splits = start_calibration_actor(space, plan.name, history_dir)
        client, exp_id, parent_id = open_parent_run(plan)
        sweep_cfg = {"name": plan.name, "tracking_uri": plan.uri, "experiment_id": exp_id,
                     "parent_run_id": parent_id, "log_from": plan.log_from, "threads": _threads(space),
                     "calibration_mode": space.calibration.mode, "actor_name": _actor_name(space, plan.name),
                     "actor_splits": splits, "model": space.tracking.model}
        callbacks = []
        if plan.log_from == "driver":
            from .tune_mlflow import MlflowLogger
            callbacks.append(MlflowLogger(plan.uri, exp_id, parent_id, model=space.tracking.model))
        print(f"sweep {plan.name}: {space.n_trials} trials, {space.resources.cpu:g} CPU"
              f"{f' + {space.resources.gpu:g} GPU' if space.resources.gpu else ''} each, "
              f"calibration {space.calibration.mode}, scheduler {space.scheduler.name}, MLflow logged by the "
              f"{plan.log_from}{' (resumed)' if opts.resume else ''}; Ray ready in "
              f"{time.perf_counter() - t_start:.1f} s", flush=True)
        grid = fit(plan, trainable, sweep_cfg, callbacks)
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
