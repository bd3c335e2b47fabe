"""Report figures (matplotlib, Agg backend, single-column ~3.4 in wide, 200 dpi).

Every function takes tidy frames / histories, writes one PNG and the same figure as
PDF next to it (for papers), and returns the PNG's path, or returns None when there
is nothing to plot.

Figures over many runs (:func:`epoch_time`, :func:`selection`, :func:`delta_heatmaps`,
:func:`residual_overlay`) read the long frame of :class:`collect.Histories` and draw
one panel per architecture (and method), however many trials there are; the per-trial
figures (:func:`training_curves`, :func:`delta_heatmap`, :func:`residual_hist`) are
written only with ``harness report --per-trial``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from matplotlib.ticker import (FuncFormatter, LogLocator, MaxNLocator,  # noqa: E402
                               NullLocator)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .collect import (NA, arch_label, arch_order, is_setting_column,  # noqa: E402
                      method_order, setting_label, setting_sort_key)
from .tables import E_AC_PJ, E_MAC_PJ, stat_of, t_values, varying_settings  # noqa: E402

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


def warm_up() -> None:
    """Draw a small figure (text, log axis, error bars, image, colour bar) as PNG and PDF
    into memory: loads the fonts and fills matplotlib's caches once, before the report
    forks one process per figure (each would otherwise pay for it again)."""
    import io

    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(WIDTH, 1.5))
        a.errorbar([1, 2, 4], [1.0, 2.0, 3.0], yerr=[0.1, 0.2, 0.1], marker="o", label="T=1")
        a.set_xscale("log", base=2)
        a.set_title("δ τ λ ± − µJ ★")
        a.legend()
        im = b.imshow(np.arange(4.0).reshape(2, 2))
        fig.colorbar(im, ax=b)
        for fmt in ("png", "pdf"):
            fig.savefig(io.BytesIO(), format=fmt, dpi=DPI)
        plt.close(fig)


def _save(fig, path: Path) -> Path:
    """Write the figure as PNG (``path``) and as PDF (same name, ``.pdf``), both cut to
    the drawn content plus a small margin.  One raster draw: the PNG is the cropped
    canvas, and its crop box (found from the non-white pixels) is the PDF's bounding
    box, so neither a tight-bbox pass nor a second raster draw is needed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.set_layout_engine(None)     # the layout is done; none to run again while saving
    fig.set_dpi(DPI)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    h, w = rgba.shape[:2]
    ink = (rgba[..., :3] < 250).any(axis=-1)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    pad = int(round(STYLE["savefig.pad_inches"] * DPI))
    meta_pdf = {"Creator": None, "Producer": None, "CreationDate": None}
    if rows.size and (rows[0] == 0 or rows[-1] == h - 1 or cols[0] == 0 or cols[-1] == w - 1):
        # something reaches the canvas edge (it may run past it): the tight bounding box
        bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(
            STYLE["savefig.pad_inches"])
        fig.savefig(path, dpi=DPI, bbox_inches=bbox, metadata={"Software": None})
        fig.savefig(path.with_suffix(".pdf"), bbox_inches=bbox, metadata=meta_pdf)
        plt.close(fig)
        return path
    if rows.size:
        r0, r1 = max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)
        c0, c1 = max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)
    else:
        r0, r1, c0, c1 = 0, h, 0, w
    Image.fromarray(rgba[r0:r1, c0:c1]).save(path, dpi=(DPI, DPI))
    bbox = Bbox.from_extents(c0 / DPI, (h - r1) / DPI, c1 / DPI, (h - r0) / DPI)
    fig.savefig(path.with_suffix(".pdf"), bbox_inches=bbox, metadata=meta_pdf)
    plt.close(fig)
    return path


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Break a title into lines that fit ``width_in`` inches at ``fontsize`` points (the
    saved files are cut to the canvas, so a title must not run past it)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (fontsize * 0.56)))
    return "\n".join(textwrap.fill(line, chars) for line in str(text).split("\n"))


MANY_LINES = 8   # more variants than this in one panel: thin lines coloured by method


def _fixed_layout(fig, nrows: int, ncols: int, *, left: float = 0.45, right: float = 0.08,
                  top: float = 0.25, bottom: float = 0.4, wspace: float = 0.45,
                  hspace: float = 0.5) -> None:
    """Margins and gaps in inches, for multi-panel figures: tight_layout would cost one
    more render of the figure, and the saved files are cropped to the tight bounding
    box anyway (so generous outer margins cost nothing)."""
    w, h = fig.get_size_inches()
    axw = max(0.1, (w - left - right - wspace * (ncols - 1)) / ncols)
    axh = max(0.1, (h - top - bottom - hspace * (nrows - 1)) / nrows)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h,
                        bottom=bottom / h, wspace=wspace / axw, hspace=hspace / axh)


def _variant_label(method: str, settings: dict[str, str]) -> str:
    extra = ", ".join(f"{setting_label(k)}={v}" for k, v in settings.items() if v != NA)
    return f"{method} ({extra})" if extra else method


# ---------------------------------------------------------------- accuracy vs T
def _variant_groups(runs: pd.DataFrame, settings_cols: list[str]) -> list:
    """(key, runs) per method and setting combination, methods in their order, then the
    settings in their sort order: one line per variant in a panel."""
    return sorted(runs.groupby(["method"] + settings_cols, dropna=False, sort=False),
                  key=lambda kv: (method_order(kv[0][0]),
                                  tuple(setting_sort_key(v) for v in kv[0][1:])))


def acc_vs_T(runs: pd.DataFrame, path: Path) -> Path | None:
    """SNN accuracy vs T (log2), one subplot per arch, mean ± std over seeds."""
    ts = t_values(runs)
    if not ts:
        return None
    settings_cols = varying_settings(runs)
    archs = sorted(runs["arch"].unique(), key=arch_order)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(archs), 1, figsize=(WIDTH, 2.1 * len(archs) + 0.2),
                                 squeeze=False, sharex=True)
        for ax, arch in zip(axes[:, 0], archs):
            groups = _variant_groups(runs[runs["arch"] == arch], settings_cols)
            many = len(groups) > MANY_LINES
            seen: set[str] = set()
            for i, (gkey, grp) in enumerate(groups):
                stats = [stat_of(grp[f"T{t}"]) for t in ts]
                xs = [t for t, s in zip(ts, stats) if s is not None]
                ms = [s.mean for s in stats if s is not None]
                if many:   # one thin line per variant, coloured by method; no error bars
                    m = str(gkey[0])
                    ax.plot(xs, ms, color=_color(m), linewidth=0.5, alpha=0.6,
                            label=None if m in seen else f"{m} (one line per setting "
                                                         "combination; values in Table 1)")
                    seen.add(m)
                    continue
                color = _color(gkey[0], i) if len(groups) <= 3 else f"C{i % 10}"
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
            ax.set_title(_wrap(arch_label(arch) + (f" ({len(groups)} variants, mean over "
                                                   "seeds)" if many else ""), WIDTH, 7))
            ax.set_ylabel("test accuracy (%)")
            ax.legend(loc="lower right", frameon=False, fontsize=5 if many else None)
        axes[-1, 0].set_xlabel("time steps T")
        _fixed_layout(fig, len(archs), 1, hspace=0.35)
        return _save(fig, path)


# ---------------------------------------------------------------- accuracy vs energy
def acc_vs_energy(runs: pd.DataFrame, path: Path) -> Path | None:
    """SNN test accuracy against estimated energy per image (µJ, log), one point per T,
    one line per method (and varying setting), one subplot per arch; mean ± std over the
    runs that recorded energy at that T; the ANN (star) at its MAC energy.  None when no
    run recorded energy."""
    ts = [t for t in t_values(runs) if f"E{t}" in runs.columns and runs[f"E{t}"].notna().any()]
    if not ts:
        return None
    settings_cols = varying_settings(runs)
    archs = [a for a in sorted(runs["arch"].unique(), key=arch_order)
             if any(runs.loc[runs["arch"] == a, f"E{t}"].notna().any() for t in ts)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(archs), 1, figsize=(WIDTH, 2.3 * len(archs) + 0.2),
                                 squeeze=False)
        for ax, arch in zip(axes[:, 0], archs):
            groups = _variant_groups(runs[runs["arch"] == arch], settings_cols)
            many = len(groups) > MANY_LINES
            seen: set[str] = set()
            ns: set[int] = set()
            for i, (gkey, grp) in enumerate(groups):
                pts = _energy_points(grp, ts)
                ns.update(e.n for _, e, _ in pts)
                if not pts:
                    continue
                m = str(gkey[0])
                color = _color(m) if many else (_color(m, i) if len(groups) <= 3 else f"C{i % 10}")
                xs, ys = [p[1].mean for p in pts], [p[2].mean for p in pts]
                ann = grp[["ann", "ann_uJ"]].dropna() if "ann_uJ" in grp.columns else grp.iloc[:0]
                if many:
                    ax.plot(xs, ys, color=color, linewidth=0.5, alpha=0.6, marker=".",
                            label=None if m in seen else f"{m} (one line per setting; ★ ANN)")
                    seen.add(m)
                    if len(ann):
                        ax.plot([ann["ann_uJ"].mean()], [ann["ann"].mean()], marker="*",
                                markersize=4, color=color, alpha=0.6, linestyle="none")
                    continue
                label = _variant_label(m, dict(zip(settings_cols, gkey[1:])))
                ax.errorbar(xs, ys, xerr=[0.0 if pd.isna(p[1].std) else p[1].std for p in pts],
                            yerr=[0.0 if pd.isna(p[2].std) else p[2].std for p in pts],
                            marker="o", color=color, capsize=1.5, label=label)
                if i < 3:   # T labels on the first few lines only (legible)
                    for t, x, y in zip([p[0] for p in pts], xs, ys):
                        ax.annotate(f"T={t}", (x, y), xytext=(2, -7 if i % 2 else 3),
                                    textcoords="offset points", fontsize=5, color=color)
                if len(ann):
                    ax.plot([ann["ann_uJ"].mean()], [ann["ann"].mean()], marker="*",
                            markersize=7, color=color, linestyle="none", label=f"{label} ANN")
            _energy_axes(ax, arch, ns)
        _fixed_layout(fig, len(archs), 1, hspace=0.6, bottom=0.45)
        return _save(fig, path)


def _energy_points(grp: pd.DataFrame, ts: list[int]) -> list[tuple[int, object, object]]:
    """(T, energy Stat, accuracy Stat) per T, over the runs with both at that T."""
    acc = grp[[f"T{t}" for t in ts]].to_numpy(dtype=float)
    energy = grp[[f"E{t}" for t in ts]].to_numpy(dtype=float)
    both = ~(np.isnan(acc) | np.isnan(energy))
    return [(t, stat_of(energy[both[:, j], j]), stat_of(acc[both[:, j], j]))
            for j, t in enumerate(ts) if both[:, j].any()]


def _energy_axes(ax, arch: str, ns: set[int]) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    n_txt = (f"n = {min(ns)}" if len(ns) == 1 else f"n = {min(ns)}–{max(ns)}") if ns else ""
    ax.set_title(_wrap(f"{arch_label(arch)}: one point per T, mean ± std over runs ({n_txt})",
                       WIDTH, 7))
    ax.set_ylabel("SNN test accuracy (%)")
    ax.set_xlabel(f"estimated energy per image (µJ; {E_AC_PJ:g} pJ/SOP, {E_MAC_PJ:g} pJ/MAC)")
    ax.legend(loc="lower right", frameon=False, fontsize=5)


# ---------------------------------------------------------------- training curves
_SNN_EPOCH_RE = re.compile(r"^snn/(val|test)_acc_T(\d+)$")


def _sel_key(hist: pd.DataFrame, select_T: str | None = None,
             select_on: str | None = None) -> str | None:
    """The per-epoch SNN selection metric: snn/<split>_acc_T<select_T, 2 digits>."""
    return _sel_metric(hist.columns, select_T, select_on)


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
        ax.set_title(_wrap(title, WIDTH, 7))
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
        ax.set_title(_wrap(f"{title}: δ_trained (δ used in training during the epoch)",
                           WIDTH, 7))
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
            ax.yaxis.set_major_locator(LogLocator(numticks=3))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.tick_params(length=1.5, pad=1)
        sub = f"{title}: residual / λ (fraction of values per bin, log; μ, σ absolute)"
        if data.get("tau") is not None:
            sub += f" at T={data['tau']}"
        fig.suptitle(_wrap(sub, WIDTH, 6), fontsize=6)
        fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2, rect=(0, 0, 1, 1 - 0.2 / height))
        return _save(fig, path)


# ---------------------------------------------------------------- long histories
def history_long(histories, run_ids, pattern: str) -> pd.DataFrame:
    """(run_id, key, step, value) rows of the metrics matching ``pattern`` for ``run_ids``
    from a :class:`collect.Histories` (its long frame) or a dict of per-run frames."""
    ids = {str(r) for r in run_ids}
    if hasattr(histories, "select"):
        df = histories.select(histories.keys_like(pattern))
        return df[df["run_id"].isin(ids)].reset_index(drop=True)
    rx = re.compile(pattern)
    parts = []
    for rid in ids:
        h = histories.get(rid) if hasattr(histories, "get") else None
        if h is None or h.empty:
            continue
        cols = [c for c in h.columns if rx.match(str(c))]
        if cols:
            m = h[cols].reset_index(names="step").melt(id_vars="step", var_name="key")
            m["run_id"] = rid
            parts.append(m.dropna(subset=["value"]))
    if not parts:
        return pd.DataFrame(columns=["run_id", "key", "step", "value"])
    return pd.concat(parts, ignore_index=True)[["run_id", "key", "step", "value"]]


# ---------------------------------------------------------------- epoch time
WARMUP_EPOCHS = 1
CALIB_LABELS = {
    "NQ": ("calibration, NQ: residual → δ for the next epoch", "tab:red", None),
    "QCFS": ("calibration, QCFS: residual measured only (no δ)", "lightcoral", "////"),
    "NQ-fixed": ("calibration, NQ-fixed: none (δ fixed)", "tab:orange", None),
}


def epoch_time_table(runs: pd.DataFrame, histories) -> pd.DataFrame:
    """Per run: median over the epochs after the warm-up (epoch > 1) of the training,
    calibration and evaluation time, and the warm-up epoch's total; columns dataset,
    arch, method, train, calib, eval, first, n_epochs (epochs in the median)."""
    long = history_long(histories, runs["run_id"], r"^time/(epoch|train|calib|eval)_s$")
    if long.empty:
        return pd.DataFrame()
    wide = long.pivot_table(index=["run_id", "step"], columns="key", values="value",
                            aggfunc="last")
    for k in ("time/calib_s", "time/eval_s"):
        if k not in wide.columns:
            wide[k] = 0.0
    wide[["time/calib_s", "time/eval_s"]] = wide[["time/calib_s", "time/eval_s"]].fillna(0.0)
    if "time/train_s" not in wide.columns:
        wide["time/train_s"] = np.nan
    if "time/epoch_s" not in wide.columns:
        wide["time/epoch_s"] = wide[["time/train_s", "time/calib_s", "time/eval_s"]].sum(axis=1)
    wide["time/train_s"] = wide["time/train_s"].fillna(
        wide["time/epoch_s"] - wide["time/calib_s"] - wide["time/eval_s"])
    steps = wide.index.get_level_values("step")
    first = wide[steps <= WARMUP_EPOCHS].groupby(level="run_id")["time/epoch_s"].sum()
    later = wide[steps > WARMUP_EPOCHS]
    med = later.groupby(level="run_id")[["time/train_s", "time/calib_s", "time/eval_s"]].median()
    cnt = later.groupby(level="run_id").size()
    info = runs.set_index(runs["run_id"].astype(str))[["dataset", "arch", "method"]]
    out = info.join(med, how="inner").join(first.rename("first")).join(cnt.rename("n_epochs"))
    return out.rename(columns={"time/train_s": "train", "time/calib_s": "calib",
                               "time/eval_s": "eval"}).reset_index(drop=True)


def epoch_time(runs: pd.DataFrame, histories, path: Path) -> Path | None:
    """Time per epoch after the warm-up, per dataset, architecture and method: the
    median over epochs 2 … E of each run (epoch 1, which includes compilation and other
    warm-up, is left out and marked separately), then the median over the runs (seeds
    and settings) of the bar.  Stacked: training, calibration (what it is for each
    method: :data:`CALIB_LABELS`) and evaluation."""
    df = epoch_time_table(runs, histories)
    if df.empty or df["n_epochs"].fillna(0).max() == 0:
        return None
    df = df[df["n_epochs"] > 0]
    multi_ds = df["dataset"].nunique() > 1
    agg = df.groupby(["dataset", "arch", "method"], sort=False)[
        ["train", "calib", "eval", "first"]].median()
    n_runs = df.groupby(["dataset", "arch", "method"], sort=False).size()
    keys = sorted(agg.index, key=lambda k: (k[0], arch_order(k[1]), method_order(k[2])))
    labels = [f"{arch_label(a)}\n{m}" + (f"\n{d}" if multi_ds else "") for d, a, m in keys]
    ep_lo, ep_hi = WARMUP_EPOCHS + 1, WARMUP_EPOCHS + int(df["n_epochs"].max())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 3.0))
        x = np.arange(len(keys))
        bottom = np.zeros(len(keys))
        train = np.array([agg.loc[k, "train"] for k in keys])
        ax.bar(x, train, width=0.6, color="tab:gray", label="training")
        bottom += train
        calib = np.array([agg.loc[k, "calib"] for k in keys])
        for method, (label, color, hatch) in CALIB_LABELS.items():
            sel = np.array([k[2] == method for k in keys])
            if not sel.any() or not (calib[sel] > 0).any():
                continue
            ax.bar(x[sel], calib[sel], width=0.6, bottom=bottom[sel], color=color,
                   hatch=hatch, edgecolor="white" if hatch else None, linewidth=0, label=label)
        other = np.array([k[2] not in CALIB_LABELS for k in keys])
        if other.any() and (calib[other] > 0).any():
            ax.bar(x[other], calib[other], width=0.6, bottom=bottom[other], color="tab:purple",
                   label="calibration (other methods)")
        bottom += calib
        evals = np.array([agg.loc[k, "eval"] for k in keys])
        if (evals > 0).any():
            ax.bar(x, evals, width=0.6, bottom=bottom, color="tab:blue", label="evaluation")
        bottom += evals
        for xi, tot, k in zip(x, bottom, keys):
            ax.text(xi, tot, f"{tot:.2f}", ha="center", va="bottom", fontsize=5)
        first = np.array([agg.loc[k, "first"] for k in keys], dtype=float)
        top = max(bottom.max(), 1e-9) * 1.12
        ax.set_xticks(x)
        ax.set_xticklabels([f"{lab}\n(n={int(n_runs.loc[k])})"
                            + (f"\nepoch 1: {f:.1f} s" if np.isfinite(f) else "")
                            for lab, k, f in zip(labels, keys, first)], fontsize=5)
        ax.set_ylabel("time per epoch (s)")
        ax.set_ylim(0, top)
        ax.set_title(f"Median of epochs {ep_lo}–{ep_hi} per run, median over the runs;\n"
                     f"epoch 1 (warm-up, incl. compilation) excluded", fontsize=5.5)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.34 - 0.06 * multi_ds), ncol=1,
                  frameon=False, fontsize=5)
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
        return _save(fig, path)


# ---------------------------------------------------------------- selection (Fig. 5)
def _sel_metric(keys, select_T: str | None, select_on: str | None) -> str | None:
    """Of the metric names `keys`, the SNN selection metric (the run's split and T first)."""
    found = [(m.group(1), int(m.group(2)), k) for k in keys
             if (m := _SNN_EPOCH_RE.match(str(k)))]
    if not found:
        return None
    try:
        want_T = int(float(select_T)) if select_T not in (None, NA) else None
    except ValueError:
        want_T = None
    want_split = select_on if select_on in ("val", "test") else None
    return min(found, key=lambda f: (f[0] != want_split, f[1] != want_T, f[1]))[2]


def selection_table(runs: pd.DataFrame, histories) -> pd.DataFrame:
    """Per run: the epoch each criterion selects and what is known of the selected
    model.  ``epoch_snn``: the harness's selection (``final/best_epoch``: best SNN
    accuracy on the selection split at ``select_T``); ``epoch_ann``: the best ANN
    validation accuracy (``ann/val_acc``; first of ties); ``snn_test``: the final SNN
    test accuracy at ``select_T`` of the selected model; ``snn_test_at_ann``: the SNN
    test accuracy at ``select_T`` of the ANN-selected epoch where it is known (per-epoch
    SNN test accuracy logged, i.e. selection on test; or the same epoch as the SNN
    criterion), else NaN; ``sel_key``: the per-epoch metric selected on."""
    long = history_long(histories, runs["run_id"], r"^(ann/val_acc|snn/(val|test)_acc_T\d+)$")
    out = pd.DataFrame({"run_id": runs["run_id"].astype(str).to_numpy(),
                        "dataset": runs["dataset"].to_numpy(), "arch": runs["arch"].to_numpy(),
                        "method": runs["method"].to_numpy(),
                        "epoch_snn": pd.to_numeric(runs["best_epoch"], errors="coerce").to_numpy()})
    sel_t = pd.to_numeric(runs["select_T"], errors="coerce").to_numpy()
    out["snn_test"] = [runs[f"T{int(t)}"].iat[i] if np.isfinite(t) and f"T{int(t)}" in runs
                       else np.nan for i, t in enumerate(sel_t)]
    out["epoch_ann"] = np.nan
    out["snn_test_at_ann"] = np.nan
    out["sel_key"] = None
    if not long.empty:
        ann = long[long["key"] == "ann/val_acc"].sort_values(["run_id", "step"], kind="stable")
        if not ann.empty:
            best = ann.loc[ann.groupby("run_id", sort=False)["value"].idxmax(), ["run_id", "step"]]
            out["epoch_ann"] = out["run_id"].map(best.set_index("run_id")["step"]).astype(float)
        keys_by_run = long[long["key"] != "ann/val_acc"].groupby("run_id", sort=False)["key"] \
            .unique()
        out["sel_key"] = [_sel_metric(keys_by_run.get(rid, []), st, so) for rid, st, so in
                          zip(out["run_id"], runs["select_T"], runs["select_on"])]
        test_key = pd.Series([f"snn/test_acc_T{int(t):02d}" if np.isfinite(t) else ""
                              for t in sel_t], index=out.index)
        snn_test = long[long["key"].str.startswith("snn/test_acc_T")]
        if not snn_test.empty:
            look = snn_test.drop_duplicates(["run_id", "key", "step"], keep="last") \
                .set_index(["run_id", "key", "step"])["value"]
            ep = out["epoch_ann"].fillna(-1).astype("int64")
            idx = pd.MultiIndex.from_arrays([out["run_id"], test_key, ep])
            out["snn_test_at_ann"] = look.reindex(idx).to_numpy()
    same = out["epoch_ann"] == out["epoch_snn"]
    out.loc[same & out["snn_test_at_ann"].isna(), "snn_test_at_ann"] = out["snn_test"]
    return out


def _pooled_note(runs: pd.DataFrame, exclude: str | None = None) -> str:
    """ "; L, τ pooled": the settings that vary among the runs of a panel."""
    parts = [setting_label(s) for s in runs.columns if is_setting_column(s) and s != exclude
             and runs[s][runs[s] != NA].nunique() > 1]
    return ("; " + ", ".join(parts) + " pooled") if parts else ""


SELECTION_METHODS = ("QCFS", "NQ")


def selection(runs: pd.DataFrame, histories, path: Path, ncols: int = 2) -> Path | None:
    """Fig. 5 (SNN-based checkpoint selection), one panel per architecture and method
    (QCFS and NQ).

    Lines: the mean over the panel's runs, per epoch, of the ANN test accuracy
    (``ann/test_acc``) and of the per-epoch SNN accuracy the harness selects on
    (``snn/<split>_acc_T<select_T>``).  Markers under the curves: the epoch each run's
    SNN criterion selected (``final/best_epoch``, ▲) and the epoch the best ANN
    validation accuracy would select (▼).  Text: the final SNN test accuracy at
    ``select_T`` of the SNN-selected models (mean ± std over runs), and for the
    ANN-selected epochs how often they coincide and, where known (selection on test,
    or the same epoch), the SNN test accuracy they give."""
    runs = runs[runs["method"].isin(SELECTION_METHODS)]
    if runs.empty:
        return None
    table = selection_table(runs, histories)
    long = history_long(histories, runs["run_id"], r"^(ann/test_acc|snn/(val|test)_acc_T\d+)$")
    if long.empty:
        return None
    panels = _selection_panels(runs, long, table)
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with plt.rc_context({**STYLE, "font.size": 5.5, "axes.titlesize": 5.5,
                         "legend.fontsize": 5, "xtick.labelsize": 5, "ytick.labelsize": 5}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, 2.0 * nrows + 0.8),
                                 squeeze=False, sharex=True)
        handles = {}
        for ax, (arch, method, sub, lp, tp) in zip(axes.flat, panels):
            _selection_curves(ax, lp, tp, handles)
            _selected_epochs(ax, tp, handles)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(_wrap(f"{arch_label(arch)}, {method} ({len(sub)} runs"
                               f"{_pooled_note(sub)})\n{_selection_summary(tp)}",
                               WIDTH / ncols, 4.5), fontsize=4.5)
            ax.set_ylabel("accuracy (%)")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        for ax in axes[-1, :]:
            ax.set_xlabel("epoch")
        _fixed_layout(fig, nrows, ncols, top=0.4, bottom=0.8, hspace=0.5, wspace=0.4)
        fig.legend(list(handles.values()), [h.get_label() for h in handles.values()],
                   loc="lower center", ncol=1, frameon=False, fontsize=4.5)
        return _save(fig, path)


def _selection_panels(runs: pd.DataFrame, long: pd.DataFrame,
                      table: pd.DataFrame) -> list[tuple]:
    """Per (arch, method), in report order: (arch, method, its runs, their per-epoch
    metrics, their rows of :func:`selection_table`)."""
    keys = sorted(runs.groupby(["arch", "method"], sort=False).groups,
                  key=lambda k: (arch_order(k[0]), method_order(k[1])))
    panels = []
    for arch, method in keys:
        sub = runs[(runs["arch"] == arch) & (runs["method"] == method)]
        ids = set(sub["run_id"].astype(str))
        panels.append((arch, method, sub, long[long["run_id"].isin(ids)],
                       table[table["run_id"].isin(ids)]))
    return panels


def _selection_curves(ax, lp: pd.DataFrame, tp: pd.DataFrame, handles: dict) -> None:
    """The mean over the runs per epoch of the ANN test accuracy and of the SNN
    selection metric (the one most runs selected on)."""
    sel_keys = tp["sel_key"].dropna()
    sel_key = sel_keys.mode().iloc[0] if not sel_keys.empty else None
    ann = lp[lp["key"] == "ann/test_acc"].groupby("step")["value"].mean()
    h = ax.plot(ann.index, ann.values, color="tab:gray", marker="o", markersize=1.5,
                label="ANN test accuracy (mean over the runs)")
    handles.setdefault("ann", h[0])
    if sel_key is not None:
        m = _SNN_EPOCH_RE.match(sel_key)
        snn = lp[lp["key"] == sel_key].groupby("step")["value"].mean()
        split = "TEST" if m.group(1) == "test" else "val"
        h = ax.plot(snn.index, snn.values, color="tab:red", marker="s", markersize=1.5,
                    label=f"SNN {split} accuracy at T={int(m.group(2))}: the "
                          "selection metric (mean)")
        handles.setdefault("snn", h[0])


def _selected_epochs(ax, tp: pd.DataFrame, handles: dict) -> None:
    """Markers under the curves, one per run (jittered): the epoch the SNN criterion
    selected (▲) and the epoch of the best ANN validation accuracy (▼)."""
    lo, hi = ax.get_ylim()
    rug = lo - 0.02 * (hi - lo)
    rng = np.random.default_rng(0)
    jit = lambda n: rng.uniform(-0.15, 0.15, n)  # noqa: E731
    es, ea = tp["epoch_snn"].dropna().to_numpy(), tp["epoch_ann"].dropna().to_numpy()
    h1 = ax.scatter(es + jit(len(es)), np.full(len(es), rug), marker="^", s=6,
                    color="tab:red", alpha=0.6, linewidths=0,
                    label="epoch the SNN criterion selected (one per run)")
    h2 = ax.scatter(ea + jit(len(ea)), np.full(len(ea), rug - 0.05 * (hi - lo)),
                    marker="v", s=6, color="tab:gray", alpha=0.6, linewidths=0,
                    label="epoch of the best ANN val. accuracy (one per run)")
    handles.setdefault("es", h1)
    handles.setdefault("ea", h2)
    ax.set_ylim(rug - 0.1 * (hi - lo), hi)


def _selection_summary(tp: pd.DataFrame) -> str:
    """The SNN test accuracy of the SNN-selected models, and how often the ANN
    criterion picks the same epoch (with its SNN test accuracy where known)."""
    st = tp["snn_test"].dropna()
    same = int((tp["epoch_ann"] == tp["epoch_snn"]).sum())
    known = tp["snn_test_at_ann"].dropna()
    text = (f"SNN-selected: SNN test {st.mean():.1f}"
            + (f" ± {st.std():.1f}" if len(st) > 1 else "")
            + f"\nANN-selected: same epoch in {same}/{len(tp)}")
    if len(known) > same:
        text += f"; SNN test {known.mean():.1f} (n={len(known)})"
    return text


# ---------------------------------------------------------------- δ per group
def delta_heatmaps(runs: pd.DataFrame, histories, path: Path) -> Path | None:
    """δ_trained (``delta/lNN_<layer>``) over epochs, mean over the NQ runs of each
    architecture (seeds and settings pooled): one heatmap per architecture; None when
    δ does not change."""
    nq = runs[runs["method"] == "NQ"]
    if nq.empty:
        return None
    long = history_long(histories, nq["run_id"], r"^delta/l\d+_.+$")
    if long.empty:
        return None
    long = long.merge(nq[["run_id", "arch"]].astype({"run_id": str}), on="run_id")
    archs = sorted(long["arch"].unique(), key=arch_order)
    mats = []
    for arch in archs:
        m = long[long["arch"] == arch].pivot_table(index="key", columns="step", values="value",
                                                   aggfunc="mean")
        order = sorted(m.index, key=lambda k: int(_DELTA_RE.match(k).group(1)))
        m = m.loc[order]
        vals = m.to_numpy(dtype=float)
        finite = vals[np.isfinite(vals)]
        if finite.size and not np.allclose(finite, finite[0]):
            mats.append((arch, m, nq[nq["arch"] == arch]))
    if not mats:
        return None
    vmin = min(float(np.nanmin(m.to_numpy(dtype=float))) for _, m, _ in mats)
    vmax = max(float(np.nanmax(m.to_numpy(dtype=float))) for _, m, _ in mats)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        heights = [max(1.2, 0.5 + 0.07 * len(m)) for _, m, _ in mats]
        # 0.3 in of spare width on the right: the colour bar's labels stay inside the
        # canvas (the saved files are cropped to the drawn content)
        fig, axes = plt.subplots(len(mats), 1,
                                 figsize=(WIDTH + 0.3, sum(heights) + 0.6 + 0.4 * (len(mats) - 1)),
                                 squeeze=False, gridspec_kw={"height_ratios": heights})
        for ax, (arch, m, sub) in zip(axes[:, 0], mats):
            epochs = list(m.columns)
            im = ax.imshow(m.to_numpy(dtype=float), aspect="auto", origin="lower",
                           cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax,
                           extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(m) - 0.5))
            names = [_DELTA_RE.match(k).group(2) for k in m.index]
            step = max(1, len(names) // 12)
            ax.set_yticks(range(0, len(names), step))
            ax.set_yticklabels(names[::step], fontsize=4)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("layer")
            ax.set_title(_wrap(f"{arch_label(arch)}: mean δ_trained of {len(sub)} NQ runs"
                               f"{_pooled_note(sub)}", WIDTH - 1.0, 5.5), fontsize=5.5)
        axes[-1, 0].set_xlabel("epoch")
        _fixed_layout(fig, len(mats), 1, left=0.7, right=0.85, hspace=0.4, bottom=0.35)
        cax = fig.add_axes([1 - 0.75 / fig.get_size_inches()[0], 0.35 / fig.get_size_inches()[1],
                            0.08 / fig.get_size_inches()[0],
                            1 - 0.6 / fig.get_size_inches()[1]])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label("δ (noise std), one scale for all panels", fontsize=5)
        cb.ax.tick_params(labelsize=5)
        return _save(fig, path)


# ---------------------------------------------------------------- residual overlay (Fig. 2)
OVERLAY_METHODS = ("QCFS", "NQ")


def pooled_residual_hist(datas: "Iterable[dict]", residual: str | None = None
                         ) -> tuple[np.ndarray, list[str], np.ndarray, int] | None:
    """Sum of the per-layer residual histograms of several runs (same bins and layers):
    (edges, layers, counts [layers x bins], runs used); ``residual`` picks the residual
    kind from ``counts_by_residual`` (default: each run's own)."""
    edges = layers = total = None
    used = 0
    for d in datas:
        if not d or not d.get("edges"):
            continue
        counts = (d.get("counts_by_residual") or {}).get(residual) if residual else None
        if counts is None:
            if residual and d.get("residual") not in (None, residual):
                continue
            counts = d.get("counts")
        if not counts:
            continue
        e = np.asarray(d["edges"], dtype=float)
        c = np.asarray(counts, dtype=float)
        if edges is None:
            edges, layers, total = e, list(d.get("layers") or range(len(c))), np.zeros_like(c)
        if e.shape != edges.shape or not np.allclose(e, edges) or c.shape != total.shape:
            continue
        total += c
        used += 1
    return None if edges is None or used == 0 else (edges, [str(x) for x in layers], total, used)


def residual_overlay(datas: dict[str, dict[str, list[dict]]], title: str, path: Path,
                     residual: str | None = None, ncols: int = 5) -> Path | None:
    """Fig. 2: per layer, the histograms of the residual (units of λ) of QCFS and NQ
    overlaid, each pooled over the method's runs (counts summed) and drawn as a density
    per unit of residual/λ on a log scale; one row per architecture (``datas``: arch ->
    method -> the runs' residual_hist.json), at most ``ncols`` layers per row, evenly
    spaced from the first to the last."""
    rows = _overlay_rows(datas, residual, ncols)
    if not rows:
        return None
    ncols = max(len(r[4]) for r in rows)
    nrows = len(rows)
    height = 1.15 * nrows + 0.8
    with plt.rc_context({**STYLE, "font.size": 5, "axes.titlesize": 5, "xtick.labelsize": 4.5,
                         "ytick.labelsize": 4.5, "legend.fontsize": 5}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(2 * WIDTH, height), squeeze=False,
                                 sharey="row")
        handles: dict[str, object] = {}
        for (arch, pooled, edges, layers, shown), row in zip(rows, axes):
            _overlay_row(row, arch, pooled, edges, layers, shown, handles)
        for ax in axes[-1, :]:
            ax.set_xlabel("residual / λ", fontsize=4.5)
        fig.suptitle(_wrap(f"{title}: residual / λ per layer ({ncols} layers per "
                           "architecture, evenly spaced), QCFS and NQ overlaid; each pooled "
                           "over its runs (counts summed); σ of the pooled histogram",
                           2 * WIDTH, 5.5), fontsize=5.5)
        _fixed_layout(fig, nrows, ncols, left=0.6, top=0.35, bottom=0.45, wspace=0.12,
                      hspace=0.35)
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   ncol=len(handles), frameon=False)
        return _save(fig, path)


def _overlay_rows(datas: dict[str, dict[str, list[dict]]], residual: str | None,
                  ncols: int) -> list[tuple]:
    """Per architecture with a histogram: (arch, method -> pooled histogram, edges,
    layer names, the indices of the at most ``ncols`` layers shown)."""
    rows = []
    for arch, by_method in datas.items():
        pooled = {m: pooled_residual_hist(by_method.get(m, []), residual)
                  for m in OVERLAY_METHODS}
        pooled = {m: v for m, v in pooled.items() if v is not None}
        if not pooled:
            continue
        edges, layers, _, _ = next(iter(pooled.values()))
        pooled = {m: v for m, v in pooled.items()
                  if v[0].shape == edges.shape and np.allclose(v[0], edges)
                  and v[2].shape[0] == len(layers)}
        n = len(layers)
        shown = sorted(set(np.linspace(0, n - 1, min(n, ncols)).round().astype(int)))
        rows.append((arch, pooled, edges, layers, shown))
    return rows


def _overlay_row(row, arch: str, pooled: dict, edges: np.ndarray, layers: list[str],
                 shown: list[int], handles: dict) -> None:
    """One architecture: a panel per shown layer, the unused panels off, and the
    row's label (the architecture and its runs per method)."""
    narrow = _narrow_density(pooled, shown, edges)
    for ax, li in zip(row, shown):
        _overlay_layer(ax, pooled, li, edges, narrow, handles)
        ax.set_title(f"{layers[li]}", pad=1.5)
    for ax in row[len(shown):]:
        ax.axis("off")
    runs_txt = ", ".join(f"{m}: {v[3]} runs" for m, v in pooled.items())
    row[0].set_ylabel(f"{arch_label(arch)}\n({runs_txt})\ndensity per unit", fontsize=4.5)


def _narrow_density(pooled: dict, shown: list[int], edges: np.ndarray) -> bool:
    """Whether the positive densities of a row's panels span less than 3 decades (then
    the log axis is labelled 1-2-5)."""
    widths = np.diff(edges)
    dens_all = np.concatenate([(v[2][li] / max(v[2][li].sum(), 1) / widths)
                               for v in pooled.values() for li in shown])
    pos = dens_all[dens_all > 0]
    return pos.size == 0 or pos.max() / pos.min() < 1e3


def _overlay_layer(ax, pooled: dict, li: int, edges: np.ndarray, narrow: bool,
                   handles: dict) -> None:
    """One layer: each method's pooled histogram as a density (log scale), with its σ."""
    widths = np.diff(edges)
    centers = (edges[:-1] + edges[1:]) / 2
    for k, (m, (_, _, counts, _)) in enumerate(pooled.items()):
        c = counts[li]
        tot = c.sum()
        if not tot:
            continue
        dens = c / (tot * widths)
        h = ax.stairs(np.where(dens > 0, dens, np.nan), edges, color=_color(m),
                      linewidth=0.7, label=m)
        handles.setdefault(m, h)
        mu = float((c * centers).sum() / tot)
        sd = math.sqrt(max(0.0, float((c * centers ** 2).sum() / tot) - mu ** 2))
        ax.text(0.97, 0.95 - 0.14 * k, f"σ={sd:.2f}", transform=ax.transAxes,
                ha="right", va="top", color=_color(m), fontsize=4.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if narrow else (1.0,),
                                          numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xticks([-1, 0, 1] if edges[0] <= -1 and edges[-1] >= 1 else
                  [edges[0], 0, edges[-1]])
    ax.axvline(0, color="k", linewidth=0.3)
    ax.tick_params(length=1.5, pad=1)


# ---------------------------------------------------------------- ablations
def layerwise_reference(nq: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """Fig. 4's layer-wise reference among NQ runs: those at τ = L (the paper's choice)
    if any, else at the most common τ; (that τ, the runs)."""
    if nq.empty or "tau" not in nq.columns:
        return None, nq.iloc[:0]
    taus = nq["tau"][nq["tau"] != NA]
    if taus.empty:
        return None, nq.iloc[:0]
    tau = taus.mode().iloc[0]
    if "L" in nq.columns:
        at_l = nq[nq["tau"] == nq["L"]]
        if not at_l.empty and at_l["tau"].nunique() == 1:
            tau = at_l["tau"].iloc[0]
    return str(tau), nq[nq["tau"] == tau]


def ablation(runs: pd.DataFrame, setting: str, path: Path, xlabel: str,
             log_x: bool = False, reference: pd.DataFrame | None = None,
             reference_label: str = "") -> Path | None:
    """SNN accuracy vs a setting (one line per T), one subplot per (dataset, arch).
    ``reference``: runs drawn as one dashed level per T (mean over them) in the panel of
    their dataset and arch (Fig. 4: the layer-wise δ against fixed δ)."""
    runs = runs[runs[setting] != NA]
    if runs[setting].nunique() < 2:
        return None
    ts = t_values(runs)
    panels = sorted(runs.groupby(["dataset", "arch"], sort=False).groups,
                    key=lambda k: (k[0], arch_order(k[1])))
    multi_ds = runs["dataset"].nunique() > 1
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, 2.1 * len(panels) + 0.3),
                                 squeeze=False, sharex=True)
        for ax, (ds, arch) in zip(axes[:, 0], panels):
            sub = runs[(runs["dataset"] == ds) & (runs["arch"] == arch)]
            xs_all = sorted(sub[setting].unique(), key=setting_sort_key)
            numeric = all(setting_sort_key(v)[0] == 0 for v in xs_all)
            xpos = [float(v) for v in xs_all] if numeric else list(range(len(xs_all)))
            tcols = [f"T{t}" for t in ts]
            grp = sub[[setting] + tcols].groupby(setting)[tcols]
            mean, std, cnt = grp.mean(), grp.std(ddof=1), grp.count()
            for i, (t, c) in enumerate(zip(ts, tcols)):
                pts = [(x, mean.at[v, c], std.at[v, c]) for x, v in zip(xpos, xs_all)
                       if cnt.at[v, c] > 0]
                if not pts:
                    continue
                color = plt.cm.viridis(i / max(1, len(ts) - 1))
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[0.0 if pd.isna(p[2]) else p[2] for p in pts],
                            marker="o", capsize=2, color=color, label=f"T={t}")
                ref = (reference[(reference["dataset"] == ds) & (reference["arch"] == arch)]
                       if reference is not None and c in reference.columns else None)
                if ref is not None and ref[c].notna().any():
                    ax.axhline(float(ref[c].mean()), color=color, linestyle="--",
                               linewidth=0.8,
                               label=_wrap(f"{reference_label} (n = "
                                           f"{int(ref[c].notna().sum())})", WIDTH - 0.3, 6)
                               if i == 0 else None)
            if log_x and numeric and min(xpos) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xpos)
            ax.set_xticklabels(xs_all)
            span = (np.log2(max(xpos) / min(xpos)) if ax.get_xscale() == "log"
                    else max(xpos) - min(xpos))
            gaps = np.diff(np.log2(xpos) if ax.get_xscale() == "log" else xpos)
            if span > 0 and gaps.size and gaps.min() / span < 0.08:   # labels would touch
                ax.tick_params(axis="x", labelrotation=60)
            ax.set_ylabel("SNN test accuracy (%)")
            ax.set_title(_wrap(f"{arch_label(arch)}" + (f" — {ds}" if multi_ds else "")
                               + _pooled_note(sub, exclude=setting), WIDTH, 7))
        axes[-1, 0].set_xlabel(xlabel)
        _ablation_legends(fig, axes, len(panels))
        return _save(fig, path)


def _ablation_legends(fig, axes, n_panels: int) -> None:
    """Below the panels: one legend for the T lines, then the reference's line (or
    lines); the bottom margin is made to hold them."""
    handles, labels = axes[0, 0].get_legend_handles_labels()
    is_t = [lab.startswith("T=") for lab in labels]
    ref_lines = sum(lab.count("\n") + 1 for lab, t in zip(labels, is_t) if not t)
    bottom = 0.9 + 0.1 * ref_lines       # in inches: tick labels, x label, legends
    _fixed_layout(fig, n_panels, 1, hspace=0.35, bottom=bottom)
    h_in = fig.get_size_inches()[1]
    t_handles = [(h, lab) for h, lab, t in zip(handles, labels, is_t) if t]
    fig.legend([h for h, _ in t_handles], [lab for _, lab in t_handles],
               loc="lower center", ncol=min(4, len(t_handles)) or 1, frameon=False,
               bbox_to_anchor=(0.5, (0.1 * ref_lines + 0.02) / h_in))
    if ref_lines:
        fig.legend([h for h, t in zip(handles, is_t) if not t],
                   [lab for lab, t in zip(labels, is_t) if not t], loc="lower center",
                   frameon=False, bbox_to_anchor=(0.5, 0.0))


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
