"""``harness report``: MLflow experiment -> tables, figures and index.md."""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from . import latex, protocol, tables
from .collect import (EXCLUDED_PARAMS, NA, Collected, ReportError, arch_label, arch_order,
                      collect, dataset_display, default_tracking_uri, setting_label,
                      setting_sort_key)

FORMATS = ("md", "tex", "png")


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


def _paper_tag(c: protocol.Choice) -> str:
    if c.differs is None or not c.paper:
        return ""
    if c.differs:
        return f" — **differs from {c.ref}** ({c.paper})"
    return f" — as in {c.ref} ({c.paper})"


def _parent_line(col: Collected) -> str:
    k = len(col.parent_ids)
    others = [p for p in col.parent_ids if p != col.parent_id]
    if col.parent_given:
        how = f"selected with `--parent`; {k} parent run{'s' if k != 1 else ''} in the experiment"
    else:
        how = (f"newest of {k}" + ("; `--parent RUN_ID` reports another" if k > 1 else ""))
    text = f"- Sweep: parent run `{col.parent_id}` ({how})"
    if others:
        text += ". Other parent runs (newest first): " + ", ".join(f"`{p}`" for p in others) \
            + " — their trials are not in this report"
    return text


def protocol_lines(col: Collected) -> list[str]:
    runs = col.runs
    lines = [_parent_line(col)]
    by_name = {c.name: c for c in protocol.choices(runs)}
    ep = by_name["Epochs"]
    lines.append(f"- Epochs: {ep.here if ep.here != 'not logged' else 'unknown'}{_paper_tag(ep)}")
    on_test = runs[runs["select_on"] == "test"]
    sel_T = sorted({v for v in runs["select_T"] if v != NA}, key=setting_sort_key)
    t_txt = f" at T={'/'.join(sel_T)}" if sel_T else ""
    sel = by_name["Checkpoint selection split"]
    if not on_test.empty:
        lines.append(f"- Checkpoint selection: **selected on the TEST set — the paper's "
                     f"protocol, optimistic** ({len(on_test)} of {len(runs)} runs; best converted "
                     f"SNN{t_txt}){_paper_tag(sel)}")
    else:
        split = sorted({v for v in runs["select_on"] if v != NA})
        lines.append(f"- Checkpoint selection: best converted SNN{t_txt} on the "
                     f"{'/'.join(split) or 'validation'} split (held out from training)"
                     f"{_paper_tag(sel)}")
    for name, c in by_name.items():
        if name in ("Epochs", "Checkpoint selection split", "Data"):
            continue
        lines.append(f"- {name}: {c.here}{_paper_tag(c)}")
    sources = sorted({(n, r) for n, r in zip(runs["data_name"], runs["data_root"])})
    data = "- Data: " + "; ".join(_data_source(n, r) for n, r in sources)
    if "Data" in by_name:
        data += _paper_tag(by_name["Data"])
    lines.append(data)
    hw = []
    if "tags.harness.hardware" in col.parents.columns:
        used = set(runs["parent_id"])
        par = col.parents[col.parents["run_id"].isin(used)] if used else col.parents
        hw = sorted({h for h in par["tags.harness.hardware"] if isinstance(h, str) and h})
    lines.append(f"- Hardware: {'; '.join(hw) if hw else 'unknown'}")
    counts = col.status_counts
    status = ", ".join(f"{v} {k}" for k, v in counts.items())
    lines.append(f"- Runs: {len(runs)} finished trial runs reported; trial runs under this "
                 f"parent by status: {status} ({col.n_child_total} in total); seeds: "
                 f"{', '.join(sorted(set(runs['seed']), key=setting_sort_key))}")
    varying = sorted({s for ds in runs["dataset"].unique()
                      for s in tables.varying_settings(runs[runs["dataset"] == ds])})
    lines.append("- Row keys: dataset, architecture, method" + (
        " and the settings that vary: " + ", ".join(f"`{setting_label(s)}`" for s in varying)
        if varying else " (no other setting varies)") + ". Never row keys: " + "; ".join(
        f"`{k}` ({why})" for k, why in EXCLUDED_PARAMS.items()))
    lines.append(f"- MLflow: experiment `{col.experiment}`, tracking URI `{col.tracking_uri}`")
    return lines


def not_finished_lines(col: Collected) -> list[str]:
    """One line per trial of the parent that is not FINISHED, with its cell's n."""
    trials = col.trials
    if trials is None or trials.empty:
        return []
    bad = trials[trials["status"] != "FINISHED"]
    lines = []
    varying: dict[str, list[str]] = {}
    for _, t in bad.iterrows():
        ds_runs = col.runs[col.runs["dataset"] == t["dataset"]]
        if t["dataset"] not in varying:
            varying[t["dataset"]] = tables.varying_settings(ds_runs)
        keys = ["dataset", "arch", "method"] + [
            s for s in varying[t["dataset"]] if s in trials.columns]
        same = lambda f: (f[keys] == t[keys]).all(axis=1)  # noqa: E731
        n_done = int(same(col.runs[keys]).sum()) if not col.runs.empty else 0
        n_all = int(same(trials[keys]).sum())
        settings = ", ".join(f"{setting_label(s)}={t[s]}" for s in keys[3:] if t[s] != NA)
        where = f"{t['dataset']}, {arch_label(t['arch'])}, {t['method']}" + (
            f" ({settings})" if settings else "")
        lines.append(f"- `{t['trial']}` (run `{str(t['run_id'])[:8]}`): **{t['status']}** — "
                     f"{where}, seed {t['seed']}. Its cells have n = {n_done} of the {n_all} "
                     "trials of this cell that started.")
    return lines


# ------------------------------------------------------------------ the report
def write_report(col: Collected, out: Path, fmts: set[str],
                 per_trial: bool = False) -> dict[str, list[Path]]:
    """Write tables, figures and index.md; returns {"tables": [...], "figures": [...]}
    (figures: the PNG files; each has a PDF twin)."""
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
        from . import latex
        _write("preamble.tex", latex.preamble_tex())
        _write("table1.tex", latex.render_table1_tex(blocks))
        delta_tex = latex.render_table1_delta_tex(blocks)
        if delta_tex is not None:
            _write("table1_delta.tex", delta_tex)
        _write("table2.tex", latex.render_table2_tex(t2_md))
    if "png" in fmts:
        written["figures"] = _write_figures(col, out, per_trial)
    (out / "index.md").write_text(_index_md(col, out, written, table1_md, blocks))
    return written


def _write_figures(col: Collected, out: Path, per_trial: bool = False) -> list[Path]:
    from . import figures
    from .collect import sanitize

    runs = col.runs
    paths: list[Path | None] = []
    keys = runs.groupby("dataset", sort=True)["dataset_key"].first()
    clash = keys.duplicated(keep=False)
    for ds, key in keys.items():
        stem = sanitize(ds).lower() if clash[ds] else sanitize(key)
        ds_runs = runs[runs["dataset"] == ds]
        paths.append(figures.acc_vs_T(ds_runs, out / f"acc_vs_T_{stem}.png"))
        paths.append(figures.acc_vs_energy(ds_runs, out / f"acc_vs_energy_{stem}.png"))
        paths.append(figures.selection(ds_runs, col.histories, out / f"selection_{stem}.png"))
        paths.append(figures.delta_heatmaps(ds_runs, col.histories,
                                            out / f"delta_heatmaps_{stem}.png"))
        nq_res = [v for v in ds_runs.loc[ds_runs["method"] == "NQ", "residual"]
                  if v != NA] if "residual" in ds_runs.columns else []
        residual = max(set(nq_res), key=nq_res.count) if nq_res else None
        datas = {}
        for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
            sub = ds_runs[ds_runs["arch"] == arch]
            datas[arch] = {m: [d for rid in sub.loc[sub["method"] == m, "run_id"]
                               if (d := col.residual_hist(rid))]
                           for m in figures.OVERLAY_METHODS}
        paths.append(figures.residual_overlay(datas, dataset_display(key, ds),
                                              out / f"residual_overlay_{stem}.png",
                                              residual=residual))
    paths.append(figures.epoch_time(runs, col.histories, out / "epoch_time.png"))
    ref_tau, ref = figures.layerwise_reference(runs[runs["method"] == "NQ"])
    paths.append(figures.ablation(runs[runs["method"] == "NQ-fixed"], "delta",
                                  out / "ablation_delta.png", "fixed noise δ (all layers)",
                                  reference=ref,
                                  reference_label=f"dashed: layer-wise δ (NQ, τ = {ref_tau}), "
                                                  "same colour = same T"))
    paths.append(figures.ablation(runs[runs["method"] == "NQ"], "tau",
                                  out / "ablation_tau.png", "calibration time steps τ",
                                  log_x=True))
    if per_trial:
        for _, r in runs.iterrows():
            hist = col.histories.get(r["run_id"])
            name = r["trial_file"]
            title = f"{r['trial']} ({r['method']})"
            paths.append(figures.training_curves(hist, r["best_epoch"], title,
                                                 out / f"curves_{name}.png", r["select_T"],
                                                 r["select_on"]))
            paths.append(figures.delta_heatmap(hist, title, out / f"delta_heatmap_{name}.png"))
            data = col.residual_hist(r["run_id"])
            if data:
                paths.append(figures.residual_hist(data, r["trial"],
                                                   out / f"residual_hist_{name}.png"))
    return [p for p in paths if p is not None]


# (file name prefix, heading, shown inline, what it shows)
_FIG_SECTIONS = [
    ("acc_vs_T_", "Accuracy vs. time steps", True, ""),
    ("acc_vs_energy_", "Accuracy vs. estimated energy", True,
     "One point per evaluated T (labelled), mean ± std of the SNN test accuracy and of "
     "the estimated energy per image over the runs that recorded energy; the star is "
     f"the ANN (its MACs at {tables.E_MAC_PJ:g} pJ). SNN energy: {tables.E_AC_PJ:g} pJ per "
     f"synaptic operation (spike × fan-out) plus {tables.E_MAC_PJ:g} pJ per MAC of the "
     "analog-input first layer at every step (`energy/uJ_TNN`, "
     "harness.energy). 45 nm figures, as in conversion papers; an estimate, not a "
     "measurement on hardware."),
    ("selection_", "Checkpoint selection (Fig. 5)", True,
     "One panel per architecture and method, QCFS and NQ (the runs' seeds and any "
     "varying settings pooled, as the panel title says). Lines: mean over the runs, per epoch, of the ANN "
     "test accuracy and of the per-epoch SNN accuracy the harness selects on "
     "(`snn/<split>_acc_T<select_T>`). Markers under the curves: per run, the epoch the "
     "SNN criterion selected (`final/best_epoch`, ▲) and the epoch the best ANN "
     "validation accuracy (`ann/val_acc`) would have selected (▼). Box: the final SNN "
     "test accuracy at `select_T` of the SNN-selected checkpoints (mean ± std over the "
     "runs), and in how many runs the ANN criterion picks the same epoch. The SNN test "
     "accuracy of an ANN-selected checkpoint is known only where the per-epoch SNN test "
     "accuracy was logged (selection on the test split) or where both criteria pick the "
     "same epoch; it is shown only then."),
    ("epoch_time", "Training time per epoch (Fig. 6)", True,
     "Median of epochs 2 … E of each run, then the median over the runs of the bar "
     "(seeds and settings); epoch 1 is left out because it includes compilation and "
     "other warm-up, and its total is printed under each bar. Calibration is what each "
     "method does after an epoch: NQ measures the residual and sets δ for the next "
     "epoch; QCFS only measures the residual (for the residual figures), it uses no δ; "
     "NQ-fixed does none."),
    ("ablation_", "Ablations (Fig. 4 / Fig. 7)", True, ""),
    ("residual_overlay_", "Residual-error histograms, QCFS and NQ overlaid (Fig. 2)", True,
     "One row per architecture; per layer (at most 5 per row, evenly spaced from the "
     "first to the last), the histogram of the residual in units of λ of all QCFS runs "
     "and of all NQ runs of the architecture, counts summed over the runs (seeds and "
     "settings), as a density per unit of residual/λ (log scale); σ: standard deviation "
     "of the pooled histogram."),
    ("delta_heatmaps_", "Layer-wise noise δ over epochs (mean over the NQ runs)", True, ""),
    ("curves_", "Per trial: training curves", False, ""),
    ("delta_heatmap_", "Per trial: layer-wise noise δ_trained over epochs", False, ""),
    ("residual_hist_", "Per trial: residual-error histograms", False, ""),
]


_OVERCLAIM = ("better", "match", "reproduc")


def _index_md(col: Collected, out: Path, written: dict[str, list[Path]], table1_md: str,
              blocks: list[tables.Block] | None = None) -> str:
    """index.md: protocol, unfinished trials, table files, Table 1, what the Δ rows
    support, the hand-written discussion, figures and the per-seed appendix."""
    lines = [f"# Report: {col.experiment}", ""]
    lines += ["## Protocol", ""] + protocol_lines(col) + [""]
    lines += _not_reported_section(col)
    lines += _tables_section(written["tables"])
    lines += ["## Table 1", "", table1_md.strip(), ""]
    lines += _findings_section(blocks or [])
    lines += _discussion_section(out / "discussion.md", blocks or [])
    lines += _figures_section(out, written["figures"])
    lines += _appendix_section(col, blocks or [])
    return "\n".join(lines).rstrip() + "\n"


def never_started_lines(col: Collected) -> list[str]:
    """One line per trial the sweep planned (its parent's `harness.planned_trials` tag) that
    has no run at all: it never started (an interrupt, or a crash of the driver)."""
    key = "tags.harness.planned_trials"
    if col.parent_id is None or key not in col.parents.columns:
        return []
    row = col.parents[col.parents["run_id"] == col.parent_id]
    if row.empty or not isinstance(row[key].iloc[0], str):
        return []
    have = set(col.trials["trial"]) if col.trials is not None and not col.trials.empty else set(col.runs["trial"])
    return [f"- `{label}`: **never started** (no run); its cells lack this trial."
            for label in json.loads(row[key].iloc[0]) if label not in have]


def _not_reported_section(col: Collected) -> list[str]:
    missing = not_finished_lines(col) + never_started_lines(col)
    if not missing:
        return []
    return ["## Trials not reported", "",
            "These trials of the parent run did not finish and are left out of every "
            "table and figure:", ""] + missing + [""]


def _tables_section(paths: list[Path]) -> list[str]:
    if not paths:
        return []
    lines = ["## Tables", ""]
    lines += [f"- [{p.name}]({p.name})" for p in paths] + [""]
    if any(p.suffix == ".tex" for p in paths):
        lines += ["LaTeX: `\\input{preamble.tex}` in the paper's preamble (booktabs, "
                  "multirow, siunitx 3, graphicx), then `\\input{table1.tex}` where the "
                  "table goes. Each table fits the text width of a 10-pt `article` "
                  "(wide tables are split into stacked panels); the NQ − QCFS rows with "
                  "their CIs and p-values are in `table1_delta.tex`.", ""]
    return lines


def _findings_section(blocks: list[tables.Block]) -> list[str]:
    findings = tables.delta_findings(blocks)
    if not findings:
        return []
    lines = ["## NQ − QCFS: what the Δ rows support (generated)", "",
             "Generated from the Δ rows of Table 1. “Significant at 95%” means that the "
             "t-based 95% CI of the mean per-seed difference excludes 0 (paired t-test, "
             "unadjusted; the Holm result across the row's columns is given with it).", ""]
    return lines + findings + [""]


def _discussion_section(path: Path, blocks: list[tables.Block]) -> list[str]:
    """The hand-written discussion.md (kept across regenerations), with a caution when
    it claims more than the Δ rows support."""
    if not path.exists():
        return []
    text = path.read_text().strip()
    lines = ["## Discussion", "", text, "",
             "_Hand-written (`discussion.md`): not generated and not checked by "
             "`harness report`._"]
    n_sig = sum(1 for b in blocks for r in b.rows if r.kind == "delta"
                for c in r.cells.values() if c is not None and c.significant)
    used = [w for w in _OVERCLAIM if w in text.lower()]
    if used and n_sig == 0:
        lines += ["", "_Caution: the discussion uses "
                  + ", ".join(f"“{w}…”" for w in used) + " but no NQ − QCFS difference "
                  "in Table 1 is significant at 95%._"]
    return lines + [""]


def _figures_section(out: Path, paths: list[Path]) -> list[str]:
    """The figures by kind (:data:`_FIG_SECTIONS`): links to PNG and PDF, and the PNG
    inline where the kind is shown inline."""
    if not paths:
        return []
    lines = ["## Figures", "",
             "Every figure is written as PNG and as PDF (same name, `.pdf`)."
             + ("" if any(p.name.startswith("curves_") for p in paths) else
                " Per-trial figures (training curves, δ heatmaps and residual "
                "histograms of every trial): `harness report --per-trial`."), ""]
    figs = sorted(paths, key=lambda p: p.name)
    for prefix, heading, inline, what in _FIG_SECTIONS:
        sel = [p for p in figs if p.name.startswith(prefix)]
        if not sel:
            continue
        lines += [f"### {heading}", ""]
        if what:
            lines += [what, ""]
        lines += [f"- [{p.name}]({p.name})"
                  + (f" ([PDF]({p.with_suffix('.pdf').name}))"
                     if (out / p.with_suffix(".pdf").name).exists() else "")
                  for p in sel] + [""]
        if inline:
            lines += [f"![{p.stem}]({p.name})" for p in sel] + [""]
    return lines


def _appendix_section(col: Collected, blocks: list[tables.Block]) -> list[str]:
    if not blocks:
        return []
    return ["## Appendix: per-seed values", "",
            "Every finished trial of the parent run, then the per-seed NQ − QCFS "
            "differences behind the Δ rows.", "",
            tables.per_seed_tables(col.runs, blocks).strip(), ""]


def run(experiment: str, tracking_uri: str | None = None, out: str | Path | None = None,
        formats: str = "md,tex,png", parent: str | None = None, per_trial: bool = False,
        attach: bool = True) -> Path:
    """Write the report of one experiment (its newest parent run, or `parent`) to `out`
    (default reports/<experiment>/); with `attach`, also log its tables and index.md as
    artifacts (`report/`) of that parent run. Raises ReportError."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    uri = tracking_uri or default_tracking_uri()
    out = Path(out) if out else Path("reports") / experiment
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file (expected a folder, existing or new)")
    fmts = _parse_formats(formats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col = collect(experiment, uri, parent=parent)
        try:
            written = write_report(col, out, fmts, per_trial=per_trial)
        except OSError as e:
            raise ReportError(f"--out {out} cannot be written ({e.strerror or e})") from None
    if attach and col.parent_id:
        _attach(col, out, written)
    return out


def _attach(col: Collected, out: Path, written: dict[str, list[Path]]) -> None:
    """The tables and index.md as artifacts of the reported parent run (MLflow UI)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=col.tracking_uri)
    for path in [*written["tables"], out / "index.md"]:
        if path.exists():
            client.log_artifact(col.parent_id, str(path), "report")
