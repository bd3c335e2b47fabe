"""``harness report``: MLflow experiment -> tables, figures and index.md."""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
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
def write_report(col: Collected, out: Path, fmts: set[str], per_trial: bool = False,
                 jobs: int | None = None, while_drawing=None) -> dict[str, list[Path]]:
    """Write tables, figures and index.md; returns {"tables": [...], "figures": [...]}
    (figures: the PNG files; each has a PDF twin). See :class:`_ReportJobs`."""
    rep = _ReportJobs(out, fmts, per_trial, jobs)
    try:
        rep.runs_read(col)
        rep.histories_read(col)
        return rep.finish(col, while_drawing)
    finally:
        rep.close()


class _ReportJobs:
    """The tables and each figure of one report as jobs for `jobs` forked processes
    (default: the CPUs this process may use; 1 = all here, one after the other: see
    :class:`_ForkJobs`), each started as soon as what it needs is read: the tables and
    the figures of the runs' final metrics once the runs are read (:meth:`runs_read`,
    while this process goes on to read the metric histories), the figures of the
    histories after (:meth:`histories_read`). :meth:`finish` waits for them and writes
    index.md."""

    def __init__(self, out: Path, fmts: set[str], per_trial: bool = False,
                 jobs: int | None = None):
        self.out, self.fmts, self.per_trial = out, fmts, per_trial
        self.runner = _ForkJobs([], jobs)
        self.places: list[int] = []     # per figure job: its place in _figure_jobs' order
        self.later: list = []           # the jobs that wait for the histories

    def _add(self, picked: list) -> None:
        self.places += [i for i, _ in picked]
        self.runner.add([job for _, job in picked])
        self.runner.start()

    def runs_read(self, col: Collected) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.runner.add([(_write_tables, (col, self.out, self.fmts), {})])
        self.runner.start()
        if "png" not in self.fmts:
            return
        if self.runner.forking:
            # while the tables are built: load the fonts and fill matplotlib's caches
            # here, once, rather than in every figure's process
            from . import figures
            figures.warm_up()
        jobs = list(enumerate(_figure_jobs(col, self.out, self.per_trial)))
        self._add([(i, job) for i, (needs, job) in jobs if not needs])
        self.later = [(i, job) for i, (needs, job) in jobs if needs]

    def histories_read(self, col: Collected) -> None:
        """The figures of the metric histories (their jobs read ``col.histories``)."""
        self._add(self.later)
        self.later = []

    def finish(self, col: Collected, while_drawing=None) -> dict[str, list[Path]]:
        if while_drawing is not None:
            while_drawing()
        results = self.runner.result()
        tables_written, table1_md, blocks = results[0]
        figs = [p for _, p in sorted(zip(self.places, results[1:])) if p is not None]
        written = {"tables": tables_written, "figures": figs}
        (self.out / "index.md").write_text(_index_md(col, self.out, written, table1_md,
                                                     blocks))
        return written

    def close(self) -> None:
        self.runner.close()


def _write_tables(col: Collected, out: Path, fmts: set[str]) -> tuple[list[Path], str, list]:
    """Tables 1 and 2 (Markdown and LaTeX, as `fmts` asks) and the LaTeX preamble:
    (the files written, Table 1 as Markdown for index.md, Table 1's blocks)."""
    runs = col.runs
    published = tables.load_published()
    blocks = tables.build_table1(runs, published)
    t2_md = tables.build_table2(runs, published, fmt="md")
    written: list[Path] = []

    def _write(name: str, text: str) -> None:
        p = out / name
        p.write_text(text)
        written.append(p)

    if "md" in fmts:
        _write("table1.md", tables.render_table1_md(blocks))
        _write("table2.md", tables.render_table2_md(t2_md, tables.load_published_table2()))
    if "tex" in fmts:
        _write("preamble.tex", latex.preamble_tex())
        _write("table1.tex", latex.render_table1_tex(blocks))
        delta_tex = latex.render_table1_delta_tex(blocks)
        if delta_tex is not None:
            _write("table1_delta.tex", delta_tex)
        _write("table2.tex", latex.render_table2_tex(t2_md))
    return written, tables.render_table1_md(blocks, title=None, level=3), blocks


def default_jobs() -> int:
    """The CPUs this process may run on (at most 8): the default of ``--jobs``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class _ForkJobs:
    """Jobs ``(function, args, kwargs)`` run each in a fresh forked child process, at most
    ``workers`` at a time; with ``workers`` 1 (or no fork on this system) they run here,
    one after the other. Results keep the jobs' order; the first job to fail raises its
    error from :meth:`result`, after the other children are stopped.

    A job sees this process as it was when the job started (fork: nothing is pickled on
    the way in), and its result comes back pickled through a pipe. Every fork is made
    from this thread, which runs nothing else meanwhile, and each child ends with
    ``os._exit`` after one job: a child's memory is this process's plus what its one
    job allocates, whatever ran before it."""

    def __init__(self, jobs: list, workers: int | None = None):
        self.jobs = list(jobs)
        self.workers = default_jobs() if workers is None else workers
        self.forking = self.workers > 1 and hasattr(os, "fork")
        self.results: list = [None] * len(self.jobs)
        self.running: dict[int, tuple[int, int, list]] = {}   # pid -> (job, read fd, chunks)
        self.next = 0
        import selectors
        self._selectors = selectors
        self.sel = selectors.DefaultSelector()

    def add(self, jobs: list) -> None:
        """More jobs, after those given so far."""
        self.jobs += jobs
        self.results += [None] * len(jobs)

    # ---------------------------------------------------------------- the parent
    def start(self) -> None:
        """Start jobs not started yet, up to ``workers`` running; returns at once."""
        if self.forking:
            self._fill()

    def result(self) -> list:
        if not self.forking:
            return [fn(*args, **kwargs) for fn, args, kwargs in self.jobs]
        self._fill()
        while self.running:
            self._pump(None)
        return self.results

    def poll(self) -> None:
        """Take the results of the jobs that have ended and start the next ones, without
        waiting: for a caller that does other work meanwhile."""
        if self.forking and self.running:
            self._pump(0)

    def _pump(self, timeout: float | None) -> None:
        """Read what the children have written (waiting up to ``timeout`` s for some);
        a child whose pipe is closed has ended: its result is taken, the next job starts."""
        for key, _ in self.sel.select(timeout):
            pid = key.data
            i, fd, chunks = self.running[pid]
            data = os.read(fd, 1 << 20)
            if data:
                chunks.append(data)
                continue
            self.sel.unregister(fd)
            os.close(fd)
            del self.running[pid]
            _, status = os.waitpid(pid, 0)
            self._take(i, b"".join(chunks), status)
            self._fill()

    def _fill(self) -> None:
        while self.next < len(self.jobs) and len(self.running) < self.workers:
            i, self.next = self.next, self.next + 1
            r, w = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            # the child's garbage collections leave this process's objects alone (frozen),
            # so the pages they share stay shared instead of being copied on write
            gc.freeze()
            pid = os.fork()
            if pid == 0:                                  # the child
                os.close(r)
                self._child(i, w)
            gc.unfreeze()
            os.close(w)
            self.running[pid] = (i, r, [])
            self.sel.register(r, self._selectors.EVENT_READ, pid)

    def _take(self, i: int, data: bytes, status: int) -> None:
        import pickle
        try:
            kind, value = pickle.loads(data)
        except Exception:
            code = os.waitstatus_to_exitcode(status)
            raise ReportError(f"report job {self._name(i)} ended without a result (exit status "
                              f"{code})") from None
        if kind == "error":
            raise value
        self.results[i] = value

    def _name(self, i: int) -> str:
        fn, args, _ = self.jobs[i]
        path = next((a for a in args if isinstance(a, Path)), None)
        return f"{fn.__name__}" + (f" ({path.name})" if path is not None else "")

    def close(self) -> None:
        """Stop and reap the children still running (after an error or an interrupt).
        SIGKILL: a child may have inherited a Python SIGTERM handler (Ray installs one)
        and not yet replaced it; it has nothing to clean up (it would end by os._exit)."""
        import signal
        for pid, (_, fd, _) in list(self.running.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.sel.unregister(fd)
            os.close(fd)
        self.running.clear()
        self.sel.close()

    # ---------------------------------------------------------------- the child
    def _child(self, i: int, w: int) -> None:
        import pickle
        code = 0
        try:
            fn, args, kwargs = self.jobs[i]
            try:
                out = ("ok", fn(*args, **kwargs))
            except BaseException as e:          # noqa: BLE001 (reported to the parent)
                out = ("error", e)
            try:
                data = pickle.dumps(out)
            except Exception as e:              # an unpicklable result or error
                data = pickle.dumps(("error", ReportError(
                    f"report job {self._name(i)}: {type(out[1]).__name__}: {out[1]} ({e})")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:                   # noqa: BLE001
            code = 1
        finally:
            os._exit(code)


class _StreamedHists:
    """The residual_hist.json of some runs, read one at a time on each pass and not
    kept: pooling the histograms of hundreds of runs then needs the memory of one."""

    def __init__(self, col: Collected, run_ids):
        self.col, self.run_ids = col, [str(r) for r in run_ids]

    def __iter__(self):
        return (d for rid in self.run_ids if (d := self.col.residual_hist(rid, cache=False)))


def _overlay_inputs(col: Collected, ds_runs, streamed: bool = False) -> dict:
    """{arch: {method: the runs' residual_hist.json}} for :func:`figures.residual_overlay`:
    lists, or with ``streamed`` iterables that read the files as they are pooled."""
    from . import figures
    datas = {}
    for arch in sorted(ds_runs["arch"].unique(), key=arch_order):
        sub = ds_runs[ds_runs["arch"] == arch]
        ids = {m: sub.loc[sub["method"] == m, "run_id"] for m in figures.OVERLAY_METHODS}
        datas[arch] = {m: _StreamedHists(col, r) if streamed else
                       [d for rid in r if (d := col.residual_hist(rid))]
                       for m, r in ids.items()}
    return datas


def _residual_overlay(col: Collected, ds_runs, title: str, path: Path, residual):
    from . import figures
    return figures.residual_overlay(_overlay_inputs(col, ds_runs, streamed=True), title,
                                    path, residual=residual)


def _residual_hist(col: Collected, run_id: str, trial: str, path: Path):
    from . import figures
    data = col.residual_hist(run_id)
    return figures.residual_hist(data, trial, path) if data else None


def _selection(ds_runs, col: Collected, path: Path):
    from . import figures
    return figures.selection(ds_runs, col.histories, path)


def _delta_heatmaps(ds_runs, col: Collected, path: Path):
    from . import figures
    return figures.delta_heatmaps(ds_runs, col.histories, path)


def _epoch_time(runs, col: Collected, path: Path):
    from . import figures
    return figures.epoch_time(runs, col.histories, path)


def _training_curves(col: Collected, run_id: str, *args):
    from . import figures
    return figures.training_curves(col.histories.get(run_id), *args)


def _delta_heatmap(col: Collected, run_id: str, *args):
    from . import figures
    return figures.delta_heatmap(col.histories.get(run_id), *args)


def _figure_jobs(col: Collected, out: Path, per_trial: bool = False) -> list:
    """The report's figures as ``(needs the metric histories, job)``, a job being
    ``(function, args, kwargs)`` (see :class:`_ForkJobs`); a job that needs the
    histories reads ``col.histories`` when it runs. Artifacts (residual histograms) in a
    local store are read by the job itself; from a remote store they are downloaded
    here first, so that a forked job never talks to MLflow."""
    from . import figures
    from .collect import _local_artifact, sanitize

    runs = col.runs
    jobs: list = []

    def job(fn, *args, **kwargs) -> None:
        jobs.append((False, (fn, args, kwargs)))

    def hist_job(fn, *args) -> None:
        jobs.append((True, (fn, args, {})))

    local = all(_local_artifact(col.artifact_uris.get(str(r)), "x") is not None
                for r in runs["run_id"])
    keys = runs.groupby("dataset", sort=True)["dataset_key"].first()
    clash = keys.duplicated(keep=False)
    for ds, key in keys.items():
        stem = sanitize(ds).lower() if clash[ds] else sanitize(key)
        ds_runs = runs[runs["dataset"] == ds]
        job(figures.acc_vs_T, ds_runs, out / f"acc_vs_T_{stem}.png")
        job(figures.acc_vs_energy, ds_runs, out / f"acc_vs_energy_{stem}.png")
        hist_job(_selection, ds_runs, col, out / f"selection_{stem}.png")
        hist_job(_delta_heatmaps, ds_runs, col, out / f"delta_heatmaps_{stem}.png")
        nq_res = [v for v in ds_runs.loc[ds_runs["method"] == "NQ", "residual"]
                  if v != NA] if "residual" in ds_runs.columns else []
        residual = max(set(nq_res), key=nq_res.count) if nq_res else None
        title, path = dataset_display(key, ds), out / f"residual_overlay_{stem}.png"
        if local:
            job(_residual_overlay, col, ds_runs, title, path, residual)
        else:
            job(figures.residual_overlay, _overlay_inputs(col, ds_runs), title, path,
                residual=residual)
    hist_job(_epoch_time, runs, col, out / "epoch_time.png")
    ref_tau, ref = figures.layerwise_reference(runs[runs["method"] == "NQ"])
    job(figures.ablation, runs[runs["method"] == "NQ-fixed"], "delta",
        out / "ablation_delta.png", "fixed noise δ (all layers)", reference=ref,
        reference_label=f"dashed: layer-wise δ (NQ, τ = {ref_tau}), same colour = same T")
    job(figures.ablation, runs[runs["method"] == "NQ"], "tau", out / "ablation_tau.png",
        "calibration time steps τ", log_x=True)
    if per_trial:
        for _, r in runs.iterrows():
            name = r["trial_file"]
            title = f"{r['trial']} ({r['method']})"
            hist_job(_training_curves, col, r["run_id"], r["best_epoch"], title,
                     out / f"curves_{name}.png", r["select_T"], r["select_on"])
            hist_job(_delta_heatmap, col, r["run_id"], title, out / f"delta_heatmap_{name}.png")
            path = out / f"residual_hist_{name}.png"
            if local:
                job(_residual_hist, col, r["run_id"], r["trial"], path)
            elif data := col.residual_hist(r["run_id"]):
                job(figures.residual_hist, data, r["trial"], path)
    return jobs


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
        attach: bool = True, jobs: int | None = None) -> Path:
    """Write the report of one experiment (its newest parent run, or `parent`) to `out`
    (default reports/<experiment>/); with `attach`, also log its tables and index.md as
    artifacts (`report/`) of that parent run, once everything is written. `jobs`:
    processes that draw the figures (default :func:`default_jobs`). Raises ReportError."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    uri = tracking_uri or default_tracking_uri()
    out = Path(out) if out else Path("reports") / experiment
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file (expected a folder, existing or new)")
    if jobs is not None and jobs < 1:
        raise ReportError(f"--jobs {jobs} is not allowed (expected an integer >= 1)")
    fmts = _parse_formats(formats)
    client: list = []
    rep = _ReportJobs(out, fmts, per_trial, jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            col = collect(experiment, uri, parent=parent, on_runs=rep.runs_read,
                          progress=rep.runner.poll)
            rep.histories_read(col)
            # a remote artifact store: open the client while the figures are drawn
            prepare = ((lambda: client.append(_attach_client(col))) if attach and
                       col.parent_id and _parent_artifact_dir(col) is None else None)
            written = rep.finish(col, while_drawing=prepare)
        except OSError as e:
            raise ReportError(f"--out {out} cannot be written ({e.strerror or e})") from None
        finally:
            rep.close()
    if attach and col.parent_id:
        _attach(col, out, written, client[0] if client else None)
    return out


def _parent_artifact_dir(col: Collected) -> Path | None:
    """The parent run's ``report/`` artifact folder when its artifact store is a local
    folder (``file:`` URI or path), else None (then MLflow's client uploads)."""
    from .collect import _local_artifact
    parents = col.parents
    if parents is None or "artifact_uri" not in parents.columns:
        return None
    uri = parents.loc[parents["run_id"].astype(str) == str(col.parent_id), "artifact_uri"]
    return _local_artifact(uri.iloc[0], "report") if len(uri) and isinstance(
        uri.iloc[0], str) else None


def _attach_client(col: Collected):
    """An MLflow client with its store open and the parent run looked up (the slow part
    of :func:`_attach` with a remote artifact store, done while the figures are drawn)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=col.tracking_uri)
    client.get_run(col.parent_id)
    return client


def _attach(col: Collected, out: Path, written: dict[str, list[Path]], client=None) -> None:
    """The tables and index.md as artifacts ``report/<file>`` of the reported parent run
    (MLflow UI). A local artifact store gets the files copied into the run's artifact
    folder, as MLflow's local artifact repository does; any other goes through MLflow."""
    files = [p for p in [*written["tables"], out / "index.md"] if p.exists()]
    local = _parent_artifact_dir(col)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, local / path.name)
        return
    client = client or _attach_client(col)
    for path in files:
        client.log_artifact(col.parent_id, str(path), "report")
