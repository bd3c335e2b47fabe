"""MLflow store -> tidy pandas frames.

One row per FINISHED child ("trial") run of an experiment, with the
parameters that matter for the report parsed into plain columns, plus the
per-epoch metric histories (:class:`Histories`) and the ``residual_hist.json``
artifacts, read on demand (from disk when the artifact store is local).

A sqlite store is read in bulk with the standard library's sqlite3 (a handful
of queries, mlflow not imported: :class:`_SqliteStore`); any other store through
the MLflow client, one request per run and metric.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from ..errors import BAD_INPUT, HarnessError
from ..methods import METHOD_BY_MODE, METHOD_ORDER

__all__ = [
    "ReportError", "Collected", "collect", "default_tracking_uri", "SETTINGS",
    "SETTING_LABELS", "T_COLUMNS_RE", "dataset_key", "dataset_label", "arch_label",
    "sanitize", "method_order", "arch_order", "EXCLUDED_PARAMS", "KEY_PARAMS",
    "relevant_methods", "setting_label", "is_setting_column", "tidy_runs", "parent_table",
    "select_parent", "FINAL_METRICS", "dataset_display", "Histories",
]

log = logging.getLogger(__name__)


class ReportError(HarnessError):
    """A problem that ends the report with exit code 2 (one-line message)."""

    kind = "report error"
    exit_code = BAD_INPUT


# Report column -> MLflow param for the settings with a short column name.  Every
# other parameter of the trial runs is a setting under its own dotted name
# (e.g. "train.lr", "model.grad"); each setting that varies among the reported
# runs becomes a row key (see tables.varying_settings).
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
_SHORT = {param: col for col, param in SETTINGS.items()}
# Parameters that are NOT settings (never row keys), and why.
EXCLUDED_PARAMS: dict[str, str] = {
    "train.seed": "the replicate: cells aggregate over seeds",
    "train.threads": "CPU threads: speed only",
    "data.eval_batch_size": "evaluation batch size: evaluation runs in eval mode",
    "data.download": "whether the data set may be downloaded",
    "eval.T": "the list of evaluated T: each T is its own column",
    "calib.class_counts": "follows from the calibration subset drawn per seed; "
                          "listed in the protocol section",
}
# Parameters shown in their own columns (dataset block, Arch, Method).
KEY_PARAMS = {"model.arch": "arch", "noise.mode": "method"}
# Noise settings only mean something for some methods; for the others the
# value is masked ("—") so that e.g. QCFS runs do not split on noise.tau.
_RELEVANT = {
    "delta": {"NQ-fixed"},
    "tau": {"NQ"},
    "residual": {"NQ"},
    "scale": {"NQ", "NQ-fixed"},
    "noise.calib_samples": {"NQ"},
    "noise.calib_augment": {"NQ"},
}
_RELEVANT_PREFIX = {"calib.": {"NQ"}, "noise.": {"NQ", "NQ-fixed"}}


def relevant_methods(col: str) -> set[str] | None:
    """Methods for which a setting column means something (None: all methods)."""
    if col in _RELEVANT:
        return _RELEVANT[col]
    for prefix, methods in _RELEVANT_PREFIX.items():
        if col.startswith(prefix):
            return methods
    return None


def setting_label(col: str) -> str:
    """Display name of a setting column ("L", "δ", ..., or the parameter name)."""
    return SETTING_LABELS.get(col, col)


def is_setting_column(col: str) -> bool:
    """Tidy-frame columns that hold settings: the short ones and dotted parameter names."""
    return col in SETTINGS or "." in str(col)


NA = "—"

T_COLUMNS_RE = re.compile(r"^T(\d+)$")
# final metrics of the selected model (step 0)
_FINAL_T_RE = re.compile(r"^final/snn_test_acc_T(\d+)$")
FINAL_METRICS = {"ann": "final/ann_test_acc", "ann_val": "final/ann_val_acc",
                 "ann_noisy": "final/ann_noisy_test_acc", "best_epoch": "final/best_epoch"}
# energy of the final SNN evaluation (harness.energy, per image, step 0): columns
# E<t> (µJ at T = t), Eratio<t> (that / the ANN's µJ) and ann_uJ
_ENERGY_T_RE = re.compile(r"^energy/(uJ|ratio_to_ann)_T(\d+)$")
_ENERGY_PREFIX = {"uJ": "E", "ratio_to_ann": "Eratio"}
ENERGY_ANN = "energy/ann_uJ"

_ARCH_LABELS = {"vgg16": "VGG-16", "resnet18": "ResNet-18", "resnet20": "ResNet-20",
                "cnn_small": "CNN-small"}
_ARCH_ORDER = list(_ARCH_LABELS)
_DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "Digits",
                   "synthetic": "Synthetic"}


def method_order(m: str) -> tuple:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), str(m))


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


_IMAGEFOLDER = " (imagefolder)"


def dataset_label(name: str | None, root: str | None, tag: str | None = None) -> str:
    if tag is not None and isinstance(tag, str) and tag.strip():
        return tag.strip()
    key = dataset_key(name, root)
    label = _DATASET_LABELS.get(key, key)
    if (name or "").lower() == "imagefolder" and key in ("cifar10", "cifar100"):
        label += _IMAGEFOLDER
    return label


def dataset_display(key: str, label: str | None = None) -> str:
    """The data set's name for captions: the label without the source suffix that
    :func:`dataset_label` adds ("CIFAR-10 (imagefolder)" -> "CIFAR-10")."""
    if label:
        return label[:-len(_IMAGEFOLDER)] if label.endswith(_IMAGEFOLDER) else label
    return _DATASET_LABELS.get(key, str(key))


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
    runs: pd.DataFrame                      # tidy: one row per FINISHED trial of the parent
    parents: pd.DataFrame                   # parent runs (raw search_runs columns)
    n_child_total: int                      # trial runs of the selected parent, any status
    histories: Mapping[str, pd.DataFrame] = field(default_factory=dict)  # run_id -> per-epoch
    trials: pd.DataFrame | None = None      # tidy: every trial of the parent, with "status"
    parent_id: str | None = None            # the reported parent run
    parent_ids: list[str] = field(default_factory=list)   # all parent runs, newest first
    parent_given: bool = False              # selected with --parent (else: the newest)
    artifact_uris: dict[str, str] = field(default_factory=dict)   # run_id -> artifact URI
    _hist_cache: dict[str, dict | None] = field(default_factory=dict, repr=False)

    @property
    def status_counts(self) -> dict[str, int]:
        """Trial runs of the reported parent by status (FINISHED/FAILED/KILLED/RUNNING first)."""
        counts = {s: 0 for s in ("FINISHED", "FAILED", "KILLED", "RUNNING")}
        if self.trials is not None:
            for s, k in self.trials["status"].value_counts().items():
                counts[str(s)] = int(k)
        else:
            counts["FINISHED"] = len(self.runs)
        return counts

    def residual_hist(self, run_id: str, cache: bool = True) -> dict | None:
        """Parsed residual_hist.json of a run, or None if it has none; kept for the next
        call unless ``cache`` is False (a pass over many runs that reads each once)."""
        if run_id in self._hist_cache:
            return self._hist_cache[run_id]
        local = _local_artifact(self.artifact_uris.get(run_id), "residual_hist.json")
        data = (_read_json(local) if local is not None else
                _download_json(self.tracking_uri, run_id, "residual_hist.json"))
        if cache:
            self._hist_cache[run_id] = data
        return data


def _local_artifact(artifact_uri: str | None, name: str) -> Path | None:
    """The file of an artifact in a local artifact store (``file:`` URI or a path), or
    None when the store is not local (then it is downloaded through MLflow)."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        from urllib.request import url2pathname
        base = Path(url2pathname(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        base = Path(artifact_uri)
    else:
        return None
    return base / name


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        log.debug("no %s: %s", path, exc)
        return None


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
    """search_runs frame of child runs -> tidy report frame (one row per run).

    Settings: every ``params.*`` column except :data:`EXCLUDED_PARAMS` and
    :data:`KEY_PARAMS`, named by its short name (``SETTINGS``) or else by the
    parameter name; values are canonical strings, masked ("—") for methods they
    do not apply to (:func:`relevant_methods`).
    """
    out = pd.DataFrame(index=raw.index)
    _add_run_columns(out, raw)
    _add_dataset_columns(out, raw)
    _add_arch_method_seed(out, raw)
    setting_cols = _setting_columns(raw)
    _add_settings(out, raw, setting_cols)
    _add_protocol_columns(out, raw)
    _add_final_metrics(out, raw)
    _add_trial_file(out)
    return _sort_runs(out, setting_cols)


def _add_run_columns(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """run_id, status, trial (its name: the harness tag, else the run name, else the
    run id's start) and parent_id."""
    out["run_id"] = raw["run_id"].astype(str)
    out["status"] = _col(raw, "status").astype(object).map(
        lambda v: str(v) if isinstance(v, str) and v else "UNKNOWN")
    trial = _col(raw, "tags.harness.trial").astype(object)
    runname = _col(raw, "tags.mlflow.runName").astype(object)
    out["trial"] = [t if isinstance(t, str) and t else (r if isinstance(r, str) and r
                                                          else rid[:8])
                    for t, r, rid in zip(trial, runname, out["run_id"])]
    out["parent_id"] = _col(raw, "tags.mlflow.parentRunId").astype(object)


def _add_dataset_columns(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """data_name, data_root, dataset_key and dataset (the display label)."""
    names = _col(raw, "params.data.name").astype(object)
    roots = _col(raw, "params.data.root").astype(object)
    tags = _col(raw, "tags.harness.dataset_label").astype(object)
    out["data_name"] = [str(n) if isinstance(n, str) else "unknown" for n in names]
    out["data_root"] = [str(r) if isinstance(r, str) and r != "None" else "" for r in roots]
    out["dataset_key"] = [dataset_key(n, r) for n, r in zip(out["data_name"], out["data_root"])]
    out["dataset"] = [dataset_label(n, r, t if isinstance(t, str) else None)
                      for n, r, t in zip(out["data_name"], out["data_root"], tags)]


def _add_arch_method_seed(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """arch, method (the harness tag, else named after noise.mode) and seed."""
    out["arch"] = [str(a) if isinstance(a, str) else "unknown"
                   for a in _col(raw, "params.model.arch").astype(object)]
    modes = _col(raw, "params.noise.mode").astype(object)
    mtags = _col(raw, "tags.harness.method").astype(object)
    out["method"] = [t if isinstance(t, str) and t else METHOD_BY_MODE.get(str(m), str(m))
                     for t, m in zip(mtags, modes)]
    out["seed"] = [_norm_value(s) for s in _col(raw, "params.train.seed").astype(object)]


def _setting_columns(raw: pd.DataFrame) -> list[str]:
    """The setting columns of the tidy frame: the short ones (:data:`SETTINGS`), then
    every other parameter that is neither excluded nor a key parameter, by name."""
    params = sorted(c.removeprefix("params.") for c in raw.columns if c.startswith("params."))
    return list(SETTINGS) + [_SHORT.get(p, p) for p in params
                             if p not in EXCLUDED_PARAMS and p not in KEY_PARAMS
                             and p not in _SHORT]


def _add_settings(out: pd.DataFrame, raw: pd.DataFrame, setting_cols: list[str]) -> None:
    """One column per setting: canonical values, masked for the methods they do not
    apply to."""
    for name in setting_cols:
        param = SETTINGS.get(name, name)
        vals = [_norm_value(v) for v in _col(raw, f"params.{param}").astype(object)]
        rel = relevant_methods(name)
        if rel is not None:
            vals = [v if m in rel else NA for v, m in zip(vals, out["method"])]
        out[name] = vals


def _add_protocol_columns(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """select_on, select_T and class_counts (the calibration subset): parameters that
    are not settings but are listed in the protocol section."""
    out["select_on"] = [_norm_value(v) for v in _col(raw, "params.eval.select_on").astype(object)]
    out["select_T"] = [_norm_value(v) for v in _col(raw, "params.eval.select_T").astype(object)]
    rel = relevant_methods("calib.class_counts")
    out["class_counts"] = [_norm_value(v) if rel is None or m in rel else NA for v, m in
                           zip(_col(raw, "params.calib.class_counts").astype(object),
                               out["method"])]


def _add_final_metrics(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """The final metrics of the selected model: ann, ann_val, ann_noisy, best_epoch and
    one column T<t> per evaluated T (ascending)."""
    for name, key in FINAL_METRICS.items():
        out[name] = pd.to_numeric(_col(raw, f"metrics.{key}"), errors="coerce")
    ts = sorted({int(m.group(1)): c for c in raw.columns
                 if c.startswith("metrics.") and (m := _FINAL_T_RE.match(c.removeprefix("metrics.")))
                 }.items())
    for t, c in ts:
        out[f"T{t}"] = pd.to_numeric(raw[c], errors="coerce")
    _add_energy(out, raw)


def _add_energy(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    """Energy columns (E<t>, Eratio<t>, ann_uJ) where the runs recorded energy; runs
    without it (older harness, or an unrecordable net) hold NaN."""
    found = sorted(((_ENERGY_PREFIX[m.group(1)], int(m.group(2))), c) for c in raw.columns
                   if c.startswith("metrics.")
                   and (m := _ENERGY_T_RE.match(c.removeprefix("metrics."))))
    for (prefix, t), c in found:
        out[f"{prefix}{t}"] = pd.to_numeric(raw[c], errors="coerce")
    if found or f"metrics.{ENERGY_ANN}" in raw.columns:
        out["ann_uJ"] = pd.to_numeric(_col(raw, f"metrics.{ENERGY_ANN}"), errors="coerce")


def _add_trial_file(out: pd.DataFrame) -> None:
    """trial_file: unique, file-name-safe trial names."""
    safe = [sanitize(t) for t in out["trial"]]
    dup = pd.Series(safe).duplicated(keep=False).to_numpy()
    out["trial_file"] = [f"{s}_{rid[:8]}" if d else s
                         for s, d, rid in zip(safe, dup, out["run_id"])]


def _sort_runs(out: pd.DataFrame, setting_cols: list[str]) -> pd.DataFrame:
    """Rows in report order: dataset, arch, method, settings, seed, trial."""
    ds, arch, meth, seed, trial = (out[c].tolist() for c in
                                   ("dataset", "arch", "method", "seed", "trial"))
    setting_vals = [out[s].tolist() for s in setting_cols]
    order = sorted(range(len(out)), key=lambda i: (
        ds[i], arch_order(arch[i]), method_order(meth[i]),
        tuple(setting_sort_key(v[i]) for v in setting_vals),
        setting_sort_key(seed[i]), trial[i]))
    return out.iloc[order].reset_index(drop=True)


# The per-epoch metrics the report reads (its figures use no others): ANN and SNN
# accuracy, the δ each layer was trained with, and the epoch times.  train/*,
# delta_next/* and residual/* are logged but not read.
_HISTORY_KEYS = re.compile(
    r"^(ann/(val_acc|test_acc|noisy_test_acc)|snn/(val|test)_acc_T\d+|"
    r"delta/l\d+_.+|time/(epoch|train|calib|eval)_s)$")
_HISTORY_PREFIXES = ("ann/", "snn/", "delta/", "time/")


class Histories(Mapping):
    """Per-epoch metrics of the reported runs: run id -> frame indexed by epoch (step),
    one column per metric key.  Held as one long frame (:attr:`long`: run_id, key,
    step, value; categorical run_id and key) and pivoted per run only when a run is
    looked up, so that figures over many runs can work on :attr:`long` directly."""

    def __init__(self, long: pd.DataFrame | None = None, run_ids: list[str] | None = None):
        if long is None:
            long = pd.DataFrame({"run_id": pd.Categorical([]), "key": pd.Categorical([]),
                                 "step": np.zeros(0, dtype="int64"),
                                 "value": np.zeros(0, dtype=float)})
        self.long = long.reset_index(drop=True)
        self._ids = list(dict.fromkeys([*(run_ids or []), *map(str, self.long["run_id"]
                                                                .cat.categories)]))
        codes = self.long["run_id"].cat.codes.to_numpy()
        cats = list(self.long["run_id"].cat.categories)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(cats) + 1))
        self._rows = {str(c): order[bounds[i]:bounds[i + 1]] for i, c in enumerate(cats)}
        self._cache: dict[str, pd.DataFrame] = {}

    def __getitem__(self, run_id: str) -> pd.DataFrame:
        run_id = str(run_id)
        if run_id not in self._ids:
            raise KeyError(run_id)
        if run_id not in self._cache:
            rows = self.long.iloc[self._rows.get(run_id, np.zeros(0, dtype=int))]
            if rows.empty:
                df = pd.DataFrame(index=pd.Index([], name="epoch", dtype="int64"))
            else:
                df = pd.DataFrame({"step": rows["step"].to_numpy(),
                                   "key": rows["key"].astype(str).to_numpy(),
                                   "value": rows["value"].to_numpy()}) \
                    .pivot(index="step", columns="key", values="value").sort_index()
                df.columns.name = None
                df.index = df.index.astype("int64")
                df.index.name = "epoch"
            self._cache[run_id] = df
        return self._cache[run_id]

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def keys_like(self, pattern: str) -> list[str]:
        """The metric keys (over all runs) that match a regular expression."""
        rx = re.compile(pattern)
        return [k for k in self.long["key"].cat.categories if rx.match(str(k))]

    def select(self, keys) -> pd.DataFrame:
        """Rows of the long frame with these keys (run_id and key as plain strings)."""
        sub = self.long[self.long["key"].isin(list(keys))]

        def strings(col: str) -> np.ndarray:   # categories picked by code: no str() per row
            cats = np.asarray([str(c) for c in sub[col].cat.categories], dtype=object)
            return cats[sub[col].cat.codes.to_numpy()]

        return pd.DataFrame({"run_id": strings("run_id"), "key": strings("key"),
                             "step": sub["step"].to_numpy(), "value": sub["value"].to_numpy()})

    @classmethod
    def from_records(cls, run_codes: np.ndarray, run_ids: list[str], key_codes: np.ndarray,
                     keys: list[str], steps: np.ndarray, timestamps: np.ndarray,
                     values: np.ndarray) -> "Histories":
        """From parallel arrays (codes into ``run_ids`` and ``keys``); of several values
        at one (run, key, step) the one logged last (largest timestamp) is kept, as the
        client API's order gives."""
        order = np.lexsort((timestamps, steps, key_codes, run_codes))
        rc, kc, st, va = (run_codes[order], key_codes[order], steps[order], values[order])
        last = np.ones(len(rc), dtype=bool)
        if len(rc) > 1:
            same = (rc[1:] == rc[:-1]) & (kc[1:] == kc[:-1]) & (st[1:] == st[:-1])
            last[:-1] = ~same
        long = pd.DataFrame({
            "run_id": pd.Categorical.from_codes(rc[last], categories=run_ids),
            "key": pd.Categorical.from_codes(kc[last], categories=keys),
            "step": st[last].astype("int64"), "value": va[last].astype(float)})
        # keep only the keys that occur (a categorical with unused keys pivots wider)
        long["key"] = long["key"].cat.remove_unused_categories()
        return cls(long, run_ids)


def _histories(client, raw: pd.DataFrame, runs: pd.DataFrame, progress=None) -> Histories:
    """Metric histories through the client API: one request per run and key (any
    tracking store; the fallback of :meth:`_SqliteStore.histories`); ``progress()`` is
    called after each run, if given."""
    metric_cols = [c for c in raw.columns if c.startswith("metrics.")]
    by_id = raw.set_index(raw["run_id"].astype(str))
    run_ids = [str(r) for r in runs["run_id"]]
    keys: dict[str, int] = {}
    rc, kc, st, ts, va = [], [], [], [], []
    for i, rid in enumerate(run_ids):
        if progress is not None and i:
            progress()
        row = by_id.loc[rid]
        for c in metric_cols:
            key = c.removeprefix("metrics.")
            if not _HISTORY_KEYS.match(key) or pd.isna(row[c]):
                continue
            for m in client.get_metric_history(rid, key):
                rc.append(i)
                kc.append(keys.setdefault(key, len(keys)))
                st.append(int(m.step))
                ts.append(int(m.timestamp))
                va.append(float(m.value))
    return Histories.from_records(np.asarray(rc, dtype=np.int64), run_ids,
                                  np.asarray(kc, dtype=np.int64), list(keys),
                                  np.asarray(st, dtype=np.int64), np.asarray(ts, dtype=np.int64),
                                  np.asarray(va, dtype=float))


# ------------------------------------------------------------------ bulk sqlite reading
def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` tracking URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if not path or path == ":memory:" else path


def _key_range(prefix: str) -> str:
    """SQL condition: ``key`` starts with ``prefix`` (a range, so that the primary key
    index on (key, …) is used)."""
    hi = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return f"(key >= '{prefix}' AND key < '{hi}')"


class _SqliteStore:
    """Read-only bulk access to a sqlite MLflow tracking store, through the standard
    library's sqlite3: the tables MLflow writes (experiments, runs, params, tags,
    latest_metrics, metrics) in a handful of queries, with neither mlflow nor
    SQLAlchemy imported.  Any sqlite3.Error (an older schema, say) makes :func:`collect`
    fall back to the client API."""

    def __init__(self, path: str):
        self.path = path
        self.con = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)

    def close(self) -> None:
        self.con.close()

    def experiment(self, name: str) -> tuple[int, str] | None:
        row = self.con.execute("SELECT experiment_id, artifact_location FROM experiments "
                               "WHERE name = ? AND lifecycle_stage = 'active'",
                               (name,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def experiment_names(self) -> list[str]:
        """Active experiments; "Default" (the store's automatic one) only if it has runs."""
        rows = self.con.execute(
            "SELECT e.name, (SELECT COUNT(*) FROM runs r WHERE r.experiment_id = "
            "e.experiment_id AND r.lifecycle_stage = 'active') FROM experiments e "
            "WHERE e.lifecycle_stage = 'active'").fetchall()
        return sorted(n for n, k in rows if n != "Default" or k > 0)

    def _long(self, sql: str, exp_id: int) -> pd.DataFrame:
        cur = self.con.execute(sql, (exp_id,))
        return pd.DataFrame.from_records(cur.fetchall(),
                                         columns=[d[0] for d in cur.description])

    def runs(self, exp_id: int) -> pd.DataFrame:
        """The active runs as :func:`mlflow.search_runs` frames them (run_id, status,
        start_time, end_time, artifact_uri, params.*, tags.*), with the ``final/*``
        metrics and the per-T energy ones as ``metrics.<key>``; four queries."""
        active = ("SELECT run_uuid FROM runs WHERE experiment_id = ? "
                  "AND lifecycle_stage = 'active'")
        runs = self._long("SELECT run_uuid, status, start_time, end_time, artifact_uri FROM "
                          "runs WHERE experiment_id = ? AND lifecycle_stage = 'active'", exp_id)
        params = self._long(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN "
                            f"({active})", exp_id)
        tags = self._long(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN "
                          f"({active})", exp_id)
        keys = " OR ".join([_key_range("final/"), _key_range("energy/uJ_T"),
                            _key_range("energy/ratio_to_ann_T"), f"key = '{ENERGY_ANN}'"])
        final = self._long(f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE "
                           f"({keys}) AND run_uuid IN ({active})", exp_id)
        if not final.empty:
            final["value"] = pd.to_numeric(final["value"]).where(
                ~final["is_nan"].astype(bool), float("nan"))
        out = runs.rename(columns={"run_uuid": "run_id"})
        out["run_id"] = out["run_id"].astype(str)
        for c in ("start_time", "end_time"):
            out[c] = pd.to_datetime(pd.to_numeric(out[c], errors="coerce"), unit="ms",
                                    utc=True)
        for long, prefix in ((params, "params."), (tags, "tags."), (final, "metrics.")):
            if long.empty:
                continue
            w = long.drop_duplicates(["run_uuid", "key"], keep="last").pivot(
                index="run_uuid", columns="key", values="value")
            w.columns = [prefix + str(c) for c in w.columns]
            out = out.join(w, on="run_id")
        return out.sort_values("start_time", ascending=False, kind="stable") \
            .reset_index(drop=True)

    def histories(self, exp_id: int, run_ids: list[str], progress=None) -> Histories:
        """The :data:`_HISTORY_KEYS` histories of ``run_ids`` (runs of ``exp_id``) in one
        query over the primary key index of ``metrics`` (key ranges; the index holds
        every column, so no table lookups), fetched and turned into arrays in chunks of
        rows so that memory stays bounded; ``progress()`` is called after each chunk,
        if given."""
        cond = " OR ".join(_key_range(p) for p in _HISTORY_PREFIXES)
        cur = self.con.execute(
            f"SELECT run_uuid, key, step, timestamp, value, is_nan FROM metrics "
            f"WHERE ({cond}) AND run_uuid IN (SELECT run_uuid FROM runs WHERE "
            f"experiment_id = ? AND lifecycle_stage = 'active')", (exp_id,))
        run_code = {str(r): i for i, r in enumerate(run_ids)}
        keys: dict[str, int] = {}          # every wanted key -> its code
        parts: list[tuple] = []
        while True:
            if progress is not None and parts:
                progress()
            rows = cur.fetchmany(20_000)
            if not rows:
                break
            rid, k, st, ts, va, nan = zip(*rows)
            del rows
            rcat, kcat = pd.Categorical(rid), pd.Categorical(k)
            rmap = np.array([run_code.get(str(c), -1) for c in rcat.categories], dtype=np.int64)
            kmap = np.array([keys.setdefault(str(c), len(keys))
                             if _HISTORY_KEYS.match(str(c)) else -1
                             for c in kcat.categories], dtype=np.int64)
            rc, kc = rmap[rcat.codes], kmap[kcat.codes]
            keep = (rc >= 0) & (kc >= 0)
            vals = np.asarray(va, dtype=float)
            vals[np.asarray(nan, dtype=bool)] = np.nan
            parts.append((rc[keep], kc[keep], np.asarray(st, dtype=np.int64)[keep],
                          np.asarray(ts, dtype=np.int64)[keep], vals[keep]))
        if not parts:
            return Histories(None, list(run_ids))
        cols = [np.concatenate([p[j] for p in parts]) for j in range(5)]
        return Histories.from_records(cols[0], list(run_ids), cols[1], list(keys), cols[2],
                                      cols[3], cols[4])


def _is_child(raw: pd.DataFrame) -> pd.Series:
    parent_col = _col(raw, "tags.mlflow.parentRunId").astype(object)
    role = _col(raw, "tags.harness.role").astype(object)
    return parent_col.map(lambda v: isinstance(v, str) and bool(v)) & (role != "parent")


def parent_table(raw: pd.DataFrame) -> pd.DataFrame:
    """The parent runs of an experiment, newest first.

    Parent runs are the runs tagged ``harness.role=parent`` and any run that child
    runs name in ``mlflow.parentRunId``.  Columns: ``run_id``, ``start_time`` (the
    parent's own, else its first child's), ``n_trials`` (child runs, any status).
    """
    is_child = _is_child(raw)
    role = _col(raw, "tags.harness.role").astype(object)
    parent_of = _col(raw, "tags.mlflow.parentRunId").astype(object)
    start = _col(raw, "start_time")
    ids = (set(raw.loc[role == "parent", "run_id"].astype(str))
           | {str(p) for p in parent_of[is_child]})
    own = dict(zip(raw["run_id"].astype(str), start))
    recs = []
    for pid in ids:
        kids = is_child & (parent_of == pid)
        t = own.get(pid)
        if t is None or pd.isna(t):
            t = start[kids].min() if kids.any() else pd.NaT
        recs.append({"run_id": pid, "start_time": t, "n_trials": int(kids.sum())})
    df = pd.DataFrame.from_records(recs, columns=["run_id", "start_time", "n_trials"])
    if df.empty:
        return df
    df["_t"] = pd.to_datetime(df["start_time"], utc=True, errors="coerce")
    df = df.sort_values(["_t", "run_id"], ascending=[False, True], na_position="last")
    return df.drop(columns="_t").reset_index(drop=True)


def select_parent(parents: pd.DataFrame, parent: str | None, experiment: str) -> str | None:
    """The given parent run id (checked), else the newest parent run; None if there is none."""
    ids = list(parents["run_id"]) if not parents.empty else []
    if parent is None:
        return ids[0] if ids else None
    if parent not in ids:
        raise ReportError(f"no parent run '{parent}' in experiment '{experiment}' "
                          f"(parent runs, newest first: {', '.join(ids) if ids else 'none'})")
    return parent


def collect(experiment: str, tracking_uri: str, *, histories: bool = True,
            parent: str | None = None, bulk: bool = True, on_runs=None,
            progress=None) -> Collected:
    """Load the trial runs of one parent run (sweep) of an experiment.  Raises ReportError.

    ``parent``: the parent run id; default: the newest parent run (by start time).
    ``bulk``: with a sqlite store, read the runs (params, tags, final metrics) in four
    SQL queries and the metric histories in one more, with the
    standard library's sqlite3 (:class:`_SqliteStore`; mlflow is not imported).  Other
    stores (HTTP, file, PostgreSQL, …), ``bulk=False``, or a sqlite schema that the
    queries do not fit: ``mlflow.search_runs`` and one ``get_metric_history`` per run
    and key. ``on_runs(col)``, if given, is called once the runs are read, before the
    metric histories are (``col.histories`` is empty then); ``progress()``, if given,
    every so often while the histories are read (after a chunk of rows, or a run).
    """
    _check_store_exists(tracking_uri)
    path = _sqlite_path(tracking_uri) if bulk else None
    read = _bulk_runs(path, experiment) if path is not None else None
    store, exp_id, client = None, None, None
    if read is not None:
        store, exp_id, raw = read
    else:
        client, raw = _client_runs(experiment, tracking_uri)
    try:
        col, finished = _select(raw, experiment, parent, tracking_uri)
        if on_runs is not None:
            on_runs(col)
        if histories:
            col.histories = _read_histories(col.runs, finished, store, exp_id, client,
                                            tracking_uri, progress)
    finally:
        if store is not None:
            store.close()
    return col


def _no_experiment(experiment: str, existing: list[str]) -> ReportError:
    return ReportError(f"no experiment '{experiment}' (existing: "
                       f"{', '.join(existing) if existing else 'none'})")


def _bulk_runs(path: str, experiment: str) -> tuple[_SqliteStore, int, pd.DataFrame] | None:
    """The experiment's runs read in bulk from a sqlite store: (the open store, the
    experiment id, the runs frame); None when the queries do not fit the store (then
    the MLflow client reads it).  Raises ReportError when there is no such experiment."""
    try:
        store = _SqliteStore(path)
        found = store.experiment(experiment)
        if found is None:
            existing = store.experiment_names()
            store.close()
            raise _no_experiment(experiment, existing)
        return store, found[0], store.runs(found[0])
    except sqlite3.Error as exc:
        log.info("bulk sqlite reading failed (%s): using the MLflow client", exc)
        return None


def _client_runs(experiment: str, tracking_uri: str) -> tuple[object, pd.DataFrame]:
    """The experiment's runs through the MLflow client (``mlflow.search_runs``): (the
    client, the runs frame).  Raises ReportError when there is no such experiment."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise _no_experiment(experiment, _existing_experiments(client))
    prev_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(tracking_uri)
        raw = mlflow.search_runs(experiment_ids=[exp.experiment_id],
                                 output_format="pandas", max_results=100000)
    finally:
        mlflow.set_tracking_uri(prev_uri)
    return client, raw


def _read_histories(runs: pd.DataFrame, finished: pd.DataFrame, store: _SqliteStore | None,
                    exp_id: int | None, client, tracking_uri: str, progress=None) -> Histories:
    """The metric histories of the reported runs: in one query from the sqlite store
    when it was read in bulk, else (or when that query fails) through the MLflow client."""
    if store is not None:
        try:
            return store.histories(exp_id, [str(r) for r in runs["run_id"]], progress)
        except sqlite3.Error as exc:
            log.info("bulk sqlite history reading failed (%s)", exc)
    if client is None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=tracking_uri)
    return _histories(client, finished, runs, progress)


def _select(raw: pd.DataFrame, experiment: str, parent: str | None,
            tracking_uri: str) -> tuple[Collected, pd.DataFrame]:
    """The reported parent's trials (tidy) from the experiment's runs frame."""
    if raw.empty:
        raise ReportError(f"experiment '{experiment}' has no finished trial runs")
    is_child = _is_child(raw)
    role = _col(raw, "tags.harness.role").astype(object)
    parents_tbl = parent_table(raw)
    pid = select_parent(parents_tbl, parent, experiment)
    parents = raw[(role == "parent") | ~is_child].reset_index(drop=True)
    child = raw[is_child & (_col(raw, "tags.mlflow.parentRunId") == pid)].reset_index(drop=True)
    finished = child[child["status"] == "FINISHED"].reset_index(drop=True)
    if finished.empty:
        where = "" if len(parents_tbl) <= 1 and parent is None else (
            f" under parent run {pid} ({'given' if parent else 'newest'} of "
            f"{len(parents_tbl)}: {', '.join(parents_tbl['run_id'])})")
        raise ReportError(f"experiment '{experiment}' has no finished trial runs{where}")
    runs = tidy_runs(finished)
    value_cols = ["ann"] + [c for c in runs.columns if T_COLUMNS_RE.match(str(c))]
    if runs[value_cols].isna().all().all():
        raise ReportError(f"the finished trial runs of experiment '{experiment}' have no "
                          "final/ metrics (final/ann_test_acc, final/snn_test_acc_TNN): "
                          "written by an older harness?")
    col = Collected(experiment=experiment, tracking_uri=tracking_uri, runs=runs,
                    parents=parents, n_child_total=len(child), trials=tidy_runs(child),
                    parent_id=pid, parent_ids=list(parents_tbl["run_id"]),
                    parent_given=parent is not None)
    col.artifact_uris = {str(r): str(u) for r, u in zip(finished["run_id"],
                                                         _col(finished, "artifact_uri"))
                         if isinstance(u, str) and u}
    return col, finished
