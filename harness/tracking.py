"""MLflow tracking for sweeps: one parent run per sweep invocation, one child run per trial.

Everything goes through an explicit `MlflowClient` (the fluent API only where MLflow has
nothing else: `mlflow.pytorch.log_model`). Only SQLite (`sqlite:///...`) and tracking
servers (`http(s)://...`) are accepted; MLflow's file store is refused. With SQLite the
sweep's driver is the only writer (harness.tune_mlflow); with a server, trials log
through it.

Layout (read by `harness report`; names group in the MLflow UI by their `/` prefix):
  experiment  = the sweep's name
  parent run  tags harness.role=parent, harness.hardware, mlflow.source.*, mlflow.user;
              params: the search space (space.*); metrics at the end: summary/<method>/...,
              summary/delta/... (mean over seeds, paired NQ - QCFS, with n); artifacts:
              the search-space file, versions.json, calibration_history.json
  child run   tags mlflow.parentRunId, harness.role=trial, harness.trial, harness.method,
              ray.node_id, ray.node_ip; params: the resolved config, calib.*, layers;
              per-epoch metrics (step = epoch): train/*, ann/*, snn/<split>_acc_TNN,
              delta/lNN_<layer> (trained with), delta_next/..., residual/std|mean/...,
              time/*; final (step 0): final/*, and final/snn_test_acc_by_T (step = T);
              dataset input (name, source, digest); artifacts result.json,
              residual_hist.json, curves.png, and the selected checkpoint: best.pt
              (tracking.model: checkpoint, sweeps' default) or an MLflow model
              (mlflow.pytorch; tracking.model: mlflow)
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import BAD_INPUT, HarnessError

TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow's limits: characters per param value, entries per log_batch call
MAX_PARAM_CHARS, MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 6000, 100, 1000
# per-epoch record key -> MLflow metric (step = epoch)
EPOCH_METRICS = {"train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr",
                 "ann_val_acc": "ann/val_acc", "ann_test_acc": "ann/test_acc",
                 "epoch_s": "time/epoch_s", "train_s": "time/train_s", "calib_s": "time/calib_s",
                 "eval_s": "time/eval_s", "calib_queue_s": "calib/queue_s", "calib_compute_s": "calib/compute_s"}
# per-epoch, per-layer record key -> MLflow metric prefix (name: <prefix>/l<index>_<layer>)
LAYER_METRICS = {"delta_trained": "delta", "delta_next": "delta_next",
                 "residual_std": "residual/std", "residual_mean": "residual/mean"}


def t_name(T: int) -> str:
    """Zero-padded so that MLflow's alphabetical order is the order of T: T04, T16."""
    return f"T{int(T):02d}"


def layer_name(index: int, layer: str) -> str:
    """The layer's key in metrics, histograms and heatmaps: l03_stages.0.0.act2."""
    return f"l{index:02d}_{layer}"


class TrackingError(HarnessError):
    """A tracking problem (an unusable tracking URI is bad input: exit 2)."""

    kind = "tracking error"
    exit_code = BAD_INPUT


# ---------------------------------------------------------------- URIs and clients

def default_tracking_uri(cwd: str | Path | None = None) -> str:
    return f"sqlite:///{(Path(cwd or os.getcwd()).absolute() / 'mlflow.db').as_posix()}"


def normalize_uri(uri: str | None) -> str:
    """An absolute SQLite URI (trials chdir, so relative paths would move) or a server URL."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise TrackingError(f"--tracking-uri {uri!r} (expected a database file)")
        db = Path(path).expanduser().absolute()
        check_sqlite_store(db, uri)
        return f"sqlite:///{db.as_posix()}"
    raise TrackingError(f"--tracking-uri {uri!r} is not supported (expected sqlite:///PATH.db or "
                        "http(s)://SERVER; MLflow's file store is not used)")


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_store(db: Path, uri: str) -> None:
    """An existing file must be an SQLite database that is empty or MLflow's (it has an
    `experiments` table); a new file must be creatable."""
    if db.is_dir():
        raise TrackingError(f"--tracking-uri {uri!r} names a folder (expected an SQLite database file)")
    if not db.exists():
        if not db.parent.is_dir():
            raise TrackingError(f"--tracking-uri {uri!r}: folder {db.parent} does not exist")
        return
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        raise TrackingError(f"--tracking-uri {uri!r}: {db} is not an SQLite database (expected an MLflow "
                            "store, or a new file name)")
    if head:
        import sqlite3
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        if tables and "experiments" not in tables:
            raise TrackingError(f"--tracking-uri {uri!r}: {db} is an SQLite database but not an MLflow store "
                                f"(its tables: {', '.join(sorted(tables)[:5])})")


def db_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client(uri: str):
    import logging
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    c.harness_uri = uri  # for the one fluent call (log_model)
    return c


def retry(fn: Callable[[], Any], attempts: int = 8, wait: float = 0.25) -> Any:
    """Call fn, retrying SQLite 'database is locked' style failures with backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            msg = str(e).lower()
            if i == attempts - 1 or not ("locked" in msg or "busy" in msg or "operationalerror" in msg):
                raise
            time.sleep(wait * 2 ** i)


# ---------------------------------------------------------------- environment description

def hardware() -> str:
    """'<CPU or GPU name>, <n> threads, torch <ver>' for the machine this runs on."""
    import torch
    name = None
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0) + (f" x{n}" if n > 1 else "")
    if name is None:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    name = name or platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads (cpu_count {os.cpu_count()}), torch {torch.__version__}"


def versions() -> dict[str, Any]:
    from importlib import metadata
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "ray", "mlflow", "timm", "nq-snn-harness"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        out["git_commit"] = commit.stdout.strip() or None
        out["git_dirty"] = bool(dirty.stdout.strip()) if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = out["git_dirty"] = None
    return out


# ---------------------------------------------------------------- driver side

def ensure_experiment(c, name: str, uri: str) -> str:
    """The experiment id, creating it (artifacts next to the SQLite file) if needed."""
    exp = retry(lambda: c.get_experiment_by_name(name))
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(lambda: c.restore_experiment(exp.experiment_id))
        return exp.experiment_id
    db = db_path(uri)
    location = (db.parent / "mlartifacts").as_uri() if db else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent creator won the race
        exp = retry(lambda: c.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def standard_tags() -> dict[str, str]:
    """MLflow's own source, git and user tags (the UI's Source, Version and User columns)."""
    import getpass
    v = versions()
    tags = {"mlflow.source.name": "harness sweep", "mlflow.source.type": "PROJECT"}
    if v.get("git_commit"):
        tags["mlflow.source.git.commit"] = v["git_commit"]
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        pass
    return tags


def create_parent(c, experiment_id: str, name: str, space_file: Path, space: Mapping[str, Any] | None = None,
                  extra_tags: Mapping[str, str] = ()) -> str:
    """The sweep's parent run: the search space as params (space.*) and as an artifact."""
    from mlflow.entities import Param
    tags = {"harness.role": "parent", "harness.hardware": hardware(), "harness.space": str(space_file),
            **standard_tags(), **dict(extra_tags)}
    run = retry(lambda: c.create_run(experiment_id, tags=tags, run_name=name))
    rid = run.info.run_id
    params = [Param(f"space.{k}", str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(_flatten(space or {}).items())]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        retry(lambda: c.log_batch(rid, params=params[i:i + MAX_PARAMS_PER_BATCH]))
    c.log_artifact(rid, str(space_file))
    c.log_dict(rid, versions(), "versions.json")
    return rid


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def set_status(c, run_id: str, status: str) -> None:
    """RUNNING or a terminal status (FINISHED / FAILED / KILLED)."""
    if status == "RUNNING":
        retry(lambda: c.update_run(run_id, status="RUNNING"))
    else:
        assert status in TERMINAL, status
        retry(lambda: c.set_terminated(run_id, status=status))


# ---------------------------------------------------------------- trial side

def find_child(c, experiment_id: str, parent_id: str, trial: str) -> str | None:
    runs = retry(lambda: c.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                       f"and tags.`harness.trial` = '{trial}'", max_results=5))
    return runs[0].info.run_id if runs else None


def create_child(c, experiment_id: str, parent_id: str, trial: str, method: str | None,
                 tags: Mapping[str, str] = ()) -> str:
    """A new child run for `trial` (tags only: the params are the resolved config, logged
    by `log_trial_params` once the trial has loaded its data)."""
    all_tags = {"mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.trial": trial,
                **standard_tags(), **dict(tags)}
    if method:
        all_tags["harness.method"] = method
    run = retry(lambda: c.create_run(experiment_id, tags=all_tags, run_name=trial))
    return run.info.run_id


def open_child(c, experiment_id: str, parent_id: str, trial: str, method: str | None,
               run_id: str | None = None, tags: Mapping[str, str] = ()) -> tuple[str, set[int]]:
    """(run id, epochs already logged) of the trial's child run: the given or found run (a
    retry or --resume continues it), else a new one. Marks it RUNNING."""
    run_id = run_id or find_child(c, experiment_id, parent_id, trial)
    if run_id is None:
        return create_child(c, experiment_id, parent_id, trial, method, tags), set()
    set_status(c, run_id, "RUNNING")
    return run_id, logged_epochs(c, run_id)


def set_node_tags(c, run_id: str, node: Mapping[str, str]) -> None:
    """Where the trial runs now (a retry on another node overwrites; every node is kept in
    harness.nodes)."""
    from mlflow.entities import RunTag
    seen = retry(lambda: c.get_run(run_id)).data.tags.get("harness.nodes", "")
    nodes = [n for n in seen.split(",") if n]
    if node["ray.node_ip"] not in nodes:
        nodes.append(node["ray.node_ip"])
    tags = [RunTag(k, v) for k, v in node.items()] + [RunTag("harness.nodes", ",".join(nodes))]
    retry(lambda: c.log_batch(run_id, tags=tags))


def layer_names(c, run_id: str) -> list[str]:
    """The trial's activation layers, from its `layers` param."""
    return retry(lambda: c.get_run(run_id)).data.params["layers"].split(",")


def planned_params(cfg) -> dict[str, str]:
    """The params a trial's config fixes before the trial starts: every key it sets (the
    keys left null are resolved by the trial from its data; `trial_params` logs them with
    the rest, and the values here are the same strings)."""
    return {k: str(v) for k, v in cfg.flat().items() if v is not None}


def log_planned_params(c, run_id: str, cfg) -> None:
    """`planned_params` on a new child run, so that a trial stopped before its first report
    still says what it was (dataset, model, method, seed, ...)."""
    from mlflow.entities import Param
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in sorted(planned_params(cfg).items())]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH]))


def trial_params(info: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params of a trial from `train.run`'s on_start info: the resolved config
    (dotted keys) and the calibration set (calib.*)."""
    from .config import Config
    params = {k: "None" if v is None else str(v) for k, v in Config.from_dict(info["config"]).flat().items()}
    cal = info["calibration"]
    params.update({"calib.n_images": str(cal["n_images"]),
                   "calib.class_counts": ",".join(str(n) for n in cal["class_counts"]),
                   "calib.sampling": cal["sampling"], "calib.augmented": str(cal["augmented"])})
    params["config.defaults_resolved"] = ",".join(sorted(info.get("defaults_resolved", {}))) or "none"
    params["layers"] = ",".join(info["layers"])
    return params


def log_trial_params(c, run_id: str, info: Mapping[str, Any]) -> None:
    """Params and the dataset input. Idempotent: a retried trial logs the same values again."""
    from mlflow.entities import Param
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in sorted(trial_params(info).items())]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH]))
    if info.get("data") and not retry(lambda: c.get_run(run_id)).inputs.dataset_inputs:
        log_dataset(c, run_id, info["data"])


def log_dataset(c, run_id: str, data: Mapping[str, Any]) -> None:
    """The trial's dataset as an MLflow dataset input (name, source, digest): the UI's
    Datasets column."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    source = str(data["source"])
    if "://" in source or source.startswith("/"):   # a file or URI: MLflow's own source types
        import warnings
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        with warnings.catch_warnings():   # "can be interpreted in multiple ways" (same type)
            warnings.simplefilter("ignore", UserWarning)
            src = resolve_dataset_source(source)
    else:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        src = CodeDatasetSource({"source": source})
    ds = MetaDataset(src, name=data["name"], digest=data["digest"])
    retry(lambda: c.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                               tags=[InputTag("mlflow.data.context", "train")])]))


def logged_epochs(c, run_id: str, key: str = "train/loss") -> set[int]:
    return {int(m.step) for m in retry(lambda: c.get_metric_history(run_id, key))}


def epoch_metrics(record: Mapping[str, Any], layers: list[str]) -> dict[str, float]:
    """The per-epoch metrics of a `train.run` record, named for MLflow (see module doc)."""
    out = {name: float(record[k]) for k, name in EPOCH_METRICS.items() if record.get(k) is not None}
    for t, acc in enumerate(record.get("snn_acc") or [], start=1):
        out[f"snn/{record['snn_split']}_acc_{t_name(t)}"] = float(acc)
    for key, prefix in LAYER_METRICS.items():
        for i, v in enumerate(record.get(key) or []):
            out[f"{prefix}/{layer_name(i, layers[i])}"] = float(v)
    return out


def log_epoch(c, run_id: str, record: Mapping[str, Any], layers: list[str]) -> None:
    from mlflow.entities import Metric
    ts, step = int(time.time() * 1000), int(record["epoch"])
    metrics = [Metric(k, v, ts, step) for k, v in epoch_metrics(record, layers).items()]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH]))


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The selected model's metrics (step 0), named apart from the per-epoch curves."""
    out = {f"final/snn_test_acc_{t_name(t)}": float(v) for t, v in result["snn_test_acc"].items()}
    out["final/ann_test_acc"] = float(result["ann_test_acc"])
    out["final/ann_val_acc"] = float(result["ann_val_acc"])
    if result.get("ann_noisy_test_acc") is not None:
        out["final/ann_noisy_test_acc"] = float(result["ann_noisy_test_acc"])
    out["final/best_epoch"] = float(result["best_epoch"])
    return out


def energy_metrics(result: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of result.json's `energy` block (harness.energy), per image:
    energy/{sops,spikes,uJ,ratio_to_ann,firing_rate}_T04 (step 0) and the same as series
    energy/<x>_by_T (step = T); energy/firing_rate/<l03_layer> (step = T);
    energy/{ann_uJ,ann_macs,first_layer_macs} (step 0). [] without an energy block."""
    e = result.get("energy")
    if not e or "by_T" not in e:
        return []
    out: list[tuple[str, float, int]] = [("energy/ann_uJ", float(e["ann_uJ"]), 0),
                                         ("energy/ann_macs", float(e["ann_macs"]), 0),
                                         ("energy/first_layer_macs", float(e["first_layer_macs"]), 0)]
    for t, rec in e["by_T"].items():
        for key in ("sops", "spikes", "uJ", "ratio_to_ann", "firing_rate"):
            if rec.get(key) is not None:
                out.append((f"energy/{key}_{t_name(int(t))}", float(rec[key]), 0))
                out.append((f"energy/{key}_by_T", float(rec[key]), int(t)))
        for i, (layer, rate) in enumerate(zip(e["layers"], e["per_layer"][t]["firing_rate"])):
            out.append((f"energy/firing_rate/{layer_name(i, layer)}", float(rate), int(t)))
    return out


def log_final(c, run_id: str, result: Mapping[str, Any], out_dir: Path,
              files: Iterable[str] = ("result.json", "residual_hist.json"), model: str = "mlflow") -> None:
    """Final metrics, the by-T series, the artifacts and the selected checkpoint (best.pt):
    `model` "mlflow" logs it as an MLflow PyTorch model (`log_model`), "checkpoint" as the
    plain artifact best.pt (sweeps' default: `tracking.model` of the search space)."""
    if model not in ("mlflow", "checkpoint"):
        raise ValueError(f"model = {model!r} (expected 'mlflow' or 'checkpoint')")
    from mlflow.entities import Metric

    from .report.figures import result_curves
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in final_metrics(result).items()]
    # accuracy against T as one series (step = T): MLflow draws the latency curve
    metrics += [Metric("final/snn_test_acc_by_T", float(v), ts, int(t)) for t, v in result["snn_test_acc"].items()]
    metrics += [Metric(k, v, ts, step) for k, v, step in energy_metrics(result)]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH]))
    for name in files:
        if (out_dir / name).exists():
            retry(lambda: c.log_artifact(run_id, str(out_dir / name)))
    with tempfile.TemporaryDirectory() as tmp:
        retry(lambda: c.log_artifact(run_id, str(result_curves(result, Path(tmp) / "curves.png"))))
    if (out_dir / "best.pt").exists():
        if model == "mlflow":
            log_model(c, run_id, result, out_dir / "best.pt")
        else:
            retry(lambda: c.log_artifact(run_id, str(out_dir / "best.pt")))


def log_model(c, run_id: str, result: Mapping[str, Any], best: Path) -> None:
    """The selected checkpoint as an MLflow PyTorch model (with an input example), so the
    UI lists it under Models. Only mlflow.pytorch.log_model's fluent API can do that."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    from .config import Config
    from .models import create_model
    cfg = Config.from_dict(result["config"])
    shape = result["input_shape"]
    model = create_model(cfg.model.arch, num_classes=result["num_classes"], in_chans=shape[0], L=cfg.model.L,
                         lam_init=cfg.model.lam_init or 1.0, grad=cfg.model.grad, cifar_stem=cfg.model.cifar_stem)
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
    model.eval()
    example = np.zeros((1, *shape), dtype=np.float32)
    prev = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(c.harness_uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(model, name="model", input_example=example,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                       "nq-snn-harness"])
    finally:
        mlflow.set_tracking_uri(prev)





# ---------------------------------------------------------------- the parent's summary

def summarise_parent(c, experiment_id: str, parent_id: str, label_keys: Iterable[str]) -> dict[str, float]:
    """Log on the parent run, from its FINISHED children's final metrics: the mean over
    seeds per method (`summary/<method>[/<setting:value ...>]/<metric>`, with `.../n`) and
    the paired difference NQ - QCFS by seed (`summary/delta/...`, with `.../n_pairs`), so the
    experiment's chart view shows the comparison. Tables with CIs: `harness report`."""
    from mlflow.entities import Metric

    from .methods import BASE_METHOD, DELTA_METHOD
    group_keys = [k for k in label_keys if k not in ("train.seed", "noise.mode")]
    runs = retry(lambda: c.search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"), max_results=50_000))
    cells: dict[tuple, dict[str, dict[str, float]]] = {}  # (method, group) -> seed -> metrics
    for r in runs:
        group = " ".join(f"{k.split('.')[-1]}:{r.data.params.get(k)}" for k in group_keys)
        finals = {k.removeprefix("final/"): v for k, v in r.data.metrics.items()
                  if k.startswith("final/") and k != "final/best_epoch" and not k.endswith("_by_T")}
        cells.setdefault((r.data.tags.get("harness.method", "?"), group), {})[r.data.params.get("train.seed")] = finals
    out: dict[str, float] = {}
    for (method, group), by_seed in cells.items():
        prefix = "/".join(p for p in ("summary", method, group) if p)
        out.update({f"{prefix}/{m}": _mean([s[m] for s in by_seed.values() if m in s])
                    for m in {m for s in by_seed.values() for m in s}})
        out[f"{prefix}/n"] = float(len(by_seed))
        base = cells.get((BASE_METHOD, group)) if method == DELTA_METHOD else None
        if base:
            seeds = sorted(set(by_seed) & set(base))
            dprefix = "/".join(p for p in ("summary", "delta", group) if p)
            for m in {m for s in seeds for m in by_seed[s] if m in base[s]}:
                out[f"{dprefix}/{m}"] = _mean([by_seed[s][m] - base[s][m] for s in seeds])
            out[f"{dprefix}/n_pairs"] = float(len(seeds))
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in sorted(out.items())]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        retry(lambda: c.log_batch(parent_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH]))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
