"""Pure functions: tidy run frame -> Table 1 / Table 2 (markdown and LaTeX).

The tidy frame is the one built by :mod:`harness.report.collect` (one row per
finished trial run; columns ``dataset``, ``dataset_key``, ``arch``,
``method``, ``seed``, the settings in ``SETTINGS``, ``ann`` and ``T<k>``).
Seeds are replicates: a cell is the mean, sample std (ddof=1) and n of the
seeds of its group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import pandas as pd

from .collect import (NA, SETTING_LABELS, SETTINGS, T_COLUMNS_RE, _RELEVANT, arch_label,
                      arch_order, method_order, setting_sort_key)

__all__ = [
    "Stat", "Row", "Block", "stat_of", "fmt_stat", "latex_escape", "varying_settings",
    "t_values", "load_published", "load_published_table2", "build_table1",
    "table1_frame", "render_table1_md", "render_table1_tex", "build_table2",
    "render_table2_md", "render_table2_tex", "PUBLISHED_METHODS", "REFERENCE_DIR",
]

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "reports" / "reference"
PUBLISHED_METHODS = ("QCFS", "NQ")   # published rows shown next to the measured ones
DELTA_METHOD, BASE_METHOD = "NQ", "QCFS"
# settings that define a fair NQ-vs-QCFS pair besides (dataset, arch, seed)
PAIR_SETTINGS = [s for s in SETTINGS if s not in _RELEVANT]


# --------------------------------------------------------------------------- stats
class Stat(NamedTuple):
    mean: float
    std: float      # nan when n == 1
    n: int


def stat_of(values: Iterable[float]) -> Stat | None:
    vals = [float(v) for v in values if v is not None and not pd.isna(v)]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    return Stat(mean, std, n)


def fmt_stat(s: Stat | None, fmt: str = "md", signed: bool = False, with_n: bool | None = None) -> str:
    """``90.50 ± 0.71 (n=2)`` (md) / ``90.50 $\\pm$ 0.71`` (tex); plain value when n == 1."""
    if s is None or pd.isna(s.mean):
        return NA if fmt == "md" else "--"
    if with_n is None:
        with_n = fmt == "md"
    m = f"{s.mean:+.2f}" if signed else f"{s.mean:.2f}"
    if fmt == "tex" and signed:
        m = m.replace("-", "$-$", 1)
    if s.n <= 1 or pd.isna(s.std):
        return m
    pm = " ± " if fmt == "md" else " $\\pm$ "
    out = f"{m}{pm}{s.std:.2f}"
    return f"{out} (n={s.n})" if with_n else out


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "δ": r"$\delta$", "τ": r"$\tau$", "λ": r"$\lambda$", "Δ": r"$\Delta$",
    "−": r"$-$", "—": "--", "–": "--", "≤": r"$\leq$", "≥": r"$\geq$",
}


def latex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def varying_settings(runs: pd.DataFrame) -> list[str]:
    """Settings with more than one (non-masked) value among the runs."""
    return [s for s in SETTINGS if s in runs.columns and runs.loc[runs[s] != NA, s].nunique() > 1]


def t_values(runs: pd.DataFrame) -> list[int]:
    return sorted(int(m.group(1)) for c in runs.columns
                  if (m := T_COLUMNS_RE.match(str(c))) and runs[c].notna().any())


# ----------------------------------------------------------------------- published
def load_published(path: str | Path | None = None) -> pd.DataFrame:
    path = Path(path) if path is not None else REFERENCE_DIR / "published.csv"
    if not path.exists():
        return pd.DataFrame(columns=["dataset", "arch", "method", "source", "ann"])
    return pd.read_csv(path, dtype={"dataset": str, "arch": str, "method": str, "source": str})


def load_published_table2(path: str | Path | None = None) -> pd.DataFrame:
    path = Path(path) if path is not None else REFERENCE_DIR / "published_table2.csv"
    if not path.exists():
        return pd.DataFrame(columns=["dataset", "method", "type", "arch", "acc", "T", "source"])
    return pd.read_csv(path)


# ------------------------------------------------------------------------- table 1
@dataclass
class Row:
    arch: str
    method: str                       # display label
    kind: str                         # "measured" | "delta" | "published"
    settings: dict[str, str]
    cells: dict[str, Stat | None]     # column ("ANN", "T=1", ...) -> Stat
    bold: set[str] = field(default_factory=set)

    @property
    def n(self) -> int | None:
        ns = [c.n for c in self.cells.values() if c is not None]
        return max(ns) if ns and self.kind != "published" else None


@dataclass
class Block:
    dataset: str                      # display label
    dataset_key: str
    setting_cols: list[str]
    value_cols: list[str]             # "ANN", "T=1", ...
    rows: list[Row]


def _value_map(ts: list[int]) -> dict[str, str]:
    """Display column -> tidy column."""
    return {"ANN": "ann", **{f"T={t}": f"T{t}" for t in ts}}


def _group_key_order(keys: tuple, cols: list[str]) -> tuple:
    out = []
    for k, c in zip(keys, cols):
        if c == "arch":
            out.append(arch_order(k))
        elif c == "method":
            out.append(method_order(k))
        else:
            out.append(setting_sort_key(k))
    return tuple(out)


def _delta_rows(ds_runs: pd.DataFrame, arch: str, settings_cols: list[str],
                vmap: dict[str, str]) -> list[Row]:
    """NQ minus QCFS, paired by (dataset, arch, seed, L/lam_init/epochs)."""
    runs = ds_runs[ds_runs["arch"] == arch]
    nq = runs[runs["method"] == DELTA_METHOD]
    base = runs[runs["method"] == BASE_METHOD]
    if nq.empty or base.empty:
        return []
    pair_on = ["seed"] + [s for s in PAIR_SETTINGS if s in runs.columns]
    vcols = list(vmap.values())
    base_mean = base.groupby(pair_on, dropna=False)[vcols].mean()
    rows = []
    for gkey, grp in nq.groupby(settings_cols, dropna=False, sort=False) if settings_cols \
            else [((), nq)]:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        mine = grp.groupby(pair_on, dropna=False)[vcols].mean()
        common = mine.index.intersection(base_mean.index)
        if len(common) == 0:
            continue
        diff = mine.loc[common] - base_mean.loc[common]
        cells = {disp: stat_of(diff[col]) for disp, col in vmap.items()}
        rows.append(Row(arch=arch, method=f"Δ {DELTA_METHOD} − {BASE_METHOD}", kind="delta",
                        settings=dict(zip(settings_cols, gkey)), cells=cells))
    return rows


def build_table1(runs: pd.DataFrame, published: pd.DataFrame | None = None,
                 published_methods: Iterable[str] = PUBLISHED_METHODS) -> list[Block]:
    """One Block per dataset; measured rows, Δ rows and published rows per arch."""
    settings_cols = varying_settings(runs)
    ts = t_values(runs)
    vmap = _value_map(ts)
    published_methods = list(published_methods)
    blocks = []
    for ds in sorted(runs["dataset"].unique()):
        ds_runs = runs[runs["dataset"] == ds]
        key = str(ds_runs["dataset_key"].iloc[0])
        rows: list[Row] = []
        for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
            a_runs = ds_runs[ds_runs["arch"] == arch]
            gcols = ["method"] + settings_cols
            groups = sorted(a_runs.groupby(gcols, dropna=False, sort=False),
                            key=lambda kv: _group_key_order(
                                kv[0] if isinstance(kv[0], tuple) else (kv[0],), gcols))
            measured = []
            for gkey, grp in groups:
                gkey = gkey if isinstance(gkey, tuple) else (gkey,)
                cells = {disp: stat_of(grp[col]) for disp, col in vmap.items()}
                measured.append(Row(arch=arch, method=str(gkey[0]), kind="measured",
                                    settings=dict(zip(settings_cols, gkey[1:])), cells=cells))
            _mark_best(measured, list(vmap))
            rows += measured
            rows += _delta_rows(ds_runs, arch, settings_cols, vmap)
            if published is not None and not published.empty:
                pub = published[(published["dataset"] == key) & (published["arch"] == arch)]
                for m in sorted(set(pub["method"]) & set(published_methods), key=method_order):
                    prow = pub[pub["method"] == m].iloc[0]
                    cells = {}
                    for disp, col in vmap.items():
                        v = prow.get(col, float("nan"))
                        cells[disp] = None if pd.isna(v) else Stat(float(v), float("nan"), 1)
                    rows.append(Row(arch=arch, method=f"{m} (published)", kind="published",
                                    settings={s: NA for s in settings_cols}, cells=cells))
        blocks.append(Block(dataset=ds, dataset_key=key, setting_cols=settings_cols,
                            value_cols=list(vmap), rows=rows))
    return blocks


def _mark_best(rows: list[Row], cols: list[str]) -> None:
    """Bold the best mean (at 2-decimal display precision) per column; needs >= 2 rows."""
    for col in cols:
        vals = [(r, round(r.cells[col].mean, 2)) for r in rows
                if r.cells.get(col) is not None and not pd.isna(r.cells[col].mean)]
        if len(vals) < 2:
            continue
        best = max(v for _, v in vals)
        for r, v in vals:
            if v == best:
                r.bold.add(col)


def table1_frame(block: Block, fmt: str = "md") -> pd.DataFrame:
    """Block -> DataFrame of display strings (``fmt`` = "md" or "tex")."""
    tex = fmt == "tex"
    records = []
    for r in block.rows:
        rec = {"Arch": arch_label(r.arch), "Method": r.method}
        for s in block.setting_cols:
            rec[SETTING_LABELS[s]] = r.settings.get(s, NA)
        if tex:
            rec["n"] = "" if r.n is None else str(r.n)
        for col in block.value_cols:
            text = fmt_stat(r.cells.get(col), fmt, signed=r.kind == "delta")
            if col in r.bold:
                text = f"\\textbf{{{text}}}" if tex else f"**{text}**"
            rec[col] = text
        records.append(rec)
    cols = (["Arch", "Method"] + [SETTING_LABELS[s] for s in block.setting_cols]
            + (["n"] if tex else []) + block.value_cols)
    df = pd.DataFrame.from_records(records, columns=cols)
    if tex:  # escape text columns; value cells are already LaTeX
        for c in cols[: len(cols) - len(block.value_cols)]:
            df[c] = df[c].map(latex_escape)
        df.columns = [latex_escape(c) if c not in block.value_cols
                      else (f"${c}$" if c.startswith("T=") else c) for c in cols]
    return df


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


def render_table1_md(blocks: list[Block], title: str | None = "Table 1", level: int = 2) -> str:
    """Markdown Table 1; one ``level``-deep heading per dataset block."""
    parts = [f"# {title}\n"] if title else []
    parts.append("SNN test accuracy (%) after conversion, by number of time steps T. "
                 "Mean ± sample std over seeds (n = seeds). Bold: best measured mean per "
                 "architecture and column. Δ: NQ − QCFS paired by seed (same dataset, "
                 "architecture and L). Published rows are the NQ paper's Table 1.\n")
    for b in blocks:
        parts.append(f"{'#' * level} {b.dataset}\n")
        parts.append(_md(table1_frame(b, "md")) + "\n")
    return "\n".join(parts)


def _styler_latex(df: pd.DataFrame, n_text_cols: int, caption: str, label: str,
                  group_starts: list[int]) -> str:
    col_format = "l" * n_text_cols + "r" * (df.shape[1] - n_text_cols)
    tex = df.style.hide(axis="index").to_latex(
        hrules=True, column_format=col_format, caption=caption, label=label,
        position_float="centering")
    # rule between architecture groups
    if group_starts:
        lines = tex.splitlines()
        body_start = lines.index("\\midrule") + 1
        for i in sorted(group_starts, reverse=True):
            if i > 0:
                lines.insert(body_start + i, "\\midrule")
        tex = "\n".join(lines) + "\n"
    return tex


def render_table1_tex(blocks: list[Block]) -> str:
    parts = ["% Table 1 -- generated by `harness report`; needs \\usepackage{booktabs}\n"]
    for b in blocks:
        df = table1_frame(b, "tex")
        starts = [i for i, r in enumerate(b.rows) if i == 0 or r.arch != b.rows[i - 1].arch]
        parts.append(_styler_latex(
            df, n_text_cols=df.shape[1] - len(b.value_cols),
            caption=latex_escape(f"SNN test accuracy (%) on {b.dataset} vs. time steps T "
                                 "(mean ± std over seeds)."),
            label=f"tab:acc-{b.dataset_key}", group_starts=starts))
    return "\n".join(parts)


# ------------------------------------------------------------------------- table 2
LOW_T = 4        # "low latency": best accuracy at T <= 4
TOLERANCE = 1.0  # points below the ANN


def _t2_record(arch: str, method: str, settings: dict[str, str], ann: Stat | None,
               by_t: dict[int, Stat | None], fmt: str) -> dict:
    low = [(t, s) for t, s in by_t.items() if t <= LOW_T and s is not None]
    best_t, best = max(low, key=lambda ts: ts[1].mean) if low else (None, None)
    reach = NA
    if ann is not None:
        for t in sorted(by_t):
            s = by_t[t]
            if s is not None and s.mean >= ann.mean - TOLERANCE:
                reach = f"T={t}"
                break
    return {"arch": arch, "method": method, **settings, "ann": fmt_stat(ann, fmt),
            "best": fmt_stat(best, fmt), "best_T": NA if best_t is None else f"T={best_t}",
            "reach": reach}


def build_table2(runs: pd.DataFrame, published: pd.DataFrame | None = None,
                 published_methods: Iterable[str] = PUBLISHED_METHODS,
                 fmt: str = "md") -> dict[str, pd.DataFrame]:
    """dataset label -> frame of (arch, method, settings, ann, best, best_T, reach)."""
    settings_cols = varying_settings(runs)
    ts = t_values(runs)
    out = {}
    for ds in sorted(runs["dataset"].unique()):
        ds_runs = runs[runs["dataset"] == ds]
        key = str(ds_runs["dataset_key"].iloc[0])
        recs = []
        gcols = ["method"] + settings_cols
        for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
            a_runs = ds_runs[ds_runs["arch"] == arch]
            groups = sorted(a_runs.groupby(gcols, dropna=False, sort=False),
                            key=lambda kv: _group_key_order(kv[0], gcols))
            for gkey, grp in groups:
                by_t = {t: stat_of(grp[f"T{t}"]) for t in ts}
                recs.append(_t2_record(arch, gkey[0], dict(zip(settings_cols, gkey[1:])),
                                       stat_of(grp["ann"]), by_t, fmt))
            if published is None or published.empty:
                continue
            pub = published[(published["dataset"] == key) & (published["arch"] == arch)]
            for m in sorted(set(pub["method"]) & set(published_methods), key=method_order):
                prow = pub[pub["method"] == m].iloc[0]
                pts = {t: (None if pd.isna(prow.get(f"T{t}", float("nan")))
                           else Stat(float(prow[f"T{t}"]), float("nan"), 1))
                       for t in (1, 2, 4, 8, 16, 32, 64)}
                recs.append(_t2_record(arch, f"{m} (published)", {s: NA for s in settings_cols},
                                       Stat(float(prow["ann"]), float("nan"), 1), pts, fmt))
        df = pd.DataFrame.from_records(recs)
        df["arch"] = df["arch"].map(arch_label)
        out[ds] = df.rename(columns={
            "arch": "Arch", "method": "Method", **{s: SETTING_LABELS[s] for s in settings_cols},
            "ann": "ANN", "best": f"Best SNN (T ≤ {LOW_T})", "best_T": "at",
            "reach": f"First T with SNN ≥ ANN − {TOLERANCE:g}"})
        out[ds].attrs["dataset_key"] = key
    return out


def _other_methods(pub2: pd.DataFrame | None, key: str) -> pd.DataFrame | None:
    if pub2 is None or pub2.empty:
        return None
    sub = pub2[pub2["dataset"] == key]
    if sub.empty:
        return None
    return pd.DataFrame({"Method": sub["method"], "Type": sub["type"], "Arch": sub["arch"],
                         "Acc": sub["acc"].map(lambda v: f"{v:.2f}"),
                         "T": sub["T"].astype(int).astype(str)})


def render_table2_md(tables: dict[str, pd.DataFrame], pub2: pd.DataFrame | None = None) -> str:
    parts = ["# Table 2\n",
             f"Low-latency summary: best SNN test accuracy (%) at T ≤ {LOW_T} and the smallest "
             f"T whose mean SNN accuracy is within {TOLERANCE:g} point of the ANN mean "
             "(— if none of the evaluated T).\n"]
    for ds, df in tables.items():
        parts.append(f"## {ds}\n")
        parts.append(_md(df) + "\n")
        other = _other_methods(pub2, df.attrs.get("dataset_key", ""))
        if other is not None:
            parts.append(f"Other SNN methods on {ds} (published, NQ paper Table 2):\n")
            parts.append(_md(other) + "\n")
    return "\n".join(parts)


def render_table2_tex(tables: dict[str, pd.DataFrame]) -> str:
    parts = ["% Table 2 -- generated by `harness report`; needs \\usepackage{booktabs}\n"]
    for ds, df in tables.items():
        tdf = df.map(latex_escape)
        tdf.columns = [latex_escape(c) for c in df.columns]
        n_text = 2 + sum(1 for c in df.columns if c not in ("Arch", "Method") and c in
                         SETTING_LABELS.values())
        arch = list(df["Arch"])
        starts = [i for i in range(len(arch)) if i == 0 or arch[i] != arch[i - 1]]
        parts.append(_styler_latex(
            tdf, n_text_cols=n_text,
            caption=latex_escape(f"Low-latency summary on {ds}: best SNN accuracy (%) at "
                                 f"T ≤ {LOW_T} and first T within {TOLERANCE:g} point of the ANN."),
            label=f"tab:lowT-{df.attrs.get('dataset_key', 'ds')}", group_starts=starts))
    return "\n".join(parts)
