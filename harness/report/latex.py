"""LaTeX for a paper: Table 1, its statistics table and Table 2.

Every table is written to fit ``\\textwidth`` of ``\\documentclass[10pt]{article}``
(345 pt) by layout, not by ``\\resizebox``:

- ``\\footnotesize`` and ``\\tabcolsep`` = 4 pt, set inside each ``table``;
- mean ± std in siunitx ``S`` columns, aligned at the decimal point (the ± signs
  line up because every mean has two decimals);
- the architecture once per block (``\\multirow``), a ``\\cmidrule`` before the
  published rows of a block and a ``\\midrule`` between blocks;
- n (seeds) in the caption when every row has the same n, else in an ``n`` column;
- when the value columns are still too wide, they are split into panels stacked
  in the same tabular, each with its own header row (e.g. ANN, T = 1 … 4 above
  and T = 8 … 64 below).  The width is estimated from Computer Modern glyph widths
  (:func:`text_width`); the compile test (``tests/test_report_latex.py``) checks
  the estimate with pdflatex;
- the Δ statistics (t and bootstrap CIs, p-values) are a second table
  (:func:`render_table1_stats_tex`, ``table1_delta.tex``), one row per Δ cell.

Only if a single value column per panel is still too wide (many long setting
columns) does the table fall back to ``\\resizebox`` (graphicx), with a comment
saying so.

The packages are listed in :data:`PACKAGES`; :func:`preamble_tex` writes them as
``preamble.tex`` and every table file names them in its first lines.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from . import protocol
from .collect import NA, arch_label, dataset_display, setting_label
from .stats import CONFIDENCE, MIN_N_BOOT, MIN_N_TEST, N_BOOT, Paired, Stat, fmt_p

from .tables import E_AC_PJ, E_MAC_PJ, ENERGY_COLUMN, LOW_T, TOLERANCE, Block, latex_escape

__all__ = ["PACKAGES", "TEXTWIDTH_PT", "preamble_tex", "render_table1_tex",
           "render_table1_delta_tex", "table1_layout", "delta_layout", "render_table2_tex", "text_width", "si_cell",
           "tex_escape", "LatexTable"]

# package -> (what for, Debian/Ubuntu package that has it)
PACKAGES: dict[str, tuple[str, str]] = {
    "booktabs": (r"\toprule, \midrule, \cmidrule, \bottomrule", "texlive-latex-recommended"),
    "multirow": (r"\multirow: the architecture column", "texlive-latex-extra"),
    "siunitx": ("S columns: mean ± std aligned at the decimal point (version 3)",
                "texlive-science"),
    "graphicx": (r"\resizebox: only for a table that no layout fits (it says so)",
                 "texlive-latex-base"),
}
TEXTWIDTH_PT = 345.0      # \textwidth of article at 10 pt (letter and A4)
MARGIN_PT = 2.0           # kept free for estimation error (measured: < 1 pt)
TABCOLSEP_PT = 4.0
FONT = r"\footnotesize"
FONT_SCALE = 0.85         # cmr8 glyphs relative to cmr10 (digit: 4.25 pt vs 5 pt)
BOLD_SCALE = 1.153        # cmbx8 relative to cmr8 (measured)
SISETUP = (r"\sisetup{uncertainty-mode=separate, table-align-uncertainty=false, "
           r"retain-explicit-plus, retain-zero-uncertainty, "
           r"reset-text-series=false, text-series-to-math=true, "
           r"table-align-text-after=false}")
DAGGER_TEX = r"{\rlap{$^\dagger$}}"   # zero width: the column keeps its alignment
MISSING = "{--}"



def tex_escape(text: str) -> str:
    return latex_escape(text)


def tex_text(text: str) -> str:
    """Markdown-ish prose (protocol line, notes) -> LaTeX: `code` becomes \\texttt."""
    parts = str(text).split("`")
    return "".join(tex_escape(p) if i % 2 == 0 else r"\texttt{" + tex_escape(p) + "}"
                   for i, p in enumerate(parts))


# ------------------------------------------------------------------ width estimate
# Computer Modern Roman 10 pt advance widths (pt); scaled by FONT_SCALE.
_CM10 = {
    **dict.fromkeys("0123456789", 5.0), ".": 2.78, ",": 2.78, ":": 2.78, ";": 2.78,
    "(": 3.89, ")": 3.89, "[": 2.78, "]": 2.78, "-": 3.33, " ": 3.33, "%": 8.33, "/": 5.0,
    "=": 7.78, "+": 7.78, "*": 5.0, "'": 2.78, "_": 5.0,
    "a": 5.0, "b": 5.56, "c": 4.44, "d": 5.56, "e": 4.44, "f": 3.06, "g": 5.0, "h": 5.56,
    "i": 2.78, "j": 3.06, "k": 5.28, "l": 2.78, "m": 8.33, "n": 5.56, "o": 5.0, "p": 5.56,
    "q": 5.28, "r": 3.92, "s": 3.94, "t": 3.89, "u": 5.56, "v": 5.28, "w": 7.22, "x": 5.28,
    "y": 5.28, "z": 4.44, "A": 7.5, "B": 7.08, "C": 7.22, "D": 7.64, "E": 6.81, "F": 6.53,
    "G": 7.85, "H": 7.5, "I": 3.61, "J": 5.14, "K": 7.78, "L": 6.25, "M": 9.17, "N": 7.5,
    "O": 7.78, "P": 6.81, "Q": 7.78, "R": 7.36, "S": 5.56, "T": 7.22, "U": 7.5, "V": 7.5,
    "W": 10.28, "X": 7.5, "Y": 7.5, "Z": 6.11,
    # math symbols with the spacing they get in the tables
    "±": 12.2, "−": 7.78, "Δ": 8.33, "δ": 4.44, "τ": 4.38, "λ": 5.83, "≤": 13.3, "≥": 13.3,
    "—": 5.0, "–": 5.0, "†": 3.2, "μ": 6.0, "σ": 5.7, "×": 12.2,
}


def text_width(text: str, bold: bool = False) -> float:
    """Estimated width (pt) of display text at the tables' font size (\\footnotesize)."""
    w = sum(_CM10.get(ch, 5.56) for ch in str(text)) * FONT_SCALE
    return w * BOLD_SCALE if bold else w


# ------------------------------------------------------------------ S columns
_NUM_RE = re.compile(r"^\s*([+\-−]?\d+(?:\.\d+)?)(?:\s*±\s*(\d+(?:\.\d+)?))?(?:\s*\(n=(\d+)\))?"
                     r"\s*(\*\*)?\s*(†)?\s*$")


@dataclass
class Num:
    """One S-column cell: mean (text), std (text or ""), bold, dagger; or missing."""
    mean: str = ""
    std: str = ""
    bold: bool = False
    dagger: bool = False
    n: int | None = None

    @property
    def missing(self) -> bool:
        return not self.mean

    def tex(self) -> str:
        if self.missing:
            return MISSING
        body = self.mean.replace("−", "-") + (f" \\pm {self.std}" if self.std else "")
        if self.bold:
            body = r"\bfseries " + body
        return body + (DAGGER_TEX if self.dagger else "")

    def width(self) -> float:
        if self.missing:
            return text_width("--")
        return text_width(self.mean + (f"±{self.std}" if self.std else ""), self.bold)


def si_cell(s: Stat | Paired | None, signed: bool = False, bold: bool = False,
            dagger: bool = False) -> Num:
    """A statistic as an S-column cell (mean with 2 decimals, ± std when n > 1)."""
    if s is None or pd.isna(s.mean):
        return Num()
    mean = f"{s.mean:+.2f}" if signed else f"{s.mean:.2f}"
    std = "" if s.n <= 1 or pd.isna(s.std) else f"{s.std:.2f}"
    return Num(mean, std, bold, dagger, s.n)


def parse_num(text: str) -> Num:
    """Cell text of a Table 2 frame (markdown: ``90.50 ± 0.71 (n=2)``, ``**84.50**``,
    ``—``; or ``fmt="tex"``: ``90.50 $\\pm$ 0.71``) -> Num."""
    t = str(text).strip().replace(r"$\pm$", "±").replace("$-$", "−")   # fmt="tex" cells too
    if t.startswith(r"\textbf{") and t.endswith("}"):
        t = "**" + t[len(r"\textbf{"):-1] + "**"
    bold = t.startswith("**") and t.endswith("**")
    t = t.strip("*").strip()
    m = _NUM_RE.match(t)
    if not m or t in ("", NA):
        return Num()
    return Num(m.group(1).replace("−", "-"), m.group(2) or "", bold, bool(m.group(5)),
               int(m.group(3)) if m.group(3) else None)


def _table_format(cells: list[Num]) -> str:
    """siunitx table-format covering every cell of a column (e.g. ``+2.2(1.2)``)."""
    nums = [c for c in cells if not c.missing]
    if not nums:
        return "2.2"
    sign = "+" if any(c.mean[0] in "+-" for c in nums) else ""
    ints = max(len(c.mean.lstrip("+-").split(".")[0]) for c in nums)
    dec = max(len(c.mean.split(".")[1]) if "." in c.mean else 0 for c in nums)
    stds = [c.std for c in nums if c.std]
    unc = ""
    if stds:
        ui = max(len(s.split(".")[0]) for s in stds)
        ud = max(len(s.split(".")[1]) if "." in s else 0 for s in stds)
        unc = f"({ui}.{ud})"
    return f"{sign}{ints}.{dec}{unc}"


def _s_width(cells: list[Num]) -> float:
    """Width (pt) of an S column as siunitx sets it (measured with pdflatex at
    \\footnotesize: digit 4.25 pt, decimal point 2.36 pt, sign 6.61 pt, the ± and its
    spacing 10.39 pt; a bold cell widens the column by 15%)."""
    nums = [c for c in cells if not c.missing]
    if not nums:
        return text_width("--")
    digit, point, sign_w, pm = 4.25, 2.36, 6.61, 10.39
    sign = sign_w if any(c.mean[0] in "+-" for c in nums) else 0.0
    ints = max(len(c.mean.lstrip("+-").split(".")[0]) for c in nums)
    dec = max(len(c.mean.split(".")[1]) if "." in c.mean else 0 for c in nums)
    w = sign + (ints + dec) * digit + (point if dec else 0.0)
    stds = [c.std for c in nums if c.std]
    if stds:
        ui = max(len(x.split(".")[0]) for x in stds)
        ud = max(len(x.split(".")[1]) if "." in x else 0 for x in stds)
        w += pm + (ui + ud) * digit + (point if ud else 0.0)
    return w * (BOLD_SCALE if any(c.bold for c in nums) else 1.0) + 0.5


# ------------------------------------------------------------------ generic table
@dataclass
class Column:
    header: str                     # LaTeX (already escaped)
    kind: str = "l"                 # "l", "c", "r" or "S"
    header_width: float = 0.0       # estimated width of the header
    cells: list = field(default_factory=list)   # per body row: str (LaTeX) or Num
    widths: list[float] = field(default_factory=list)  # estimated width per text cell

    def width(self) -> float:
        if self.kind == "S":
            body = _s_width([c for c in self.cells if isinstance(c, Num)])
        else:
            body = max(self.widths, default=0.0)
        return max(body, self.header_width)

    def spec(self) -> str:
        if self.kind != "S":
            return self.kind
        return f"S[table-format={_table_format([c for c in self.cells if isinstance(c, Num)])}]"


@dataclass
class LatexTable:
    """A tabular: key columns (repeated in every panel) and value columns, body rows
    in groups (one per architecture block: a ``\\midrule`` between groups, the first
    ``group_keys`` key columns printed once per group, the first with ``\\multirow``)."""
    keys: list[Column]
    values: list[Column]
    groups: list[list[int]]
    group_keys: int = 1
    rule_before: dict[int, int] = field(default_factory=dict)  # group -> row: \cmidrule above
    header_rows: list[str] = field(default_factory=list)   # lines above the header row
    splittable: bool = True         # False: one panel (header_rows span value columns)
    tabcolsep: float = TABCOLSEP_PT

    def key_width(self) -> float:
        sep = 2 * self.tabcolsep
        return sum(c.width() for c in self.keys) + sep * max(0, len(self.keys) - 1)

    def panels(self) -> tuple[list[list[int]], bool]:
        """Value-column indices of each panel (the fewest panels that fit
        \\textwidth, balanced), and whether even one value column per panel is too wide."""
        sep = 2 * self.tabcolsep
        fixed = self.key_width()
        widths = [c.width() for c in self.values]
        limit = TEXTWIDTH_PT - MARGIN_PT
        nv = len(widths)
        if nv == 0:
            return [[]], fixed > limit
        if not self.splittable:
            return [list(range(nv))], fixed + sum(w + sep for w in widths) > limit
        for n_panels in range(1, nv + 1):
            per = math.ceil(nv / n_panels)
            chunks = [list(range(i, min(i + per, nv))) for i in range(0, nv, per)]
            # the S column at each position must hold the widest cell of any panel
            pos_w = [max(widths[ch[j]] for ch in chunks if j < len(ch)) for j in range(per)]
            if fixed + sum(w + sep for w in pos_w) <= limit:
                return chunks, False
        return [[i] for i in range(nv)], True

    def width(self) -> float:
        """Estimated width (pt) of the tabular as laid out by :meth:`panels`."""
        chunks, _ = self.panels()
        per = max(len(c) for c in chunks)
        pos_w = [max(self.values[ch[j]].width() for ch in chunks if j < len(ch))
                 for j in range(per)]
        return self.key_width() + sum(w + 2 * self.tabcolsep for w in pos_w)

    def _spec(self, chunks: list[list[int]]) -> list[str]:
        per = max(len(c) for c in chunks)
        specs = [c.spec() for c in self.keys]
        for j in range(per):
            at = [self.values[ch[j]] for ch in chunks if j < len(ch)]
            if all(c.kind == "S" for c in at):
                specs.append(Column("", "S", cells=[n for c in at for n in c.cells]).spec())
            else:
                specs.append(at[0].kind)
        return specs

    def fit(self) -> None:
        """A table that cannot be split into panels gets narrower column gaps
        (\\tabcolsep 3 pt, then 2 pt) before it would need \\resizebox."""
        for sep in (TABCOLSEP_PT, 3.0, 2.0):
            self.tabcolsep = sep
            if not self.panels()[1]:
                return
        self.tabcolsep = TABCOLSEP_PT

    def render(self, caption: str, label: str, comment: str) -> str:
        self.fit()
        chunks, too_wide = self.panels()
        per = max(len(c) for c in chunks)
        ncols = len(self.keys) + per
        lines = [comment, r"\begin{table}", r"\centering", FONT,
                 rf"\setlength{{\tabcolsep}}{{{self.tabcolsep:g}pt}}", SISETUP,
                 rf"\caption{{{caption}}}", rf"\label{{{label}}}"]
        if too_wide:
            lines.append("% No layout fits \\textwidth (too many or too long key columns): "
                         "scaled with \\resizebox (needs graphicx).")
            lines.append(r"\resizebox{\textwidth}{!}{%")
        lines.append(r"\begin{tabular}{@{}" + " ".join(self._spec(chunks)) + "@{}}")
        lines.append(r"\toprule")
        for p, ch in enumerate(chunks):
            if p > 0:
                lines.append(r"\midrule[\heavyrulewidth]")
            lines += self.header_rows
            head = [c.header for c in self.keys] + [
                ("{" + self.values[i].header + "}" if self.values[i].kind == "S"
                 else self.values[i].header) for i in ch] + [""] * (per - len(ch))
            lines.append(" & ".join(head) + r" \\")
            lines.append(r"\midrule")
            for g, rows in enumerate(self.groups):
                if g > 0:
                    lines.append(r"\midrule")
                for k, r in enumerate(rows):
                    if self.rule_before.get(g) == r and k > 0:
                        lines.append(rf"\cmidrule(l){{{self.group_keys + 1}-{ncols}}}")
                    cells = []
                    for ci, col in enumerate(self.keys):
                        text = col.cells[r]
                        if ci < self.group_keys:
                            if k > 0:
                                text = ""
                            elif ci == 0 and len(rows) > 1:
                                text = rf"\multirow{{{len(rows)}}}{{*}}{{{text}}}"
                        cells.append(text)
                    for i in ch:
                        c = self.values[i].cells[r]
                        cells.append(c.tex() if isinstance(c, Num) else c)
                    cells += [""] * (per - len(ch))
                    lines.append(" & ".join(cells) + r" \\")
        lines.append(r"\bottomrule")
        lines.append(r"\end{tabular}")
        if too_wide:
            lines.append("}")
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"


def _stack(*parts: str) -> str:
    """A header on several lines (a nested tabular: no extra package)."""
    return r"\begin{tabular}[b]{@{}c@{}}" + r"\\".join(parts) + r"\end{tabular}"


def _value_header(col: str) -> tuple[str, float]:
    """Display column ("ANN", "T=1", "ANN (noise on)") -> (LaTeX header, width)."""
    if col.startswith("T="):
        return f"$T={col[2:]}$", text_width(col)
    if " (" in col:
        a, b = col.split(" (", 1)
        return _stack(tex_escape(a), tex_escape("(" + b)), max(text_width(a),
                                                               text_width("(" + b))
    return tex_escape(col), text_width(col)


def _setting_header(name: str) -> tuple[str, str, float]:
    """(LaTeX header, column kind, width) of a setting column: a long dotted parameter
    name goes on two lines ("train." over "weight_decay")."""
    if "." in name and len(name) > 8:
        head, tail = name.rsplit(".", 1)
        return (_stack(tex_escape(head + "."), tex_escape(tail)), "l",
                max(text_width(head + "."), text_width(tail)))
    return tex_escape(name), "l", text_width(name)


def _n_text(ns: list[int | None]) -> str:
    vals = sorted({n for n in ns if n is not None})
    if not vals:
        return ""
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}--{vals[-1]}"


def packages_comment(name: str) -> str:
    pk = ", ".join(PACKAGES)
    return (f"% {name} -- generated by `harness report`.\n"
            f"% Needs \\usepackage{{{pk}}} (siunitx version 3) in the preamble, or "
            "\\input{preamble.tex}\n"
            "% (written next to this file). Fits \\textwidth of \\documentclass[10pt]{article}.")


def preamble_tex() -> str:
    lines = ["% Packages for the tables of `harness report` (table1.tex, table1_delta.tex, "
             "table2.tex).",
             "% In the preamble of the paper: \\input{preamble.tex}; in the text: "
             "\\input{table1.tex}.",
             "% Debian/Ubuntu packages: " + ", ".join(sorted({v[1] for v in PACKAGES.values()}))
             + "."]
    width = max(len(p) for p in PACKAGES)
    for p, (why, _deb) in PACKAGES.items():
        lines.append(f"\\usepackage{{{p}}}{' ' * (width - len(p))}  % {why}")
    return "\n".join(lines) + "\n"


PUBLISHED_SUFFIX, PAPER_SUFFIX = " (published)", " (paper)"


def _method_text(method: str) -> str:
    """Method label for LaTeX: "QCFS (published)" -> "QCFS (paper)" (narrower)."""
    m = str(method)
    return m[:-len(PUBLISHED_SUFFIX)] + PAPER_SUFFIX if m.endswith(PUBLISHED_SUFFIX) else m


def _caption_names(names: list[tuple[str, str]]) -> dict[str, str]:
    """dataset label -> the name for captions: "CIFAR-10", not "CIFAR-10 (imagefolder)",
    unless two datasets of the report would then share a name."""
    clean = {label: dataset_display(key, label) for label, key in names}
    dup = {v for v in clean.values() if list(clean.values()).count(v) > 1}
    return {label: (label if clean[label] in dup else clean[label]) for label in clean}


def _labels(keys: list[str], prefix: str) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
        out.append(f"{prefix}-{k}" + (f"-{seen[k]}" if seen[k] > 1 else ""))
    return out


# ------------------------------------------------------------------ Table 1
def _key_columns(recs: list[dict], setting_headers: list[str], with_n: bool,
                 method_header: str = "Method") -> list[Column]:
    """Arch, Method, one column per setting and (``with_n``) n, from row records
    ``{"arch", "method", "method_tex", "settings": [values], "n"}``."""
    arch = Column("Arch", "l", text_width("Arch"))
    method = Column(method_header, "l", text_width(method_header))
    settings = [Column(*_setting_header(h)) for h in setting_headers]
    n = Column("$n$", "c", text_width("n"))
    for rec in recs:
        arch.cells.append(tex_escape(rec["arch"]))
        arch.widths.append(text_width(rec["arch"]))
        method.cells.append(rec["method_tex"])
        method.widths.append(text_width(rec["method"]))
        for col, v in zip(settings, rec["settings"]):
            col.cells.append(tex_escape(v))
            col.widths.append(text_width(v))
        n.cells.append(rec.get("n", ""))
        n.widths.append(text_width(rec.get("n", "")))
    return [arch, method] + settings + ([n] if with_n else [])


def _uniform_n(ns: list[list[int | None]]) -> int | None:
    """The n of every cell of every row, if it is one number."""
    vals = {n for row in ns for n in row if n is not None}
    return vals.pop() if len(vals) == 1 else None


def _arch_groups(archs: list[str], published: list[bool]) -> tuple[list[list[int]],
                                                                     dict[int, int]]:
    """Consecutive rows of one architecture, and each group's first published row."""
    groups: list[list[int]] = []
    for i, a in enumerate(archs):
        if i == 0 or a != archs[i - 1]:
            groups.append([])
        groups[-1].append(i)
    pub_from = {}
    for g, rows in enumerate(groups):
        first = next((r for r in rows if published[r]), None)
        if first is not None:
            pub_from[g] = first
    return groups, pub_from


def _seeds_phrase(n: int | None, what: str = "seed") -> str:
    if n is None:
        return f"{what}s ($n$: number of {what}s of the row)"
    return f"$n = {n}$ {what}{'s' if n != 1 else ''}"


def table1_layout(block: "Block") -> tuple[LatexTable, int | None]:
    """Table 1 of one dataset block: measured and published rows (the Δ rows are in
    :func:`delta_layout`); and the n of every measured cell if it is one number."""
    rows = [r for r in block.rows if r.kind != "delta"]
    n_all = _uniform_n([[c.n for c in r.cells.values() if c is not None] for r in rows
                        if r.kind == "measured"])
    recs = []
    for r in rows:
        pub = r.kind == "published"
        recs.append({"arch": arch_label(r.arch), "method": _method_text(r.method),
                     "method_tex": tex_escape(_method_text(r.method)),
                     "settings": [("" if pub else r.settings.get(s, NA))
                                  for s in block.setting_cols],
                     "n": "" if pub else _n_text([c.n for c in r.cells.values()
                                                  if c is not None])})
    keys = _key_columns(recs, [setting_label(s) for s in block.setting_cols],
                        with_n=n_all is None)
    values = []
    for col in block.value_cols:
        header, hw = _value_header(col)
        values.append(Column(header, "S", hw, [si_cell(r.cells.get(col), bold=col in r.bold)
                                               for r in rows]))
    groups, pub_from = _arch_groups([r.arch for r in rows], [r.kind == "published"
                                                             for r in rows])
    return LatexTable(keys, values, groups, rule_before=pub_from), n_all


def delta_layout(block: "Block") -> tuple[LatexTable, int | None, dict[str, bool]] | None:
    """The NQ − QCFS table of one block: a row per (Δ row, column), with the mean ± std
    of the per-seed differences, the t and bootstrap CIs and the p-values; None if the
    block has no Δ row.  Returns (table, uniform n, which optional columns are shown)."""
    deltas = [r for r in block.rows if r.kind == "delta"]
    cells = [(r, col, c) for r in deltas for col, c in r.cells.items() if c is not None]
    if not cells:
        return None
    shown = {"ci_t": any(c.ci_t is not None for _, _, c in cells),
             "ci_boot": any(c.ci_boot is not None for _, _, c in cells),
             "p_holm": any(c.p_holm is not None for _, _, c in cells)}
    n_all = _uniform_n([[c.n for _, _, c in cells]])
    recs = [{"arch": arch_label(r.arch), "method": col,
             "method_tex": f"$T={col[2:]}$" if col.startswith("T=") else tex_escape(col),
             "settings": [r.settings.get(s, NA) for s in block.setting_cols],
             "n": str(c.n)} for r, col, c in cells]
    keys = _key_columns(recs, [setting_label(s) for s in block.setting_cols],
                        with_n=n_all is None, method_header="Column")
    # Arch, then the settings, are printed once per Δ row: move them to the front
    keys = [keys[0]] + keys[2:2 + len(block.setting_cols)] + [keys[1]] + \
        keys[2 + len(block.setting_cols):]
    values = [Column(r"$\Delta$", "S", text_width("Δ"),
                     [si_cell(c, signed=True, dagger=c.significant) for _, _, c in cells])]

    def text_col(header: str, plain: str, texts: list[str]) -> Column:
        return Column(header, "r", text_width(plain), [tex_escape(t) for t in texts],
                      [text_width(t) for t in texts])

    conf = f"{CONFIDENCE:.0%}"
    ci_head = f"{conf} CI".replace("%", r"\%")
    if shown["ci_t"]:
        values.append(text_col(_stack(ci_head, "($t$)"), f"{conf} CI",
                               [_ci(c.ci_t) for _, _, c in cells]))
    if shown["ci_boot"]:
        values.append(text_col(_stack(ci_head, "(bootstrap)"), f"{conf} CI",
                               [_ci(c.ci_boot) for _, _, c in cells]))
    values.append(text_col(_stack("$p$", "($t$)"), "p", [fmt_p(c.p, c.note) for _, _, c in cells]))
    if shown["p_holm"]:
        values.append(text_col(_stack("$p$", "(Holm)"), "(Holm)",
                               [fmt_p(c.p_holm) for _, _, c in cells]))
    row_keys = [(r.arch, tuple(r.settings.items())) for r, _, _ in cells]
    groups: list[list[int]] = []
    for i, k in enumerate(row_keys):
        if i == 0 or k != row_keys[i - 1]:
            groups.append([])
        groups[-1].append(i)
    table = LatexTable(keys, values, groups, group_keys=1 + len(block.setting_cols),
                       splittable=False)
    return table, n_all, shown


def render_table1_tex(blocks: list["Block"]) -> str:
    """Table 1 per dataset: mean ± std of the measured rows, then the published ones."""
    names = _caption_names([(b.dataset, b.dataset_key) for b in blocks])
    labels = _labels([b.dataset_key for b in blocks], "tab:acc")
    parts = [packages_comment("Table 1") + "\n"]
    for b, label in zip(blocks, labels):
        table, n_all = table1_layout(b)
        cap = [f"SNN test accuracy (\\%) on {tex_escape(names[b.dataset])} after ANN-to-SNN "
               "conversion, by number of time steps $T$; ANN: the network before conversion. "
               f"Mean $\\pm$ sample std over {_seeds_phrase(n_all)}"
               + (" (a value without $\\pm$ is a single seed)" if n_all in (None, 1) else "")
               + "."]
        if protocol.NOISY_ANN_COLUMN in b.value_cols:
            cap.append("ANN (noise on): the NQ ANN with its training noise switched on, as the "
                       "NQ authors measured it (QCFS has no noise).")
        if any(r.kind == "delta" for r in b.rows):
            cap.append("NQ $-$ QCFS paired by seed, with CIs and $p$-values: "
                       f"Table~\\ref{{{label}-delta}}.")
        cap.append("Bold: highest measured mean per architecture and column (a description, "
                   "not a test).")
        if any(r.kind == "published" for r in b.rows):
            cap.append("(paper): the values published in the NQ paper (its Table 1), below "
                       "the rule in each block; never bold.")
        cap += [tex_text(n) for n in b.notes if not n.startswith(("Δ", "No Δ"))]
        if b.protocol:
            cap.append(tex_text(b.protocol))
        parts.append(table.render(" ".join(cap), label, f"% Table 1: {names[b.dataset]}"))
    return "\n".join(parts)


def render_table1_delta_tex(blocks: list["Block"]) -> str | None:
    """NQ − QCFS per dataset (the Δ rows of Table 1 with their statistics); None if no
    dataset has a Δ row."""
    conf = f"{CONFIDENCE:.0%}".replace("%", r"\%")
    names = _caption_names([(b.dataset, b.dataset_key) for b in blocks])
    labels = _labels([b.dataset_key for b in blocks], "tab:acc")
    parts = [packages_comment("Table 1, NQ - QCFS") + "\n"]
    any_table = False
    for b, label in zip(blocks, labels):
        lay = delta_layout(b)
        if lay is None:
            continue
        any_table = True
        table, n_all, shown = lay
        cap = [f"NQ $-$ QCFS on {tex_escape(names[b.dataset])}, in accuracy points: the "
               f"measured rows of Table~\\ref{{{label}}} paired by seed (same architecture "
               "and every varying setting that applies to both methods). $\\Delta$: mean "
               f"$\\pm$ std of the per-seed differences over {_seeds_phrase(n_all, 'pair')}."]
        if shown["ci_t"]:
            cap.append(f"{conf} CI ($t$): the $t$-based interval of the mean difference; "
                       "$^\\dagger$: it excludes 0.")
        if shown["ci_boot"]:
            cap.append(f"{conf} CI (bootstrap): BCa bootstrap over the seed pairs ({N_BOOT:,} "
                       f"resamples, fixed seed), from $n \\geq {MIN_N_BOOT}$ pairs.")
        cap.append("$p$ ($t$): two-sided paired $t$-test, not adjusted"
                   + ("; $p$ (Holm): Holm-adjusted across the columns of one $\\Delta$ row"
                      if shown["p_holm"] else "") + ".")
        cap.append(f"--: not computed; the $p$ column says why (``n too small'': fewer than "
                   f"{MIN_N_TEST} pairs; ``zero spread'': every per-seed difference is the "
                   "same, no $t$ statistic).")
        cap += [tex_text(n) for n in b.notes if n.startswith(("Δ", "No Δ"))]
        if b.protocol:
            cap.append(tex_text(b.protocol))
        parts.append(table.render(" ".join(cap), f"{label}-delta",
                                  f"% Table 1, NQ - QCFS: {names[b.dataset]}"))
    return "\n".join(parts) if any_table else None


def _ci(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return NA
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]".replace("-", "−")


# ------------------------------------------------------------------ Table 2
def render_table2_tex(tables: dict[str, pd.DataFrame]) -> str:
    """Table 2 frames (:func:`tables.build_table2`, markdown cell texts) -> LaTeX."""
    names = _caption_names([(ds, df.attrs.get("dataset_key", ds)) for ds, df in tables.items()])
    labels = _labels([str(df.attrs.get("dataset_key", "ds")) for df in tables.values()],
                     "tab:lowT")
    parts = [packages_comment("Table 2") + "\n"]
    for (ds, df), label in zip(tables.items(), labels):
        n_set = int(df.attrs.get("n_settings", 0))
        cols = list(df.columns)
        set_cols = cols[2:2 + n_set]
        energy_c = ENERGY_COLUMN if ENERGY_COLUMN in cols else None
        ann_c, best_c, at_c, reach_c = [c for c in cols[2 + n_set:] if c != energy_c]
        pub = [str(m).endswith("(published)") for m in df["Method"]]
        anns = [parse_num(v) for v in df[ann_c]]
        bests = [parse_num(v) for v in df[best_c]]
        energies = [parse_num(v) for v in df[energy_c]] if energy_c else []
        for i, pair in enumerate(zip(anns, bests)):
            for x in pair:   # a measured value without ± (and without "(n=…)"): one seed
                if not pub[i] and x.n is None and not x.missing and not x.std:
                    x.n = 1
        known = [[x.n for x in pair] for i, pair in enumerate(zip(anns, bests)) if not pub[i]]
        n_known = all(x.n is not None for i, pair in enumerate(zip(anns, bests))
                      if not pub[i] for x in pair if not x.missing)
        n_all = _uniform_n(known) if n_known else None
        recs = []
        for i, (_, row) in enumerate(df.iterrows()):
            recs.append({"arch": str(row["Arch"]), "method": _method_text(row["Method"]),
                         "method_tex": tex_escape(_method_text(row["Method"])),
                         "settings": [("" if pub[i] else str(row[s])) for s in set_cols],
                         "n": "" if pub[i] else _n_text([anns[i].n, bests[i].n])})
        keys = _key_columns(recs, set_cols, with_n=n_all is None and n_known)
        e_ns = {x.n for x in energies if not x.missing}
        fewer = bool(energies) and n_all is not None and e_ns - {n_all}
        for x in anns + bests + energies:
            x.n = None
        ann = Column("ANN", "S", text_width("ANN"), anns)
        best = Column("Acc.", "S", text_width("Acc."), bests)
        at = Column("$T$", "c", text_width("T"), [_t_only(v) for v in df[at_c]],
                    [text_width(_t_only(v)) for v in df[at_c]])
        reach_h = _stack("First $T$", "with SNN", r"$\geq$ ANN $-$ " + f"{TOLERANCE:g}")
        reach = Column(reach_h, "c", text_width("≥ ANN − 1"),
                       [_t_only(v) for v in df[reach_c]],
                       [text_width(_t_only(v)) for v in df[reach_c]])
        values = [ann, best, at]
        if energy_c:   # the SNN's energy at that T, % of the ANN's (tables.ENERGY_COLUMN)
            values.append(Column(_stack("Energy", r"\% ANN"), "S", text_width("Energy"),
                                 energies))
        values.append(reach)
        groups, pub_from = _arch_groups([str(a) for a in df["Arch"]], pub)
        k = len(keys)
        span = len(values) - 2
        head = " & ".join([""] * (k + 1) + [
            rf"\multicolumn{{{span}}}{{c}}{{Best SNN, $T \leq {LOW_T}$}}", ""]) + r" \\"
        table = LatexTable(keys, values, groups, rule_before=pub_from,
                           header_rows=[head, rf"\cmidrule(lr){{{k + 2}-{k + 1 + span}}}"],
                           splittable=False)
        cap = _table2_caption(names[ds], n_all, n_known, bool(energy_c), fewer,
                              df.attrs.get("protocol", ""))
        parts.append(table.render(cap, label, f"% Table 2: {names[ds]}"))
    return "\n".join(parts)


def _table2_caption(name: str, n_all: int | None, n_known: bool, energy: bool, fewer: bool,
                    protocol_line: str) -> str:
    """Table 2's LaTeX caption (``energy``: with the energy column; ``fewer``: some
    energy cells have fewer seeds than the accuracy cells)."""
    return (f"Low-latency summary on {tex_escape(name)}: ANN test accuracy (\\%), "
            f"the best SNN test accuracy at $T \\leq {LOW_T}$ and the $T$ where it is "
            f"reached"
            + (", the SNN's estimated energy per image at that $T$ as \\% of the ANN's "
               f"(45~nm: {E_AC_PJ:g}~pJ per synaptic operation, {E_MAC_PJ:g}~pJ per MAC, the analog-input "
               "first layer counted as MACs)" if energy else "")
            + f", and the smallest $T$ whose mean SNN accuracy is within "
            f"{TOLERANCE:g} point of the ANN mean (-- if none of the evaluated $T$). Mean "
            f"$\\pm$ sample std over "
            + (_seeds_phrase(n_all) if n_known else "seeds")
            + (" (a value without $\\pm$ is a single seed)" if n_all in (None, 1) else "")
            + (". Some runs recorded no energy: an energy value without $\\pm$ is from one "
               "seed, and the others' n is in table2.md" if fewer else "")
            + ". (paper): from the values published in the NQ paper (its Table 1), below "
            "the rule in each block. "
            + tex_text(protocol_line))


def _t_only(v) -> str:
    s = str(v)
    if s in ("", NA):
        return "--"
    return s[2:] if s.startswith("T=") else tex_escape(s)


# ------------------------------------------------------------------ compile check
@dataclass
class CompileResult:
    ok: bool                        # compiled without error and without overfull hbox > tol
    errors: list[str]               # "! ..." lines of the log
    overfull: list[float]           # pt too wide, every overfull \hbox
    log: str = ""


def missing_tex() -> str | None:
    """Why the tables cannot be compiled here (no pdflatex, a package missing), or None."""
    import shutil
    import subprocess

    if shutil.which("pdflatex") is None:
        return "pdflatex is not installed"
    if shutil.which("kpsewhich") is None:
        return "kpsewhich is not installed"
    for pkg, (_why, deb) in PACKAGES.items():
        r = subprocess.run(["kpsewhich", f"{pkg}.sty"], capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout.strip():
            return f"LaTeX package {pkg} is not installed (Debian/Ubuntu: {deb})"
    return None


def compile_table(table_tex: str, preamble: str | None = None, tolerance_pt: float = 1.0,
                  timeout: float = 60.0) -> CompileResult:
    """Compile one generated table file inside a minimal ``\\documentclass[10pt]{article}``
    (``\\input{preamble.tex}``, ``\\input{table.tex}``) with pdflatex; overfull hboxes
    wider than ``tolerance_pt`` count as failures."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "preamble.tex").write_text(preamble if preamble is not None else preamble_tex())
        (d / "table.tex").write_text(table_tex)
        (d / "doc.tex").write_text("\\documentclass[10pt]{article}\n\\input{preamble.tex}\n"
                                   "\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                               "-no-shell-escape", "doc.tex"], cwd=d, capture_output=True,
                              text=True, timeout=timeout)
        log_path = d / "doc.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else proc.stdout
    errors = [ln for ln in log.splitlines() if ln.startswith("!")]
    if proc.returncode != 0 and not errors:
        errors = [f"pdflatex exit status {proc.returncode}"]
    over = [float(v) for v in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    ok = not errors and all(v <= tolerance_pt for v in over)
    return CompileResult(ok, errors, over, log)
