"""Pure functions: tidy run frame -> Table 1 / Table 2 (markdown and LaTeX).

The tidy frame is the one built by :mod:`harness.report.collect` (one row per
finished trial run; columns ``dataset``, ``dataset_key``, ``arch``,
``method``, ``seed``, the setting columns (:func:`collect.is_setting_column`),
``ann``, ``ann_noisy`` and ``T<k>``).  Rows are keyed by method and by every
setting that varies among the runs (:func:`varying_settings`).  Seeds are
replicates: a cell is the mean, sample std (ddof=1) and n of the seeds of its
group (runs of the same seed within one group are averaged first).  Δ rows pair
NQ and QCFS by seed within the same dataset, architecture and every varying
setting that applies to both methods; their statistics come from
:mod:`harness.report.stats`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from ..methods import BASE_METHOD, DELTA_METHOD
from . import protocol
from .collect import (NA, T_COLUMNS_RE, arch_label, arch_order, is_setting_column,
                      method_order, relevant_methods, setting_label, setting_sort_key)
from .stats import (CONFIDENCE, MIN_N_BOOT, MIN_N_TEST, N_BOOT, Paired, Stat, fmt_ci, fmt_p,
                    holm, paired_stats_many, summary)

__all__ = [
    "Stat", "Paired", "Row", "Block", "stat_of", "fmt_stat", "latex_escape",
    "varying_settings", "pair_settings", "t_values", "load_published",
    "load_published_table2", "build_table1", "table1_frame", "render_table1_md",
    "table1_caption", "build_table2",
    "render_table2_md",
    "delta_findings", "per_seed_tables", "PUBLISHED_METHODS",
    "REFERENCE_DIR", "DAGGER", "ENERGY_COLUMN", "E_AC_PJ", "E_MAC_PJ",
]

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "reports" / "reference"
PUBLISHED_METHODS = ("QCFS", "NQ")   # published rows shown next to the measured ones
DELTA_LABEL = f"Δ {DELTA_METHOD} − {BASE_METHOD}"
DAGGER = "†"


# --------------------------------------------------------------------------- stats
def stat_of(values: Iterable[float]) -> Stat | None:
    """Mean, sample std and n (see :func:`stats.summary`)."""
    return summary(values)


def fmt_stat(s: Stat | Paired | None, fmt: str = "md", signed: bool = False,
             with_n: bool | None = None) -> str:
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
    "−": r"$-$", "—": "--", "–": "--", "≤": r"$\leq$", "≥": r"$\geq$", "†": r"$^\dagger$",
    "“": "``", "”": "''", "≈": r"$\approx$", "×": r"$\times$", "<": r"$<$", ">": r"$>$",
    "μ": r"$\mu$", "σ": r"$\sigma$", "√": r"$\surd$", "↳": "",
}


def latex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _setting_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if is_setting_column(c)]


def varying_settings(runs: pd.DataFrame) -> list[str]:
    """Settings that take more than one value among the runs: row keys of the tables.

    A setting that applies to every method (``relevant_methods`` is None) varies
    if its values differ anywhere; one that applies to some methods only varies
    if it differs among the runs of one of those methods (it is masked, "—",
    for the others).  A missing value counts as a value of its own.
    """
    cols = _setting_columns(runs)
    if not cols or runs.empty:
        return []
    vals = runs[cols].astype(object)
    vals = vals.where(vals.notna(), NA)
    overall = vals.nunique(dropna=False)
    by_method = (vals.groupby(runs["method"]).nunique(dropna=False)
                 if "method" in runs.columns else None)
    out = []
    for s in cols:
        if relevant_methods(s) is None or by_method is None:
            varies = overall[s] > 1
        else:
            varies = bool((by_method[s] > 1).any())
        if varies:
            out.append(s)
    return out


def pair_settings(settings: list[str]) -> list[str]:
    """The settings an NQ − QCFS pair must share (those that apply to both methods)."""
    out = []
    for s in settings:
        rel = relevant_methods(s)
        if rel is None or (DELTA_METHOD in rel and BASE_METHOD in rel):
            out.append(s)
    return out


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
    cells: dict[str, Stat | Paired | None]   # column ("ANN", "T=1", ...) -> statistic
    bold: set[str] = field(default_factory=set)
    published_delta: dict[str, float] = field(default_factory=dict)  # Δ rows: the paper's Δ
    per_seed: pd.DataFrame | None = None     # Δ rows: per-seed differences (display columns)
    dup_seeds: bool = False           # measured rows: several runs of one seed were averaged

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
    protocol: str = ""                # "Protocol differences from the paper: ..."
    notes: list[str] = field(default_factory=list)


def _value_map(ts: list[int], noisy: bool = False) -> dict[str, str]:
    """Display column -> tidy column."""
    extra = {protocol.NOISY_ANN_COLUMN: "ann_noisy"} if noisy else {}
    return {"ANN": "ann", **extra, **{f"T={t}": f"T{t}" for t in ts}}


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


def _groups(frame: pd.DataFrame, cols: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """groupby over ``cols`` (tuple keys, sorted by method and setting order)."""
    if not cols:
        return [((), frame)]
    out = [(k if isinstance(k, tuple) else (k,), g)
           for k, g in frame.groupby(cols, dropna=False, sort=False)]
    return sorted(out, key=lambda kv: _group_key_order(kv[0], cols))


def _per_seed(grp: pd.DataFrame, on: list[str], vcols: list[str]) -> pd.DataFrame:
    """One row per seed (and ``on``): runs of the same seed are averaged."""
    cols = [c for c in vcols if c in grp.columns]
    per = grp.groupby(["seed"] + on, dropna=False)[cols].mean()
    return per.reindex(columns=vcols)


def _seed_values(grp: pd.DataFrame, vcols: list[str]) -> tuple[pd.DataFrame, bool]:
    """The per-seed values of a group (order not kept: for summaries), and whether
    several runs of one seed were averaged.  One run per seed: the rows as they are."""
    if grp["seed"].is_unique:
        return grp.reindex(columns=vcols), False
    return _per_seed(grp, [], vcols), True


def _has_values(runs: pd.DataFrame, col: str) -> bool:
    return col in runs.columns and bool(pd.to_numeric(runs[col], errors="coerce").notna().any())


def _published_row(pub: pd.DataFrame, method: str) -> pd.Series | None:
    sub = pub[pub["method"] == method]
    return None if sub.empty else sub.iloc[0]


def _delta_rows(a_runs: pd.DataFrame, arch: str, settings_cols: list[str],
                vmap: dict[str, str], pub: pd.DataFrame | None) -> tuple[list[Row], list[str]]:
    """NQ minus QCFS per seed within the same (dataset, arch, shared varying settings)."""
    nq = a_runs[a_runs["method"] == DELTA_METHOD]
    base = a_runs[a_runs["method"] == BASE_METHOD]
    if nq.empty or base.empty:
        return [], []
    pair_on = pair_settings(settings_cols)
    vcols = list(vmap.values())
    pub_delta = _published_delta(pub, vmap)
    base_vals = _base_seed_values(base, pair_on, vcols)
    by_group = _nq_seed_values(nq, settings_cols, vcols)
    rows, notes = [], []
    pairs: list[tuple[Row, np.ndarray, np.ndarray]] = []
    for gkey in sorted(by_group, key=lambda k: _group_key_order(k, settings_cols)):
        settings = dict(zip(settings_cols, gkey))
        pkey = tuple(settings[s] for s in pair_on)
        mine = by_group[gkey]
        common = [(seed, v) for seed, v in mine if (seed, *pkey) in base_vals]
        where = ", ".join(f"{setting_label(k)}={v}" for k, v in settings.items())
        label = f"{arch_label(arch)}{f' ({where})' if where else ''}"
        if not common:
            notes.append(f"No Δ row for {label}: no QCFS run has the same seed and shared "
                         "settings as the NQ runs.")
            continue
        partners = {k[0] for k in base_vals if k[1:] == pkey}   # QCFS seeds of the group
        notes += _unpaired_notes(label, mine, common, partners)
        a = np.vstack([v for _, v in common])
        b = np.vstack([base_vals[(seed, *pkey)] for seed, _ in common])
        diff = pd.DataFrame(a - b, index=pd.Index([seed for seed, _ in common], name="seed"),
                            columns=list(vmap))
        row = Row(arch=arch, method=DELTA_LABEL, kind="delta", settings=settings,
                  cells={}, published_delta=pub_delta, per_seed=diff)
        rows.append(row)
        pairs.append((row, a, b))
    _set_delta_cells(pairs, vmap)
    return rows, notes


def _published_delta(pub: pd.DataFrame | None, vmap: dict[str, str]) -> dict[str, float]:
    """The paper's NQ − QCFS per display column, where it publishes both."""
    pub_delta: dict[str, float] = {}
    if pub is None or pub.empty:
        return pub_delta
    p_nq, p_base = _published_row(pub, DELTA_METHOD), _published_row(pub, BASE_METHOD)
    if p_nq is None or p_base is None:
        return pub_delta
    for disp, col in vmap.items():
        a, b = p_nq.get(col, float("nan")), p_base.get(col, float("nan"))
        if not (pd.isna(a) or pd.isna(b)):
            pub_delta[disp] = float(a) - float(b)
    return pub_delta


def _base_seed_values(base: pd.DataFrame, pair_on: list[str],
                      vcols: list[str]) -> dict[tuple, np.ndarray]:
    """QCFS per-seed values by (seed, *paired settings), as arrays (one groupby for the
    method, not one per group)."""
    base_seed = _per_seed(base, pair_on, vcols)
    return {_as_tuple(i): v for i, v in zip(base_seed.index, base_seed.to_numpy(dtype=float))}


def _nq_seed_values(nq: pd.DataFrame, settings_cols: list[str],
                    vcols: list[str]) -> dict[tuple, list[tuple[str, np.ndarray]]]:
    """NQ per-seed values by group of settings: settings -> [(seed, values), ...]."""
    cols = [c for c in vcols if c in nq.columns]
    per_nq = nq.groupby(settings_cols + ["seed"], dropna=False)[cols].mean() \
        .reindex(columns=vcols)
    by_group: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for i, v in zip(per_nq.index, per_nq.to_numpy(dtype=float)):
        i = _as_tuple(i)
        by_group.setdefault(i[:-1], []).append((str(i[-1]), v))
    return by_group


def _unpaired_notes(label: str, mine: list[tuple[str, np.ndarray]],
                    common: list[tuple[str, np.ndarray]], partners: set[str]) -> list[str]:
    """A note naming the seeds of either method that have no partner (none if every
    seed is paired)."""
    paired = {seed for seed, _ in common}
    if len(common) >= max(len(mine), len(partners)):
        return []
    lone_nq = sorted({seed for seed, _ in mine} - paired, key=setting_sort_key)
    lone_q = sorted(partners - paired, key=setting_sort_key)
    return [f"Δ {label}: {len(common)} seed pairs; unpaired seeds left out of "
            f"the Δ: NQ {', '.join(lone_nq) or 'none'}; QCFS "
            f"{', '.join(lone_q) or 'none'}."]


def _set_delta_cells(pairs: list[tuple[Row, np.ndarray, np.ndarray]],
                     vmap: dict[str, str]) -> None:
    """The statistics of every cell of an arch's Δ rows, in one batch
    (paired_stats_many), Holm-adjusted across each row's columns."""
    if not pairs:
        return
    n = len(vmap)
    xs = [a[:, j] for _, a, _ in pairs for j in range(n)]
    ys = [b[:, j] for _, _, b in pairs for j in range(n)]
    width = max(len(v) for v in xs)
    pad = lambda v: np.concatenate([v, np.full(width - len(v), np.nan)])  # noqa: E731
    stats_ = paired_stats_many(np.vstack([pad(v) for v in xs]),
                               np.vstack([pad(v) for v in ys]))
    for k, (row, _, _) in enumerate(pairs):
        cells = dict(zip(vmap, stats_[k * n:(k + 1) * n]))
        adj = holm([c.p if c is not None else None for c in cells.values()])
        row.cells = {key: (None if c is None else _with(c, p_holm=q))
                     for (key, c), q in zip(cells.items(), adj)}


def _as_tuple(index_value) -> tuple:
    return tuple(index_value) if isinstance(index_value, tuple) else (index_value,)


def _with(p: Paired, **changes) -> Paired:
    from dataclasses import replace
    return replace(p, **changes)


def build_table1(runs: pd.DataFrame, published: pd.DataFrame | None = None,
                 published_methods: Iterable[str] = PUBLISHED_METHODS) -> list[Block]:
    """One Block per dataset; measured rows, Δ rows and published rows per arch."""
    published_methods = list(published_methods)
    blocks = []
    for ds in sorted(runs["dataset"].unique()):
        ds_runs = runs[runs["dataset"] == ds]
        settings_cols = varying_settings(ds_runs)
        vmap = _value_map(t_values(ds_runs), noisy=_has_values(ds_runs, "ann_noisy"))
        vcols = list(vmap.values())
        key = str(ds_runs["dataset_key"].iloc[0])
        rows: list[Row] = []
        notes: list[str] = []
        dup: list[str] = []
        for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
            a_runs = ds_runs[ds_runs["arch"] == arch]
            gcols = ["method"] + settings_cols
            measured = []
            for gkey, grp in _groups(a_runs, gcols):
                per, dup_seeds = _seed_values(grp, vcols)
                cells = {disp: stat_of(per[col]) for disp, col in vmap.items()}
                row = Row(arch=arch, method=str(gkey[0]), kind="measured",
                          settings=dict(zip(settings_cols, gkey[1:])), cells=cells,
                          dup_seeds=dup_seeds)
                if row.dup_seeds:
                    dup.append(f"{arch_label(arch)} {row.method}")
                measured.append(row)
            _mark_best(measured, list(vmap))
            rows += measured
            pub = None
            if published is not None and not published.empty:
                pub = published[(published["dataset"] == key) & (published["arch"] == arch)]
            d_rows, d_notes = _delta_rows(a_runs, arch, settings_cols, vmap, pub)
            rows += d_rows
            notes += d_notes
            if pub is not None:
                for m in sorted(set(pub["method"]) & set(published_methods), key=method_order):
                    prow = pub[pub["method"] == m].iloc[0]
                    cells = {}
                    for disp, col in vmap.items():
                        v = prow.get(col, float("nan"))
                        cells[disp] = None if pd.isna(v) else Stat(float(v), float("nan"), 1)
                    rows.append(Row(arch=arch, method=f"{m} (published)", kind="published",
                                    settings={s: NA for s in settings_cols}, cells=cells))
        if dup:
            notes.append("Several runs of one seed (differing only in settings that do not "
                         f"apply to the method) are averaged per seed in: {', '.join(dup)}; "
                         "n counts seeds.")
        blocks.append(Block(dataset=ds, dataset_key=key, setting_cols=settings_cols,
                            value_cols=list(vmap), rows=rows,
                            protocol=protocol.differences_line(ds_runs), notes=notes))
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


# sub-rows under every Δ row: (key, markdown label, LaTeX label)
_SUB_ROWS = [
    ("ci_t", "↳ 95% CI (t)", r"\quad 95\% CI ($t$)"),
    ("ci_boot", "↳ 95% CI (bootstrap)", r"\quad 95\% CI (bootstrap)"),
    ("p", "↳ p (paired t)", r"\quad $p$ (paired $t$)"),
    ("p_holm", "↳ p (Holm)", r"\quad $p$ (Holm)"),
]
N_TOO_SMALL = "n too small"


def _sub_row_cells(row: Row) -> list[tuple[str, str, str, dict[str, str]]]:
    """The statistics rows shown under a Δ row: (key, md label, tex label, cells)."""
    cells = row.cells
    ns = [c.n for c in cells.values() if c is not None]
    n_p = sum(1 for c in cells.values() if c is not None and c.p is not None)
    out = []
    for key, md_label, tex_label in _SUB_ROWS:
        if key == "ci_t" and not any(n >= MIN_N_TEST for n in ns):
            continue        # n < 3 everywhere: the p row says "n too small"
        if key == "ci_boot" and not any(n >= MIN_N_BOOT for n in ns):
            continue
        if key == "p_holm" and n_p < 2:
            continue
        vals = {}
        for col, c in cells.items():
            if c is None:
                vals[col] = NA
            elif key == "ci_t":
                vals[col] = fmt_ci(c.ci_t) if c.ci_t else (c.note or NA)
            elif key == "ci_boot":
                vals[col] = (fmt_ci(c.ci_boot) if c.ci_boot else
                             f"n < {MIN_N_BOOT}" if c.n < MIN_N_BOOT else c.note or NA)
            elif key == "p":
                vals[col] = fmt_p(c.p, c.note)
            else:
                vals[col] = fmt_p(c.p_holm, c.note)
        out.append((key, md_label, tex_label, vals))
    return out


def _tex_value(text: str) -> str:
    if text == NA:
        return "--"
    return latex_escape(text.replace("-", "−"))


def _display_rows(block: Block, fmt: str) -> list[tuple[Row, dict]]:
    """(source row, record) for every displayed line, Δ statistics rows included."""
    tex = fmt == "tex"
    esc = latex_escape if tex else (lambda x: x)
    out = []
    for r in block.rows:
        rec = {"Arch": esc(arch_label(r.arch)), "Method": esc(r.method)}
        for s in block.setting_cols:
            rec[esc(setting_label(s))] = esc(r.settings.get(s, NA))
        if tex:
            rec["n"] = "" if r.n is None else str(r.n)
        for col in block.value_cols:
            c = r.cells.get(col)
            text = fmt_stat(c, fmt, signed=r.kind == "delta")
            if r.kind == "delta" and isinstance(c, Paired) and c.significant:
                text += r"$^\dagger$" if tex else f" {DAGGER}"
            if col in r.bold:
                text = f"\\textbf{{{text}}}" if tex else f"**{text}**"
            rec[_col_name(col, tex)] = text
        out.append((r, rec))
        if r.kind != "delta":
            continue
        for _key, md_label, tex_label, vals in _sub_row_cells(r):
            sub = {"Arch": "", "Method": tex_label if tex else md_label}
            for s in block.setting_cols:
                sub[esc(setting_label(s))] = ""
            if tex:
                sub["n"] = ""
            for col in block.value_cols:
                sub[_col_name(col, tex)] = _tex_value(vals[col]) if tex else vals[col]
            out.append((r, sub))
    return out


def _col_name(col: str, tex: bool) -> str:
    if not tex:
        return col
    return f"${col}$" if col.startswith("T=") else latex_escape(col)


def table1_frame(block: Block, fmt: str = "md") -> pd.DataFrame:
    """Block -> DataFrame of display strings (``fmt`` = "md" or "tex")."""
    tex = fmt == "tex"
    esc = latex_escape if tex else (lambda x: x)
    cols = (["Arch", "Method"] + [esc(setting_label(s)) for s in block.setting_cols]
            + (["n"] if tex else []) + [_col_name(c, tex) for c in block.value_cols])
    return pd.DataFrame.from_records([rec for _, rec in _display_rows(block, fmt)], columns=cols)


def _md(df: pd.DataFrame) -> str:
    """Markdown pipe table of a frame of strings, as ``df.to_markdown(index=False,
    disable_numparse=True)`` writes it (tabulate's "pipe" format: cells stripped and
    left-aligned, a column at least its header + 2 wide), without tabulate's per-cell
    type detection, which dominated the time of large reports."""
    cells = [list(r) for r in df.itertuples(index=False, name=None)]
    if df.empty or not all(isinstance(v, str) for r in cells for v in r):
        return df.to_markdown(index=False, disable_numparse=True)
    header = [str(c).strip() for c in df.columns]
    cells = [[v.strip() for v in r] for r in cells]
    widths = [max([_width(h) + 2] + [_width(r[j]) for r in cells]) for j, h in enumerate(header)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v + " " * (w - _width(v)) for v, w in zip(vals, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"]
                     + [line(r) for r in cells])


try:   # tabulate measures with wcwidth when it is installed: the same widths here
    from wcwidth import wcswidth as _wcswidth
except ImportError:  # pragma: no cover
    _wcswidth = None


def _width(text: str) -> int:
    if _wcswidth is None or text.isascii():
        return len(text)
    w = _wcswidth(text)
    return w if w >= 0 else len(text)


def table1_caption(noisy: bool = False) -> str:
    """What Table 1 shows (markdown; the LaTeX caption is a shorter version)."""
    conf = f"{CONFIDENCE:.0%}"
    noisy_txt = (f"{protocol.NOISY_ANN_COLUMN}: the NQ ANN's test accuracy with its training "
                 "noise switched on, as the NQ authors measured their ANN (the ANN column is "
                 "noise-off); QCFS has no noise, so this column has no Δ. ") if noisy else ""
    return (
        "SNN test accuracy (%) after conversion, by number of time steps T. Mean ± sample "
        "std over seeds; n = number of seeds (a value without ± is a single seed). Rows are "
        "keyed by method and by every setting that varies among the reported runs. "
        "Bold: highest measured mean per architecture and column — a description, not a "
        "test; whether NQ and QCFS differ is in the Δ rows. " + noisy_txt +
        f"Δ: NQ − QCFS paired by seed (same dataset, architecture and every varying setting "
        "that applies to both methods), mean ± std of the per-seed differences. "
        "Under each Δ row: p (paired t) = two-sided paired t-test (`scipy.stats.ttest_rel`), "
        "not adjusted for the several columns; p (Holm) = Holm-adjusted across the columns of "
        f"that Δ row; {conf} CI (t) = t-based interval of the mean difference; {conf} CI "
        f"(bootstrap) = BCa bootstrap over the seed pairs ({N_BOOT:,} resamples, fixed seed), "
        f"given from n ≥ {MIN_N_BOOT}. {DAGGER} = the {conf} t-based CI excludes 0 "
        "(p < 0.05, unadjusted). "
        f"With n < {MIN_N_TEST} pairs no CI or p-value is given (“{N_TOO_SMALL}”): from 2 "
        "pairs the t interval is the mean ± 9.0 std of the differences (t = 12.71 with 1 "
        "degree of freedom, over √2) and excludes almost nothing. "
        "Published rows are the NQ paper's Table 1 and are never bold.")


def render_table1_md(blocks: list[Block], title: str | None = "Table 1", level: int = 2) -> str:
    """Markdown Table 1; one ``level``-deep heading per dataset block."""
    parts = [f"# {title}\n"] if title else []
    parts.append(table1_caption(any(protocol.NOISY_ANN_COLUMN in b.value_cols
                                    for b in blocks)) + "\n")
    for b in blocks:
        parts.append(f"{'#' * level} {b.dataset}\n")
        if b.protocol:
            parts.append(b.protocol + "\n")
        parts.append(_md(table1_frame(b, "md")) + "\n")
        parts += [f"Note: {n}\n" for n in b.notes]
    return "\n".join(parts)


# ---------------------------------------------------------------------- generated prose
def _where(b: Block, r: Row) -> str:
    extra = ", ".join(f"{setting_label(k)}={v}" for k, v in r.settings.items() if v != NA)
    return f"{b.dataset}, {arch_label(r.arch)}" + (f" ({extra})" if extra else "")


def _p_eq(p: float) -> str:
    text = fmt_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def delta_findings(blocks: list[Block]) -> list[str]:
    """One markdown bullet per Δ row, in words that never go beyond the test.

    A difference is called "significant at 95%" only when its t-based 95% CI
    excludes 0; every other one is "not significant (p = …, n = …)" or "not
    tested (n too small, n = …)".
    """
    conf = f"{CONFIDENCE:.0%}"
    out = []
    for b in blocks:
        for r in b.rows:
            if r.kind != "delta":
                continue
            cells = [(col, c) for col, c in r.cells.items() if c is not None]
            sig = [(col, c) for col, c in cells if c.significant]
            nonsig = [(col, c) for col, c in cells if c.p is not None and not c.significant]
            untested = [(col, c) for col, c in cells if c.p is None]
            parts = []
            if sig:
                holm_ok = [col for col, c in sig if c.significant_holm]
                parts.append(
                    f"significant at {conf} (t-based CI excludes 0): " + "; ".join(
                        f"{col} {c.mean:+.2f} {fmt_ci(c.ci_t)} ({_p_eq(c.p)}, n = {c.n})"
                        for col, c in sig)
                    + (f"; after Holm correction across the row's columns still significant "
                       f"at: {', '.join(holm_ok)}" if holm_ok else
                       "; none of these stays significant after Holm correction across the "
                       "row's columns"))
            if nonsig:
                parts.append("not significant: " + "; ".join(
                    f"{col} {c.mean:+.2f} ({_p_eq(c.p)}, n = {c.n})" for col, c in nonsig))
            if untested:
                by_note: dict[str, list[str]] = {}
                for col, c in untested:
                    by_note.setdefault(c.note or "no test", []).append(
                        f"{col} {c.mean:+.2f} (n = {c.n})")
                for note, items in by_note.items():
                    why = (f"{N_TOO_SMALL}, fewer than {MIN_N_TEST} seed pairs"
                           if note == N_TOO_SMALL else
                           "all per-seed differences are equal, no t statistic"
                           if note == "zero spread" else note)
                    parts.append(f"not tested ({why}), so no difference is claimed: "
                                 + "; ".join(items))
            pub = []
            inside = [col for col, c in cells
                      if c.ci_t is not None and col in r.published_delta
                      and c.ci_t[0] <= r.published_delta[col] <= c.ci_t[1]]
            outside = [col for col, c in cells
                       if c.ci_t is not None and col in r.published_delta and col not in inside]
            if inside:
                pub.append(f"inside the {conf} t-based CI at {', '.join(inside)}")
            if outside:
                pub.append(f"outside it at {', '.join(outside)}")
            text = f"- **{_where(b, r)}**, NQ − QCFS in points: " + ". ".join(
                p[0].upper() + p[1:] for p in parts) + "."
            if pub:
                text += " The paper's NQ − QCFS lies " + "; ".join(pub) + "."
            out.append(text)
    return out


# ------------------------------------------------------------------- per-seed appendix
def per_seed_tables(runs: pd.DataFrame, blocks: list[Block]) -> str:
    """Markdown: one row per finished trial, then the per-seed Δ of every Δ row."""
    parts = []
    for b in blocks:
        ds_runs = runs[runs["dataset"] == b.dataset]
        vmap = _value_map(t_values(ds_runs), noisy=_has_values(ds_runs, "ann_noisy"))
        recs = []
        counts = "class_counts" in ds_runs.columns and ds_runs.loc[
            ds_runs["class_counts"] != NA, "class_counts"].nunique() > 1
        for _, r in ds_runs.iterrows():
            rec = {"Arch": arch_label(r["arch"]), "Method": r["method"]}
            for s in b.setting_cols:
                rec[setting_label(s)] = r[s]
            rec["Seed"] = r["seed"]
            rec["Trial"] = r["trial"]
            for disp, col in vmap.items():
                v = r.get(col, float("nan"))
                rec[disp] = NA if pd.isna(v) else f"{float(v):.2f}"
            be = r.get("best_epoch", float("nan"))
            rec["Best epoch"] = NA if pd.isna(be) else f"{int(be)}"
            if counts:
                rec["Calib. class counts"] = r["class_counts"]
            rec["Run"] = str(r["run_id"])[:8]
            recs.append(rec)
        parts.append(f"### {b.dataset}: every finished trial\n")
        parts.append(_md(pd.DataFrame.from_records(recs)) + "\n")
        d_recs = []
        for row in b.rows:
            if row.kind != "delta" or row.per_seed is None:
                continue
            for seed, vals in row.per_seed.iterrows():
                rec = {"Arch": arch_label(row.arch)}
                for s in b.setting_cols:
                    rec[setting_label(s)] = row.settings.get(s, NA)
                rec["Seed"] = seed
                for col in b.value_cols:
                    v = vals.get(col, float("nan"))
                    rec[col] = NA if pd.isna(v) else f"{float(v):+.2f}"
                d_recs.append(rec)
        if d_recs:
            df = pd.DataFrame.from_records(d_recs)
            empty = [c for c in b.value_cols if c in df.columns and (df[c] == NA).all()]
            parts.append(f"### {b.dataset}: {DELTA_LABEL} per seed\n")
            parts.append(_md(df.drop(columns=empty)) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------- table 2
LOW_T = 4        # "low latency": best accuracy at T <= 4
TOLERANCE = 1.0  # points below the ANN


def _t2_record(arch: str, method: str, settings: dict[str, str], ann: Stat | None,
               by_t: dict[int, Stat | None], fmt: str,
               energy: Mapping[int, Stat | None] | None = None) -> dict:
    """One Table 2 row; ``energy``: T -> SNN energy as % of the ANN's (None: not recorded,
    no energy cell)."""
    low = [(t, s) for t, s in by_t.items() if t <= LOW_T and s is not None]
    best_t, best = max(low, key=lambda ts: ts[1].mean) if low else (None, None)
    extra = {}
    if energy is not None:
        e = energy.get(best_t) if best_t is not None else None
        # n shown even for one seed: energy may come from fewer runs than the accuracy
        extra["energy"] = fmt_stat(e, fmt) + (" (n=1)" if e is not None and e.n == 1
                                              and fmt == "md" else "")
    reach = NA
    if ann is not None:
        for t in sorted(by_t):
            s = by_t[t]
            if s is not None and s.mean >= ann.mean - TOLERANCE:
                reach = f"T={t}"
                break
    return {"arch": arch, "method": method, **settings, "ann": fmt_stat(ann, fmt),
            "best": fmt_stat(best, fmt), "best_T": NA if best_t is None else f"T={best_t}",
            **extra, "reach": reach}


def build_table2(runs: pd.DataFrame, published: pd.DataFrame | None = None,
                 published_methods: Iterable[str] = PUBLISHED_METHODS,
                 fmt: str = "md") -> dict[str, pd.DataFrame]:
    """dataset label -> frame of (arch, method, settings, ann, best, best_T, reach).

    Rows are keyed like Table 1 (method and every varying setting of the
    dataset); a frame's ``attrs`` hold ``dataset_key``, ``n_settings`` and
    ``protocol`` (the protocol-differences line).
    """
    out = {}
    for ds in sorted(runs["dataset"].unique()):
        ds_runs = runs[runs["dataset"] == ds]
        settings_cols = varying_settings(ds_runs)
        ts = t_values(ds_runs)
        with_energy = any(_has_values(ds_runs, f"Eratio{t}") for t in ts)
        vcols = ["ann"] + [f"T{t}" for t in ts] + [f"Eratio{t}" for t in ts]
        key = str(ds_runs["dataset_key"].iloc[0])
        recs = []
        gcols = ["method"] + settings_cols
        for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
            a_runs = ds_runs[ds_runs["arch"] == arch]
            for gkey, grp in _groups(a_runs, gcols):
                per, _ = _seed_values(grp, vcols)
                by_t = {t: stat_of(per[f"T{t}"]) for t in ts}
                energy = ({t: stat_of(100.0 * per[f"Eratio{t}"]) for t in ts}
                          if with_energy else None)
                recs.append(_t2_record(arch, gkey[0], dict(zip(settings_cols, gkey[1:])),
                                       stat_of(per["ann"]), by_t, fmt, energy))
            if published is None or published.empty:
                continue
            pub = published[(published["dataset"] == key) & (published["arch"] == arch)]
            for m in sorted(set(pub["method"]) & set(published_methods), key=method_order):
                prow = pub[pub["method"] == m].iloc[0]
                pts = {t: (None if pd.isna(prow.get(f"T{t}", float("nan")))
                           else Stat(float(prow[f"T{t}"]), float("nan"), 1))
                       for t in (1, 2, 4, 8, 16, 32, 64)}
                recs.append(_t2_record(arch, f"{m} (published)", {s: NA for s in settings_cols},
                                       Stat(float(prow["ann"]), float("nan"), 1), pts, fmt,
                                       {} if with_energy else None))
        df = pd.DataFrame.from_records(recs)
        df["arch"] = df["arch"].map(arch_label)
        out[ds] = df.rename(columns={
            "arch": "Arch", "method": "Method", **{s: setting_label(s) for s in settings_cols},
            "ann": "ANN", "best": f"Best SNN (T ≤ {LOW_T})", "best_T": "at",
            "reach": f"First T with SNN ≥ ANN − {TOLERANCE:g}",
            "energy": ENERGY_COLUMN})
        out[ds].attrs.update(dataset_key=key, n_settings=len(settings_cols),
                             protocol=protocol.differences_line(ds_runs),
                             energy=_energy_note(ds_runs, ts) if with_energy else
                             "Energy: not recorded by these runs (no `energy/*` metrics: "
                             "runs from a harness before energy accounting, or nets whose "
                             "synapses could not be counted), so no energy column.")
    return out


ENERGY_COLUMN = "SNN energy at that T (% of ANN)"
# harness.energy's default 45 nm constants (pJ per accumulate / per MAC), which every run
# uses; kept here so that the report does not import torch (a test checks they agree)
E_AC_PJ, E_MAC_PJ = 0.9, 4.6


def _energy_note(runs: pd.DataFrame, ts: list[int]) -> str:
    """What the energy column is, with the constants and how many runs lack energy."""
    have = runs[[f"Eratio{t}" for t in ts if f"Eratio{t}" in runs.columns]].notna().any(axis=1)
    missing = int((~have).sum())
    return ("Energy: estimated SNN energy per image at the T of the best SNN accuracy, as % "
            f"of the ANN's (45 nm: {E_AC_PJ:g} pJ per synaptic operation, {E_MAC_PJ:g} pJ per MAC; the "
            "analog-input first layer counted as MACs; `energy/ratio_to_ann_TNN`), mean ± std "
            "over seeds. Published rows: the paper reports no energy for these."
            + (f" {missing} of {len(runs)} runs recorded no energy; the energy cells leave "
               "them out (see their n)." if missing else ""))


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
        if df.attrs.get("protocol"):
            parts.append(df.attrs["protocol"] + "\n")
        parts.append(_md(df) + "\n")
        if df.attrs.get("energy"):
            parts.append(df.attrs["energy"] + "\n")
        other = _other_methods(pub2, df.attrs.get("dataset_key", ""))
        if other is not None:
            parts.append(f"Other SNN methods on {ds} (published, NQ paper Table 2):\n")
            parts.append(_md(other) + "\n")
    return "\n".join(parts)

