"""Report figures (matplotlib, Agg backend, single-column ~3.4 in wide, 200 dpi).

Every function takes tidy frames / histories, writes one PNG and returns its
path, or returns None when there is nothing to plot.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .collect import (NA, arch_label, arch_order, method_order, setting_label,  # noqa: E402
                      setting_sort_key)
from .tables import stat_of, t_values, varying_settings  # noqa: E402

WIDTH = 3.4
DPI = 200
STYLE = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6,
    "ytick.labelsize": 6, "legend.fontsize": 6, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.4, "lines.linewidth": 1.0, "lines.markersize": 3,
    "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
}
METHOD_COLORS = {"QCFS": "tab:blue", "NQ": "tab:red", "NQ-fixed": "tab:orange"}


def _color(method: str, i: int = 0) -> str:
    return METHOD_COLORS.get(method, f"C{(i + 3) % 10}")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def _variant_label(method: str, settings: dict[str, str]) -> str:
    extra = ", ".join(f"{setting_label(k)}={v}" for k, v in settings.items() if v != NA)
    return f"{method} ({extra})" if extra else method


# ---------------------------------------------------------------- accuracy vs T
def acc_vs_T(runs: pd.DataFrame, path: Path) -> Path | None:
    """SNN accuracy vs T (log2), one subplot per arch, mean ± std over seeds."""
    ts = t_values(runs)
    if not ts:
        return None
    settings_cols = varying_settings(runs)
    archs = sorted(runs["arch"].unique(), key=arch_order)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(archs), 1, figsize=(WIDTH, 2.1 * len(archs)),
                                 squeeze=False)
        for ax, arch in zip(axes[:, 0], archs):
            a_runs = runs[runs["arch"] == arch]
            gcols = ["method"] + settings_cols
            groups = sorted(a_runs.groupby(gcols, dropna=False, sort=False),
                            key=lambda kv: (method_order(kv[0][0]),
                                            tuple(setting_sort_key(v) for v in kv[0][1:])))
            for i, (gkey, grp) in enumerate(groups):
                color = _color(gkey[0], i) if len(groups) <= 3 else f"C{i % 10}"
                stats = [stat_of(grp[f"T{t}"]) for t in ts]
                xs = [t for t, s in zip(ts, stats) if s is not None]
                ms = [s.mean for s in stats if s is not None]
                es = [0.0 if pd.isna(s.std) else s.std for s in stats if s is not None]
                label = _variant_label(gkey[0], dict(zip(settings_cols, gkey[1:])))
                ax.errorbar(xs, ms, yerr=es, marker="o", color=color, capsize=2, label=label)
                ann = stat_of(grp["ann"])
                if ann is not None:
                    ax.axhline(ann.mean, color=color, linestyle="--", linewidth=0.8,
                               label=f"{label} ANN")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ts)
            ax.set_xticklabels([str(t) for t in ts])
            ax.set_title(arch_label(arch))
            ax.set_ylabel("test accuracy (%)")
            ax.legend(loc="lower right", frameon=False)
        axes[-1, 0].set_xlabel("time steps T")
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------- training curves
_SNN_EPOCH_RE = re.compile(r"^snn/(val|test)_acc_T(\d+)$")


def _sel_key(hist: pd.DataFrame, select_T: str | None = None,
             select_on: str | None = None) -> str | None:
    """The per-epoch SNN selection metric: snn/<split>_acc_T<select_T, 2 digits>."""
    keys = [(m.group(1), int(m.group(2)), c) for c in hist.columns
            if (m := _SNN_EPOCH_RE.match(str(c)))]
    if not keys:
        return None
    try:
        want_T = int(float(select_T)) if select_T not in (None, NA) else None
    except ValueError:
        want_T = None
    want_split = select_on if select_on in ("val", "test") else None
    return min(keys, key=lambda k: (k[0] != want_split, k[1] != want_T, k[1]))[2]


def training_curves(hist: pd.DataFrame, best_epoch: float | None, title: str,
                    path: Path, select_T: str | None = None,
                    select_on: str | None = None) -> Path | None:
    """ANN test accuracy (noise off, and on where logged) and the SNN selection accuracy."""
    if hist is None or hist.empty or "ann/test_acc" not in hist.columns:
        return None
    sel = _sel_key(hist, select_T, select_on)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 2.2))
        h = hist["ann/test_acc"].dropna()
        ax.plot(h.index, h.values, marker="o", color="tab:gray", label="ANN test (noise off)")
        if "ann/noisy_test_acc" in hist.columns:
            h = hist["ann/noisy_test_acc"].dropna()
            ax.plot(h.index, h.values, marker="o", linestyle="--", color="tab:olive",
                    label="ANN test (noise on)")
        if sel is not None:
            h = hist[sel].dropna()
            m = _SNN_EPOCH_RE.match(sel)
            split = "val" if m.group(1) == "val" else "TEST"
            ax.plot(h.index, h.values, marker="s", color="tab:red",
                    label=f"SNN {split} (selection, T={int(m.group(2))})")
        if best_epoch is not None and not pd.isna(best_epoch):
            ax.axvline(float(best_epoch), color="k", linestyle=":", linewidth=0.8,
                       label=f"selected epoch {int(best_epoch)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(loc="best", frameon=False)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------- delta heatmap
_DELTA_RE = re.compile(r"^delta/l(\d+)_(.+)$")


def delta_matrix(hist: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """(layer names, metric keys, layers x epochs) of δ_trained (``delta/lNN_<layer>``,
    ordered by the layer index; ``delta_next/*`` is not used)."""
    found = sorted((int(m.group(1)), m.group(2), c) for c in hist.columns
                   if (m := _DELTA_RE.match(str(c))))
    cols = [c for _, _, c in found]
    mat = hist[cols].to_numpy(dtype=float).T if cols else np.zeros((0, len(hist)))
    return [name for _, name, _ in found], cols, mat


def delta_heatmap(hist: pd.DataFrame, title: str, path: Path) -> Path | None:
    """δ_trained over epochs: the δ each layer was TRAINED with during each epoch
    (metrics ``delta/lNN_<layer>``), layers on y (by name), epochs on x.
    None if δ is constant."""
    if hist is None or hist.empty:
        return None
    names, cols, mat = delta_matrix(hist)
    if not cols:
        return None
    finite = mat[np.isfinite(mat)]
    if finite.size == 0 or np.allclose(finite, finite[0]):
        return None
    epochs = list(hist.index)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(WIDTH, max(1.6, 0.6 + 0.11 * len(cols))))
        im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(cols) - 0.5))
        step = max(1, len(cols) // 40)
        ax.set_yticks(range(0, len(cols), step))
        ax.set_yticklabels(names[::step], fontsize=4 if len(cols) > 12 else 5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: δ_trained (δ used in training during the epoch)")
        cb = fig.colorbar(im, ax=ax, pad=0.02)
        cb.set_label("δ_trained (noise std)")
        cb.ax.tick_params(labelsize=6)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------- residual histograms
def residual_hist(data: dict, title: str, path: Path, ncols: int = 4) -> Path | None:
    """Per-layer histograms of the end-to-end residual (units of λ), small multiples."""
    if not data or not data.get("counts"):
        return None
    layers = data.get("layers") or [f"l{i:02d}" for i in range(len(data["counts"]))]
    edges = np.asarray(data["edges"], dtype=float)
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    means, stds = data.get("mean") or [], data.get("std") or []
    n = len(data["counts"])
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    with plt.rc_context({**STYLE, "font.size": 5, "axes.titlesize": 5, "xtick.labelsize": 4,
                         "ytick.labelsize": 4, "axes.grid": False}):
        height = 0.75 * nrows + 0.3
        fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, height),
                                 squeeze=False, sharex=True)
        for i, ax in enumerate(axes.flat):
            if i >= n:
                ax.axis("off")
                continue
            counts = np.asarray(data["counts"][i], dtype=float)
            tot = counts.sum()
            ax.bar(centers, counts / tot if tot else counts, width=widths, color="tab:purple",
                   linewidth=0)
            ax.set_yscale("log")  # the exact-zero bin dominates; log shows the spread
            ax.axvline(0, color="k", linewidth=0.4)
            txt = []
            if i < len(means):
                txt.append(f"μ={means[i]:+.2f}")
            if i < len(stds):
                txt.append(f"σ={stds[i]:.2f}")
            ax.text(0.97, 0.95, "\n".join(txt), transform=ax.transAxes, ha="right", va="top")
            ax.set_title(str(layers[i]) if i < len(layers) else f"l{i:02d}", pad=1.5)
            ax.set_yticks([], minor=True)
            ax.set_yticks([])
            ax.tick_params(length=1.5, pad=1)
        sub = f"{title}: residual / λ (log density; μ, σ absolute)"
        if data.get("tau") is not None:
            sub += f" at T={data['tau']}"
        fig.suptitle(sub, fontsize=6)
        fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2, rect=(0, 0, 1, 1 - 0.2 / height))
        return _save(fig, path)


# ---------------------------------------------------------------- epoch time
def epoch_time(runs: pd.DataFrame, histories: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Mean time per epoch, per method/arch: training, noise calibration and evaluation.

    From ``time/train_s``, ``time/calib_s`` and ``time/eval_s``; training is
    ``time/epoch_s`` minus the other two where ``time/train_s`` is not logged.
    """
    recs = []
    for _, r in runs.iterrows():
        h = histories.get(r["run_id"])
        if h is None or "time/epoch_s" not in h.columns:
            continue

        def part(key: str) -> pd.Series:
            return (h[key] if key in h.columns else pd.Series(0.0, index=h.index)) \
                .reindex(h.index).fillna(0.0)

        calib, evals = part("time/calib_s"), part("time/eval_s")
        train = part("time/train_s") if "time/train_s" in h.columns else \
            h["time/epoch_s"] - calib - evals
        recs.append({"arch": r["arch"], "method": r["method"], "dataset": r["dataset"],
                     "train": float(train.mean()), "calib": float(calib.mean()),
                     "eval": float(evals.mean())})
    if not recs:
        return None
    df = pd.DataFrame(recs)
    multi_ds = df["dataset"].nunique() > 1
    agg = df.groupby(["dataset", "arch", "method"], sort=False)[["train", "calib", "eval"]].mean()
    keys = sorted(agg.index, key=lambda k: (k[0], arch_order(k[1]), method_order(k[2])))
    labels = [f"{arch_label(a)}\n{m}" + (f"\n{d}" if multi_ds else "") for d, a, m in keys]
    parts = [("train", "training", "tab:gray"), ("calib", "noise calibration (δ)", "tab:red"),
             ("eval", "evaluation", "tab:blue")]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 2.3))
        x = np.arange(len(keys))
        bottom = np.zeros(len(keys))
        for key, label, color in parts:
            vals = np.array([agg.loc[k, key] for k in keys])
            if key != "train" and not vals.any():
                continue
            ax.bar(x, vals, width=0.6, bottom=bottom, color=color, label=label)
            bottom += vals
        for xi, tot in zip(x, bottom):
            ax.text(xi, tot, f"{tot:.1f}", ha="center", va="bottom", fontsize=5)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=5)
        ax.set_ylabel("time per epoch (s)")
        ax.set_ylim(0, (bottom.max() * 1.12) or 1)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False,
                  borderaxespad=0.2)
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------- ablations
def ablation(runs: pd.DataFrame, setting: str, path: Path, xlabel: str,
             log_x: bool = False) -> Path | None:
    """SNN accuracy vs a setting (one line per T), one subplot per (dataset, arch)."""
    runs = runs[runs[setting] != NA]
    if runs[setting].nunique() < 2:
        return None
    ts = t_values(runs)
    panels = sorted(runs.groupby(["dataset", "arch"], sort=False).groups,
                    key=lambda k: (k[0], arch_order(k[1])))
    multi_ds = runs["dataset"].nunique() > 1
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, 2.1 * len(panels)),
                                 squeeze=False)
        for ax, (ds, arch) in zip(axes[:, 0], panels):
            sub = runs[(runs["dataset"] == ds) & (runs["arch"] == arch)]
            xs_all = sorted(sub[setting].unique(), key=setting_sort_key)
            numeric = all(setting_sort_key(v)[0] == 0 for v in xs_all)
            xpos = [float(v) for v in xs_all] if numeric else list(range(len(xs_all)))
            for i, t in enumerate(ts):
                stats = [stat_of(sub[sub[setting] == v][f"T{t}"]) for v in xs_all]
                pts = [(x, s) for x, s in zip(xpos, stats) if s is not None]
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                            yerr=[0.0 if pd.isna(p[1].std) else p[1].std for p in pts],
                            marker="o", capsize=2, color=plt.cm.viridis(i / max(1, len(ts) - 1)),
                            label=f"T={t}")
            if log_x and numeric and min(xpos) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xpos)
            ax.set_xticklabels(xs_all)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("SNN test accuracy (%)")
            ax.set_title(f"{arch_label(arch)}" + (f" — {ds}" if multi_ds else ""))
        fig.tight_layout()
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, len(labels)), frameon=False)   # below the panels
        return _save(fig, path)


# ---------------------------------------------------------------- one trial's curves (a run artifact)
def result_curves(result: dict, path: Path) -> Path:
    """ANN (val, test) and SNN (selection split, select_T) accuracy per epoch of one
    trial's result.json, with the selected epoch marked: the child run's curves.png."""
    hist = [r for r in result["history"] if r.get("ann_test_acc") is not None]
    ep = [r["epoch"] for r in hist]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 2.2))
        ax.plot(ep, [r["ann_test_acc"] for r in hist], "o-", color="tab:gray", label="ANN test")
        ax.plot(ep, [r["ann_val_acc"] for r in hist], "s--", color="tab:gray", alpha=0.6, label="ANN val")
        ax.plot(ep, [r["snn_sel_acc"] for r in hist], "^-", color="tab:red",
                label=f"SNN {result.get('selected_on', 'val')} T={result.get('select_T', '?')}")
        ax.axvline(result["best_epoch"], color="k", lw=0.8, ls=":", label=f"selected epoch {result['best_epoch']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{result['method']} {result['config']['model']['arch']} on {result['config']['data']['name']}")
        ax.legend(loc="lower right", frameon=False)
        fig.tight_layout()
        return _save(fig, path)
