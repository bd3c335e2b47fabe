"""MLflow store -> tidy pandas frames.

One row per FINISHED child ("trial") run of an experiment, with the
parameters that matter for the report parsed into plain columns, plus
per-run metric histories and lazily downloaded ``residual_hist.json``
artifacts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

__all__ = [
    "ReportError", "Collected", "collect", "default_tracking_uri", "SETTINGS",
    "SETTING_LABELS", "T_COLUMNS_RE", "dataset_key", "dataset_label", "arch_label",
    "sanitize", "method_order", "arch_order",
]

log = logging.getLogger(__name__)


class ReportError(Exception):
    """A problem that ends the report with exit code 2 (one-line message)."""


# Report column -> MLflow param.  These are the settings that become extra
# row keys when (and only when) they vary within an experiment.
SETTINGS: dict[str, str] = {
    "L": "model.L",
    "delta": "noise.delta",
    "tau": "noise.tau",
    "scale": "noise.scale",
    "lam_init": "model.lam_init",
    "epochs": "train.epochs",
    "residual": "noise.residual",
}
SETTING_LABELS = {"L": "L", "delta": "δ", "tau": "τ", "scale": "scale",
                  "lam_init": "λ0", "epochs": "epochs", "residual": "residual"}
# Noise settings only mean something for some methods; for the others the
# value is masked ("—") so that e.g. QCFS runs do not split on noise.tau.
_RELEVANT = {
    "delta": {"NQ-fixed"},
    "tau": {"NQ"},
    "residual": {"NQ"},
    "scale": {"NQ", "NQ-fixed"},
}
NA = "—"

T_COLUMNS_RE = re.compile(r"^T(\d+)$")
_FINAL_T_RE = re.compile(r"^snn_test_acc_T(\d+)$")

_METHOD_BY_MODE = {"qcfs": "QCFS", "layerwise": "NQ", "fixed": "NQ-fixed"}
_METHOD_ORDER = ["QCFS", "NQ", "NQ-fixed"]
_ARCH_LABELS = {"vgg16": "VGG-16", "resnet18": "ResNet-18", "resnet20": "ResNet-20",
                "cnn_small": "CNN-small"}
_ARCH_ORDER = list(_ARCH_LABELS)
_DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "Digits",
                   "synthetic": "Synthetic"}


def method_order(m: str) -> tuple:
    return (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), str(m))


def arch_order(a: str) -> tuple:
    return (_ARCH_ORDER.index(a) if a in _ARCH_ORDER else len(_ARCH_ORDER), str(a))


def arch_label(arch: str) -> str:
    return _ARCH_LABELS.get(arch, str(arch))


def sanitize(name: str) -> str:
    """A string that is safe as (part of) a file name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "run"


def dataset_key(name: str | None, root: str | None) -> str:
    """Key used to match published rows: cifar10/cifar100/... ."""
    name = (name or "").strip().lower()
    if name == "imagefolder":
        r = (root or "").lower()
        if "cifar100" in r or "cifar-100" in r:
            return "cifar100"
        if "cifar10" in r or "cifar-10" in r:
            return "cifar10"
        base = Path(root or "imagefolder").name or "imagefolder"
        return sanitize(base).lower()
    return name or "unknown"


def dataset_label(name: str | None, root: str | None, tag: str | None = None) -> str:
    if tag is not None and isinstance(tag, str) and tag.strip():
        return tag.strip()
    key = dataset_key(name, root)
    label = _DATASET_LABELS.get(key, key)
    if (name or "").lower() == "imagefolder" and key in ("cifar10", "cifar100"):
        label += " (imagefolder)"
    return label


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve()}/mlflow.db"


def _check_store_exists(uri: str) -> None:
    """Refuse to open (and thereby create) a store that is not there."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///rel/path.db (relative) or sqlite:////abs/path.db (absolute)
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        if path and path != ":memory:" and not Path(path).exists():
            raise ReportError(f"no MLflow store at {path} (tracking URI {uri})")
    elif parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        if not Path(path).exists():
            raise ReportError(f"no MLflow store at {path}")


def _norm_value(v) -> str:
    """Param string -> canonical display string ('4.0' -> '4', '0.10' -> '0.1')."""
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
        return NA
    s = str(v).strip()
    if s in ("", "None", "nan"):
        return NA
    try:
        f = float(s)
    except ValueError:
        return s
    if s.lower() in ("true", "false"):
        return s
    return f"{f:g}"


def setting_sort_key(v: str):
    """Numeric-aware sort key for setting values."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


@dataclass
class Collected:
    experiment: str
    tracking_uri: str
    runs: pd.DataFrame                      # tidy: one row per finished trial run
    parents: pd.DataFrame                   # parent runs (raw search_runs columns)
    n_child_total: int                      # child runs of any status
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)  # run_id -> per-epoch
    _hist_cache: dict[str, dict | None] = field(default_factory=dict, repr=False)

    @property
    def t_values(self) -> list[int]:
        return sorted(int(m.group(1)) for c in self.runs.columns
                      if (m := T_COLUMNS_RE.match(str(c))) and self.runs[c].notna().any())

    @property
    def varying(self) -> list[str]:
        """Settings (report column names) that take >1 value among the runs."""
        from .tables import varying_settings
        return varying_settings(self.runs)

    def residual_hist(self, run_id: str) -> dict | None:
        """Parsed residual_hist.json of a run, or None if it has none."""
        if run_id not in self._hist_cache:
            self._hist_cache[run_id] = _download_json(self.tracking_uri, run_id,
                                                      "residual_hist.json")
        return self._hist_cache[run_id]


def _download_json(tracking_uri: str, run_id: str, artifact_path: str) -> dict | None:
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, tracking_uri=tracking_uri,
                dst_path=tmp)
            with open(local) as fh:
                return json.load(fh)
        except Exception as exc:  # missing artifact, unreadable JSON, ...
            log.debug("no %s for run %s: %s", artifact_path, run_id, exc)
            return None


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if name in df.columns:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _existing_experiments(client) -> list[str]:
    names = []
    for exp in client.search_experiments():
        if exp.name == "Default":
            # the store's automatic experiment: list it only if it was used
            if not client.search_runs([exp.experiment_id], max_results=1):
                continue
        names.append(exp.name)
    return sorted(names)


def tidy_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """search_runs frame of finished child runs -> tidy report frame."""
    out = pd.DataFrame(index=raw.index)
    out["run_id"] = raw["run_id"].astype(str)
    trial = _col(raw, "tags.harness.trial").astype(object)
    runname = _col(raw, "tags.mlflow.runName").astype(object)
    out["trial"] = [t if isinstance(t, str) and t else (r if isinstance(r, str) and r
                                                          else rid[:8])
                    for t, r, rid in zip(trial, runname, out["run_id"])]
    out["parent_id"] = _col(raw, "tags.mlflow.parentRunId").astype(object)
    names = _col(raw, "params.data.name").astype(object)
    roots = _col(raw, "params.data.root").astype(object)
    tags = _col(raw, "tags.harness.dataset_label").astype(object)
    out["data_name"] = [str(n) if isinstance(n, str) else "unknown" for n in names]
    out["data_root"] = [str(r) if isinstance(r, str) else "" for r in roots]
    out["dataset_key"] = [dataset_key(n, r) for n, r in zip(out["data_name"], out["data_root"])]
    out["dataset"] = [dataset_label(n, r, t if isinstance(t, str) else None)
                      for n, r, t in zip(out["data_name"], out["data_root"], tags)]
    out["arch"] = [str(a) if isinstance(a, str) else "unknown"
                   for a in _col(raw, "params.model.arch").astype(object)]
    modes = _col(raw, "params.noise.mode").astype(object)
    mtags = _col(raw, "tags.harness.method").astype(object)
    out["method"] = [t if isinstance(t, str) and t else _METHOD_BY_MODE.get(str(m), str(m))
                     for t, m in zip(mtags, modes)]
    out["seed"] = [_norm_value(s) for s in _col(raw, "params.train.seed").astype(object)]
    for name, param in SETTINGS.items():
        vals = [_norm_value(v) for v in _col(raw, f"params.{param}").astype(object)]
        rel = _RELEVANT.get(name)
        if rel is not None:
            vals = [v if m in rel else NA for v, m in zip(vals, out["method"])]
        out[name] = vals
    out["select_on"] = [_norm_value(v) for v in _col(raw, "params.eval.select_on").astype(object)]
    out["select_T"] = [_norm_value(v) for v in _col(raw, "params.eval.select_T").astype(object)]
    out["ann"] = pd.to_numeric(_col(raw, "metrics.best_ann_test_acc"), errors="coerce")
    out["best_epoch"] = pd.to_numeric(_col(raw, "metrics.best_epoch"), errors="coerce")
    ts = sorted(int(m.group(1)) for c in raw.columns
                if (m := _FINAL_T_RE.match(c.removeprefix("metrics."))) and c.startswith("metrics."))
    for t in ts:
        out[f"T{t}"] = pd.to_numeric(raw[f"metrics.snn_test_acc_T{t}"], errors="coerce")
    # unique, file-name-safe trial names
    safe = [sanitize(t) for t in out["trial"]]
    dup = pd.Series(safe).duplicated(keep=False).to_numpy()
    out["trial_file"] = [f"{s}_{rid[:8]}" if d else s
                         for s, d, rid in zip(safe, dup, out["run_id"])]
    order = sorted(range(len(out)), key=lambda i: (
        out["dataset"].iat[i], arch_order(out["arch"].iat[i]), method_order(out["method"].iat[i]),
        tuple(setting_sort_key(out[s].iat[i]) for s in SETTINGS),
        setting_sort_key(out["seed"].iat[i]), out["trial"].iat[i]))
    out = out.iloc[order].reset_index(drop=True)
    return out


_HISTORY_KEYS = re.compile(
    r"^(train_loss|train_acc|lr|ann_val_acc|ann_test_acc|snn_val_acc_T\d+|"
    r"snn_test_acc_sel_T\d+|delta_l\d+|residual_mean_l\d+|residual_std_l\d+|epoch_s|calib_s)$")


def _histories(client, raw: pd.DataFrame, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    metric_cols = [c for c in raw.columns if c.startswith("metrics.")]
    by_id = raw.set_index(raw["run_id"].astype(str))
    out: dict[str, pd.DataFrame] = {}
    for rid in runs["run_id"]:
        row = by_id.loc[rid]
        keys = [c.removeprefix("metrics.") for c in metric_cols
                if pd.notna(row[c]) and _HISTORY_KEYS.match(c.removeprefix("metrics."))]
        series = {}
        for key in keys:
            hist = client.get_metric_history(rid, key)
            if hist:
                s = pd.Series({int(m.step): float(m.value) for m in
                               sorted(hist, key=lambda m: (m.step, m.timestamp))})
                series[key] = s
        df = pd.DataFrame(series).sort_index()
        df.index.name = "epoch"
        out[rid] = df
    return out


def collect(experiment: str, tracking_uri: str, *, histories: bool = True) -> Collected:
    """Load an experiment's finished trial runs.  Raises ReportError."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _check_store_exists(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        existing = _existing_experiments(client)
        raise ReportError(f"no experiment '{experiment}' (existing: "
                          f"{', '.join(existing) if existing else 'none'})")
    prev_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(tracking_uri)
        raw = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas",
                                 max_results=100000)
    finally:
        mlflow.set_tracking_uri(prev_uri)
    if raw.empty:
        raise ReportError(f"experiment '{experiment}' has no finished trial runs")
    parent_col = _col(raw, "tags.mlflow.parentRunId").astype(object)
    role = _col(raw, "tags.harness.role").astype(object)
    is_child = parent_col.map(lambda v: isinstance(v, str) and bool(v)) & (role != "parent")
    parents = raw[(role == "parent") | ~is_child].reset_index(drop=True)
    child = raw[is_child]
    finished = child[child["status"] == "FINISHED"].reset_index(drop=True)
    if finished.empty:
        raise ReportError(f"experiment '{experiment}' has no finished trial runs")
    runs = tidy_runs(finished)
    col = Collected(experiment=experiment, tracking_uri=tracking_uri, runs=runs,
                    parents=parents, n_child_total=int(is_child.sum()))
    if histories:
        col.histories = _histories(client, finished, runs)
    return col
