"""LaTeX tables of `harness report` (harness.report.latex): layout, and a compile check.

The compile tests put every generated table in a minimal ``\\documentclass[10pt]{article}``
with the generated ``preamble.tex`` and run pdflatex; they fail on any LaTeX error and
on any overfull hbox over 1 pt (a table wider than ``\\textwidth``).  They are skipped,
with the reason, where pdflatex or one of the packages (booktabs, multirow, siunitx)
is not installed.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from harness.report import latex, tables

TEX_MISSING = latex.missing_tex()
needs_tex = pytest.mark.skipif(TEX_MISSING is not None,
                               reason=f"cannot compile LaTeX here: {TEX_MISSING}")

PAPER_TS = (1, 2, 4, 8, 16, 32, 64)


def frame(archs=("resnet20",), methods=("QCFS", "NQ"), seeds=2, ts=PAPER_TS, noisy=False,
          dataset=("CIFAR-10", "cifar10"), settings: dict | None = None, rng_seed=0):
    """A tidy run frame (what collect.tidy_runs returns), one run per combination."""
    rng = np.random.default_rng(rng_seed)
    settings = settings or {}
    combos = [{}]
    for col, vals in settings.items():
        combos = [{**c, col: v} for c in combos for v in vals]
    recs = []
    for arch in archs:
        for m in methods:
            for combo in combos:
                for s in range(seeds):
                    base = 90.0 if m == "QCFS" else 89.0
                    rec = {"dataset": dataset[0], "dataset_key": dataset[1], "arch": arch,
                           "method": m, "seed": str(s), "L": "4", "epochs": "400",
                           "select_on": "test", "select_T": "4", "model.grad": "nq",
                           **combo, "ann": base + rng.normal(0, 0.5)}
                    for t in ts:
                        rec[f"T{t}"] = min(base, 40 + 12 * np.log2(t) + rng.normal(0, 1.5))
                    if noisy and m == "NQ":
                        rec["ann_noisy"] = base - 5 + rng.normal(0, 0.5)
                    recs.append(rec)
    return pd.DataFrame(recs)


SHAPES = {
    # the quickstart / cpu_cifar10 reports: one arch, T = 1 … 32, two seeds, image folder
    "cpu_cifar10": dict(ts=(1, 2, 4, 8, 16, 32), dataset=("CIFAR-10 (imagefolder)", "cifar10")),
    # the paper's Table 1: three archs, T = 1 … 64, the noise-on ANN column, five seeds
    "paper": dict(archs=("vgg16", "resnet18", "resnet20"), seeds=5, noisy=True),
    # an ablation: every setting that varies is a key column
    "ablation": dict(archs=("vgg16", "resnet20"), seeds=3, settings={"L": ["4", "8"]},
                     ts=(1, 2, 4, 8)),
    # two long setting columns: Table 1 still fits by layout (panels); the NQ − QCFS
    # table and Table 2, which are not split into panels, fall back to \resizebox
    "settings": dict(seeds=3, settings={"train.lr": ["0.1", "0.01"],
                                        "train.weight_decay": ["0.0005", "0.0001"]}),
    "cifar100": dict(archs=("vgg16", "resnet20"), seeds=4, dataset=("CIFAR-100", "cifar100")),
}


def render(runs: pd.DataFrame) -> dict[str, str]:
    pub = tables.load_published()
    blocks = tables.build_table1(runs, pub)
    out = {"table1.tex": latex.render_table1_tex(blocks),
           "table2.tex": latex.render_table2_tex(tables.build_table2(runs, pub))}
    delta = latex.render_table1_delta_tex(blocks)
    if delta is not None:
        out["table1_delta.tex"] = delta
    return out


def top_tabulars(tex: str) -> list[str]:
    """The outermost tabulars (header cells may hold a nested one-column tabular)."""
    return re.findall(r"^\\begin\{tabular\}\{.*?^\\end\{tabular\}$", tex, flags=re.S | re.M)


def n_spec_columns(spec: str) -> int:
    spec = re.sub(r"\[[^\]]*\]", "", spec.replace("@{}", ""))
    return len(re.findall(r"[lrcS]", spec))


def check_tabular(tab: str) -> int:
    """Every row has as many cells as the column spec (\\multicolumn spans counted);
    booktabs rules present; returns the number of rows (header rows included)."""
    spec = re.match(r"\\begin\{tabular\}\{(.*)\}$", tab.splitlines()[0]).group(1)
    ncols = n_spec_columns(spec)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tab
    n_rows = 0
    for line in tab.splitlines()[1:-1]:
        line = line.strip()
        if not line or re.match(r"^\\(top|mid|bottom|cmid)rule\b", line):
            continue
        assert line.endswith(r"\\"), line
        cells = re.split(r"(?<!\\)&", line)
        span = sum(int(m) - 1 for m in re.findall(r"\\multicolumn\{(\d+)\}", line))
        assert len(cells) + span == ncols, line
        n_rows += 1
    return n_rows


# ------------------------------------------------------------------ layout (no TeX needed)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_layout_fits_by_layout(shape):
    files = render(frame(**SHAPES[shape]))
    for name, tex in files.items():
        if shape == "settings" and name == "table1_delta.tex":
            assert r"\resizebox{\textwidth}{!}{%" in tex and "No layout fits" in tex
        else:
            assert r"\resizebox" not in tex, name      # fits by layout
        assert "±" not in tex and "Δ" not in tex and "−" not in tex and "(n=" not in tex
        assert tex.startswith("% ") and "\\usepackage{booktabs, multirow, siunitx, graphicx}" in tex
        tabs = top_tabulars(tex)
        assert tabs and len(tabs) == tex.count(r"\caption{") == tex.count(r"\label{")
        for tab in tabs:
            check_tabular(tab)
        assert "imagefolder" not in tex
    blocks = tables.build_table1(frame(**SHAPES[shape]), tables.load_published())
    for b in blocks:
        t, _ = latex.table1_layout(b)
        assert t.width() <= latex.TEXTWIDTH_PT


def test_table1_layout_cpu_cifar10():
    files = render(frame(**SHAPES["cpu_cifar10"]))
    tex = files["table1.tex"]
    (tab,) = top_tabulars(tex)
    # T = 1 … 32 and the ANN do not fit side by side: two panels, each with its header
    heads = [ln for ln in tab.splitlines() if ln.startswith("Arch & Method")]
    assert heads == [r"Arch & Method & {ANN} & {$T=1$} & {$T=2$} & {$T=4$} \\",
                     r"Arch & Method & {$T=8$} & {$T=16$} & {$T=32$} &  \\"]
    assert tab.count(r"\midrule[\heavyrulewidth]") == 1
    # the architecture once per block, a rule before the published rows
    assert tab.count(r"\multirow{4}{*}{ResNet-20}") == 2
    lines = tab.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith(" & QCFS (paper)"):
            assert lines[i - 1] == r"\cmidrule(l){2-6}"
    # siunitx columns, n in the caption (every row has n = 2)
    assert re.search(r"S\[table-format=2\.2\(1\.2\)\]", tab)
    assert "$n$" not in tab and "over $n = 2$ seeds" in tex
    cap = re.search(r"\\caption\{(.*?)\}\n", tex, flags=re.S).group(1)
    assert "on CIFAR-10 after" in cap and r"\label{tab:acc-cifar10}" in tex
    assert r"Table~\ref{tab:acc-cifar10-delta}" in cap
    delta = files["table1_delta.tex"]
    assert r"\label{tab:acc-cifar10-delta}" in delta and "n too small" in delta
    assert "CI" not in top_tabulars(delta)[0]           # n = 2: no interval to show


def test_table1_n_column_when_n_differs():
    runs = frame(ts=(1, 2), seeds=3)
    runs = runs.drop(runs[(runs["method"] == "NQ") & (runs["seed"] == "2")].index)
    tex = render(runs)["table1.tex"]
    (tab,) = top_tabulars(tex)
    assert r"Arch & Method & $n$ & {ANN}" in tab
    assert " & QCFS & 3 & " in tab and " & NQ & 2 & " in tab
    assert "number of seeds of the row" in tex


def test_delta_table_statistics():
    runs = frame(archs=("resnet20",), seeds=5, ts=(1, 2, 4))
    blocks = tables.build_table1(runs, None)
    (delta_row,) = [r for r in blocks[0].rows if r.kind == "delta"]
    tex = latex.render_table1_delta_tex(blocks)
    (tab,) = top_tabulars(tex)
    assert check_tabular(tab) == 1 + 4                  # header, ANN and T = 1, 2, 4
    for col, c in delta_row.cells.items():
        label = "ANN" if col == "ANN" else f"$T={col[2:]}$"
        (line,) = [ln for ln in tab.splitlines() if f" & {label} & " in ln]
        assert f"{c.mean:+.2f} \\pm {c.std:.2f}" in line
        lo, hi = c.ci_t
        assert latex.tex_escape(f"[{lo:+.2f}, {hi:+.2f}]".replace("-", "−")) in line
        assert latex.tex_escape(tables.fmt_p(c.p)) in line
        assert (r"{\rlap{$^\dagger$}}" in line) == c.significant
    assert "(bootstrap)" in tab and "(Holm)" in tab


def test_table2_header_and_cells():
    runs = frame(**SHAPES["paper"])
    tex = render(runs)["table2.tex"]
    (tab,) = top_tabulars(tex)
    assert r"\multicolumn{2}{c}{Best SNN, $T \leq 4$}" in tab
    assert r"\cmidrule(lr){4-5}" in tab     # Arch, Method, ANN, [Acc., T], …
    head = [ln for ln in tab.splitlines() if ln.startswith("Arch & Method")][0]
    assert " at " not in head and "& {Acc.} & $T$ &" in head
    assert "(n=" not in tex and r"\pm" in tab and "over $n = 5$ seeds" in tex
    assert tab.count(r"\multirow") == 3


def test_preamble_lists_every_package():
    pre = latex.preamble_tex()
    for pkg in latex.PACKAGES:
        assert f"\\usepackage{{{pkg}}}" in pre


def test_width_estimate_is_calibrated():
    # measured with pdflatex at \footnotesize (see latex._s_width)
    cells = [latex.Num("93.00", "0.71"), latex.Num("93.00", "0.71")]
    assert latex._s_width(cells) == pytest.approx(44.86, abs=0.6)
    cells = [latex.Num("93.00", "0.71", bold=True), latex.Num("-1.00", "0.71")]
    assert latex._s_width(cells) == pytest.approx(59.34, abs=0.8)
    assert latex.text_width("QCFS (published)") == pytest.approx(67.93, abs=0.5)


def test_too_wide_falls_back_to_resizebox():
    many = {f"x.setting_{i}": ["a_long_value_1", "a_long_value_2"] for i in range(4)}
    tex = render(frame(seeds=1, ts=(1,), settings=many))["table1.tex"]
    assert r"\resizebox{\textwidth}{!}{%" in tex and "No layout fits" in tex


# ------------------------------------------------------------------ compile (needs TeX)
@needs_tex
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tables_compile_in_article_10pt(shape):
    for name, tex in render(frame(**SHAPES[shape])).items():
        res = latex.compile_table(tex)
        assert res.ok, (shape, name, res.errors, res.overfull)


@needs_tex
def test_compile_check_catches_overfull():
    wide = "\\begin{tabular}{l}" + "x" * 400 + "\\end{tabular}\n"
    res = latex.compile_table(wide)
    assert not res.ok and res.overfull and not res.errors
    res = latex.compile_table("\\undefinedmacro\n")
    assert not res.ok and res.errors


def test_table2_tex_from_either_frame_format():
    runs = frame(**SHAPES["cpu_cifar10"])
    pub = tables.load_published()
    md = latex.render_table2_tex(tables.build_table2(runs, pub, fmt="md"))
    tex = latex.render_table2_tex(tables.build_table2(runs, pub, fmt="tex"))
    # fmt="tex" cells carry no n: the caption says "over seeds", the rest is equal
    strip = lambda t: re.sub(r"\\caption\{.*?\}\n", "", t, flags=re.S)  # noqa: E731
    assert strip(md) == strip(tex)
    assert "over $n = 2$ seeds" in md and "over seeds" in tex and "$n = 1$" not in tex
