"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial.

Everything goes through an explicit `MlflowClient` (no fluent API: trials may share a
process with other threads). Only SQLite (`sqlite:///...`) and tracking servers
(`http(s)://...`) are accepted; MLflow's file store is refused.

Layout read by `harness report`:
  experiment  = sweep name
  parent run  tags harness.role=parent, harness.hardware; artifacts: search space, versions.json
  child run   tags mlflow.parentRunId, harness.role=trial, harness.trial, harness.method;
              params = Config.flat(); per-epoch metrics (step = epoch); final metrics;
              artifacts result.json, residual_hist.json, best.pt, curves.png
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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
                 "eval_s": "time/eval_s"}
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
        return f"sqlite:///{Path(path).expanduser().absolute().as_posix()}"
    raise TrackingError(f"--tracking-uri {uri!r} is not supported (expected sqlite:///PATH.db or "
                        "http(s)://SERVER; MLflow's file store is not used)")


def db_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client(uri: str):
    import logging
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


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


def create_parent(c, experiment_id: str, name: str, space_file: Path, extra_tags: Mapping[str, str] = ()) -> str:
    tags = {"harness.role": "parent", "harness.hardware": hardware(), "harness.space": str(space_file),
            **dict(extra_tags)}
    run = retry(lambda: c.create_run(experiment_id, tags=tags, run_name=name))
    rid = run.info.run_id
    c.log_artifact(rid, str(space_file))
    c.log_dict(rid, versions(), "versions.json")
    return rid


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


def create_child(c, experiment_id: str, parent_id: str, trial: str, cfg) -> str:
    """A new child run for `trial` (tags only: the params are the resolved config, logged
    by `log_trial_params` once the trial has loaded its data)."""
    tags = {"mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.trial": trial,
            "harness.method": cfg.method, "harness.hardware": hardware()}
    run = retry(lambda: c.create_run(experiment_id, tags=tags, run_name=trial))
    return run.info.run_id


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
    return params


def log_trial_params(c, run_id: str, info: Mapping[str, Any]) -> None:
    """Idempotent: a retried trial logs the same values again."""
    from mlflow.entities import Param
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in sorted(trial_params(info).items())]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH]))


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
              files: Iterable[str] = ("result.json", "residual_hist.json", "best.pt")) -> None:
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in final_metrics(result).items()]
    # accuracy against T as one series (step = T): MLflow draws the latency curve
    metrics += [Metric("final/snn_test_acc_by_T", float(v), ts, int(t)) for t, v in result["snn_test_acc"].items()]
    metrics += [Metric(k, v, ts, step) for k, v, step in energy_metrics(result)]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        retry(lambda: c.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH]))
    plot_curves(result, out_dir / "curves.png")
    for name in (*files, "curves.png"):
        p = out_dir / name
        if p.exists():
            retry(lambda: c.log_artifact(run_id, str(p)))


def plot_curves(result: Mapping[str, Any], path: Path) -> Path:
    """ANN vs SNN (selection T) accuracy per epoch, plus the mean delta."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist = [r for r in result["history"] if r.get("ann_test_acc") is not None]
    ep = [r["epoch"] for r in hist]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(ep, [r["ann_test_acc"] for r in hist], "o-", label="ANN test")
    ax.plot(ep, [r["ann_val_acc"] for r in hist], "s--", label="ANN val", alpha=0.6)
    ax.plot(ep, [r["snn_sel_acc"] for r in hist], "^-",
            label=f"SNN {result.get('selected_on', 'val')} T={result.get('select_T', '?')}")
    ax.axvline(result["best_epoch"], color="grey", lw=0.8, ls=":", label="selected epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result['method']} {result['config']['model']['arch']} on {result['config']['data']['name']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
