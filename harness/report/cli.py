"""``harness report``: MLflow experiment -> tables, figures and index.md."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from . import tables
from .collect import (NA, Collected, ReportError, collect, default_tracking_uri,
                      setting_sort_key)

FORMATS = ("md", "tex", "png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness report",
        description="Tables (md/tex) and figures (png) for one MLflow experiment (sweep).")
    p.add_argument("--experiment", required=True, help="MLflow experiment (= sweep) name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>/)")
    p.add_argument("--format", default="md,tex,png",
                   help="comma-separated subset of md,tex,png (default: all)")
    return p


def _parse_formats(text: str) -> set[str]:
    fmts = {f.strip().lower() for f in text.split(",") if f.strip()}
    bad = fmts - set(FORMATS)
    if bad or not fmts:
        raise ReportError(f"unknown --format {', '.join(sorted(bad)) or text!r} "
                          f"(choose from {', '.join(FORMATS)})")
    return fmts


# ------------------------------------------------------------------ protocol text
def _data_source(name: str, root: str) -> str:
    r = (root or "").lower()
    if name == "imagefolder" and "cifar10-jpeg" in r:
        return (f"CIFAR-10 recompressed as JPEG (shared archive, `{root}`), "
                "accuracies slightly below pickled CIFAR-10")
    if name == "imagefolder":
        return f"image folder `{root}`"
    return f"`{name}`" + (f" (root `{root}`)" if root else "")


def protocol_lines(col: Collected) -> list[str]:
    runs = col.runs
    lines = []
    epochs = sorted({v for v in runs["epochs"] if v != NA}, key=setting_sort_key)
    lines.append(f"- Epochs: {', '.join(epochs) if epochs else 'unknown'}")
    on_test = runs[runs["select_on"] == "test"]
    sel_T = sorted({v for v in runs["select_T"] if v != NA}, key=setting_sort_key)
    t_txt = f" at T={'/'.join(sel_T)}" if sel_T else ""
    if not on_test.empty:
        lines.append(f"- Checkpoint selection: **selected on the TEST set — the paper's "
                     f"protocol, optimistic** ({len(on_test)} of {len(runs)} runs; best converted "
                     f"SNN{t_txt})")
    else:
        split = sorted({v for v in runs["select_on"] if v != NA})
        lines.append(f"- Checkpoint selection: best converted SNN{t_txt} on the "
                     f"{'/'.join(split) or 'validation'} split (held out from training)")
    sources = sorted({(n, r) for n, r in zip(runs["data_name"], runs["data_root"])})
    lines.append("- Data: " + "; ".join(_data_source(n, r) for n, r in sources))
    hw = []
    if "tags.harness.hardware" in col.parents.columns:
        used = set(runs["parent_id"])
        par = col.parents[col.parents["run_id"].isin(used)] if used else col.parents
        hw = sorted({h for h in par["tags.harness.hardware"] if isinstance(h, str) and h})
    lines.append(f"- Hardware: {'; '.join(hw) if hw else 'unknown'}")
    lines.append(f"- Runs: {len(runs)} finished trial runs reported "
                 f"({col.n_child_total} trial runs in total), seeds: "
                 f"{', '.join(sorted(set(runs['seed']), key=setting_sort_key))}")
    lines.append(f"- MLflow: experiment `{col.experiment}`, tracking URI `{col.tracking_uri}`")
    return lines


# ------------------------------------------------------------------ the report
def write_report(col: Collected, out: Path, fmts: set[str]) -> dict[str, list[Path]]:
    """Write tables, figures and index.md; returns {"tables": [...], "figures": [...]}."""
    out.mkdir(parents=True, exist_ok=True)
    runs = col.runs
    published = tables.load_published()
    blocks = tables.build_table1(runs, published)
    t2_md = tables.build_table2(runs, published, fmt="md")
    written: dict[str, list[Path]] = {"tables": [], "figures": []}
    table1_md = tables.render_table1_md(blocks, title=None, level=3)

    def _write(name: str, text: str) -> None:
        p = out / name
        p.write_text(text)
        written["tables"].append(p)

    if "md" in fmts:
        _write("table1.md", tables.render_table1_md(blocks))
        _write("table2.md", tables.render_table2_md(t2_md, tables.load_published_table2()))
    if "tex" in fmts:
        _write("table1.tex", tables.render_table1_tex(blocks))
        _write("table2.tex", tables.render_table2_tex(t2_md))
    if "png" in fmts:
        written["figures"] = _write_figures(col, out)
    (out / "index.md").write_text(_index_md(col, out, written, table1_md))
    return written


def _write_figures(col: Collected, out: Path) -> list[Path]:
    from . import figures
    from .collect import sanitize

    runs = col.runs
    paths: list[Path | None] = []
    keys = runs.groupby("dataset", sort=True)["dataset_key"].first()
    clash = keys.duplicated(keep=False)
    for ds, key in keys.items():
        stem = sanitize(ds).lower() if clash[ds] else sanitize(key)
        paths.append(figures.acc_vs_T(runs[runs["dataset"] == ds], out / f"acc_vs_T_{stem}.png"))
    paths.append(figures.epoch_time(runs, col.histories, out / "epoch_time.png"))
    paths.append(figures.ablation(runs[runs["method"] == "NQ-fixed"], "delta",
                                  out / "ablation_delta.png", "fixed noise δ (all layers)"))
    paths.append(figures.ablation(runs[runs["method"] == "NQ"], "tau",
                                  out / "ablation_tau.png", "calibration time steps τ",
                                  log_x=True))
    for _, r in runs.iterrows():
        hist = col.histories.get(r["run_id"])
        name = r["trial_file"]
        title = f"{r['trial']} ({r['method']})"
        paths.append(figures.training_curves(hist, r["best_epoch"], title,
                                             out / f"curves_{name}.png", r["select_T"]))
        paths.append(figures.delta_heatmap(hist, title, out / f"delta_heatmap_{name}.png"))
        data = col.residual_hist(r["run_id"])
        if data:
            paths.append(figures.residual_hist(data, r["trial"], out / f"residual_hist_{name}.png"))
    return [p for p in paths if p is not None]


_FIG_SECTIONS = [
    ("acc_vs_T_", "Accuracy vs. time steps"),
    ("epoch_time", "Training time per epoch (Fig. 6)"),
    ("ablation_", "Ablations (Fig. 4 / Fig. 7)"),
    ("curves_", "Training curves (checkpoint selection, Fig. 5)"),
    ("delta_heatmap_", "Layer-wise noise δ over epochs"),
    ("residual_hist_", "Residual-error histograms (Fig. 2)"),
]


def _index_md(col: Collected, out: Path, written: dict[str, list[Path]], table1_md: str) -> str:
    lines = [f"# Report: {col.experiment}", ""]
    lines += ["## Protocol", ""] + protocol_lines(col) + [""]
    if written["tables"]:
        lines += ["## Tables", ""]
        lines += [f"- [{p.name}]({p.name})" for p in written["tables"]] + [""]
    lines += ["## Table 1", "", table1_md.strip(), ""]
    notes = out / "discussion.md"  # hand-written; kept across regenerations
    if notes.exists():
        lines += ["## Discussion", "", notes.read_text().strip(), ""]
    if written["figures"]:
        lines += ["## Figures", ""]
        figs = sorted(written["figures"], key=lambda p: p.name)
        for prefix, heading in _FIG_SECTIONS:
            sel = [p for p in figs if p.name.startswith(prefix)]
            if not sel:
                continue
            lines += [f"### {heading}", ""]
            lines += [f"- [{p.name}]({p.name})" for p in sel] + [""]
            if prefix in ("acc_vs_T_", "epoch_time", "ablation_"):
                lines += [f"![{p.stem}]({p.name})" for p in sel] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help / usage error
        return int(exc.code or 0)
    os.environ.setdefault("MPLBACKEND", "Agg")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    uri = args.tracking_uri or default_tracking_uri()
    out = Path(args.out) if args.out else Path("reports") / args.experiment
    try:
        fmts = _parse_formats(args.format)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            col = collect(args.experiment, uri)
            write_report(col, out, fmts)
    except ReportError as exc:
        print(f"report error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
