"""Tests for `harness report` (harness.report): fake MLflow store -> tables/figures."""
from __future__ import annotations

import json
import os
import re

os.environ.setdefault("MPLBACKEND", "Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from harness.report import latex, tables  # noqa: E402
from harness.cli import main as _harness_main  # noqa: E402


def main(argv):
    """`harness report ARGV` (the CLI is the only argv parser)."""
    return _harness_main(["report", *argv])
from test_report_latex import check_tabular, needs_tex, top_tabulars  # noqa: E402

EXP = "toy_sweep"
ABL = "toy_ablation"
EMPTY = "toy_empty"
TS = (1, 2, 4, 8)

# (arch, mode) -> {seed: (ann, T1, T2, T4, T8)}
FINAL = {
    ("resnet20", "qcfs"): {0: (90.0, 50.0, 60.0, 80.0, 89.5), 1: (91.0, 52.0, 62.0, 82.0, 90.5)},
    ("resnet20", "layerwise"): {0: (89.0, 55.0, 66.0, 84.0, 89.0),
                                1: (89.5, 57.0, 67.0, 85.0, 90.0)},
    ("vgg16", "qcfs"): {0: (93.0, 70.0, 80.0, 90.0, 92.0), 1: (93.0, 72.0, 82.0, 90.0, 92.0)},
    ("vgg16", "layerwise"): {0: (92.0, 75.0, 85.0, 91.0, 92.0), 1: (92.0, 75.0, 85.0, 91.0, 92.0)},
}
METHOD = {"qcfs": "QCFS", "layerwise": "NQ", "fixed": "NQ-fixed"}
N_EPOCHS, N_LAYERS = 3, 3
LAYERS = ["conv1.act", "stages.0.0.act1", "stages.0.0.act2"]


def _params(arch, mode, seed, delta="0.0", **extra):
    """The child-run params the trial writer logs (Config.flat() + calib.*)."""
    counts = ",".join(str(51 + (seed + c) % 3) for c in range(10))   # drawn per seed
    return {"data.name": "cifar10", "data.root": "/data/cifar10", "data.eval_batch_size": "512",
            "model.arch": arch, "model.L": "4", "model.lam_init": "8.0", "model.grad": "nq",
            "noise.mode": mode, "noise.delta": delta, "noise.tau": "4",
            "noise.residual": "end_to_end", "noise.scale": "1.0", "noise.calib_augment": "true",
            "calib.n_images": "512", "calib.class_counts": counts,
            "train.epochs": str(N_EPOCHS), "train.lr": "0.1", "train.seed": str(seed),
            "train.threads": str(1 + seed % 2), "eval.T": ",".join(map(str, TS)),
            "eval.select_T": "4", "eval.select_on": "val", **extra}


def _metrics(mode, final, delta="0.0", ann_noisy=None, select_on="val"):
    """Per-epoch (step = epoch) and final (step 0) metrics under the writer's names."""
    ann, *snn = final
    metrics = []
    for ep in range(1, N_EPOCHS + 1):
        calib = 2.0 if mode == "layerwise" else 0.0
        vals = {"train/loss": 2.0 / ep, "train/acc": 50.0 + ep, "train/lr": 0.1 / ep,
                "ann/val_acc": ann - 3 + ep, "ann/test_acc": ann - 3 + ep,
                "time/train_s": 9.0, "time/calib_s": calib, "time/eval_s": 1.0,
                "time/epoch_s": 10.0 + calib}
        for t, v in zip(TS, snn):
            if t <= 4:
                vals[f"snn/{select_on}_acc_T{t:02d}"] = v - 3 + ep
        if ann_noisy is not None:
            vals["ann/noisy_test_acc"] = ann_noisy - 3 + ep
        for layer, name in enumerate(LAYERS):
            d = 0.0 if mode == "qcfs" else float(delta) if mode == "fixed" else (
                0.0 if ep == 1 else 0.1 * (layer + 1) / ep)
            vals[f"delta/l{layer:02d}_{name}"] = d
            vals[f"delta_next/l{layer:02d}_{name}"] = d * 1.1
            vals[f"residual/std/l{layer:02d}_{name}"] = 0.3 + 0.05 * layer
            vals[f"residual/mean/l{layer:02d}_{name}"] = 0.01
        metrics += [Metric(k, float(v), 1000 + ep, ep) for k, v in vals.items()]
    metrics += [Metric(f"final/snn_test_acc_T{t:02d}", v, 2000, 0) for t, v in zip(TS, snn)]
    metrics += [Metric("final/snn_test_acc_by_T", v, 2000, t) for t, v in zip(TS, snn)]
    metrics += [Metric("final/ann_test_acc", ann, 2000, 0),
                Metric("final/ann_val_acc", ann - 0.5, 2000, 0),
                Metric("final/best_epoch", 3.0, 2000, 0)]
    if ann_noisy is not None:
        metrics.append(Metric("final/ann_noisy_test_acc", ann_noisy, 2000, 0))
    return metrics


ANN_UJ = {"resnet20": 50.0, "vgg16": 300.0}


def energy_ratio(seed: int, t: int) -> float:
    """The toy SNN energy at T = t as a fraction of the ANN's (harness.energy's ratio)."""
    return 0.05 * t * (1 + 0.1 * seed)


def _energy_metrics(arch: str, seed: int) -> list:
    """The `energy/*` metrics tracking.energy_metrics writes (the ones the report reads)."""
    a = ANN_UJ[arch]
    out = [Metric("energy/ann_uJ", a, 2000, 0)]
    for t in TS:
        r = energy_ratio(seed, t)
        out += [Metric(f"energy/uJ_T{t:02d}", a * r, 2000, 0),
                Metric(f"energy/ratio_to_ann_T{t:02d}", r, 2000, 0),
                Metric("energy/uJ_by_T", a * r, 2000, t)]
    return out


NO_ENERGY = ("vgg16", "qcfs", 1)   # this trial recorded no energy (an older harness)


def _log_trial(client, exp_id, parent_id, *, arch, mode, seed, final, delta="0.0",
               status="FINISHED", hist_artifact=True, tmp_path=None, params=None,
               ann_noisy=None, name=None, energy=None):
    name = name or f"{arch}_{mode}_d{delta}_s{seed}"
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.trial": name,
        "harness.method": METHOD[mode]})
    rid = run.info.run_id
    params = {**_params(arch, mode, seed, delta), **(params or {})}
    metrics = _metrics(mode, final, delta, ann_noisy, params["eval.select_on"])
    if energy if energy is not None else (arch, mode, seed) != NO_ENERGY:
        metrics += _energy_metrics(arch, seed)
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("mlflow.runName", name)])
    if hist_artifact:
        d = tmp_path / "art" / rid
        d.mkdir(parents=True)
        edges = [-1.0 + 0.25 * i for i in range(9)]
        hist = {"layers": [f"layer{i}" for i in range(N_LAYERS)], "edges": edges,
                "counts": [[1, 2, 5, 9, 9, 5, 2, 1]] * N_LAYERS, "mean": [0.01, -0.02, 0.0],
                "std": [0.3, 0.35, 0.4], "residual": "end_to_end", "tau": 4}
        (d / "residual_hist.json").write_text(json.dumps(hist))
        client.log_artifact(rid, str(d / "residual_hist.json"))
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    art = (tmp_path / "artifacts").as_uri()

    exp_id = client.create_experiment(EXP, artifact_location=art + "/main")
    parent = client.create_run(exp_id, tags={"harness.role": "parent",
                                             "harness.hardware": "2x test CPU"})
    pid = parent.info.run_id
    for (arch, mode), seeds in FINAL.items():
        for seed, final in seeds.items():
            _log_trial(client, exp_id, pid, arch=arch, mode=mode, seed=seed, final=final,
                       tmp_path=tmp_path)
    # a failed trial with absurd numbers: must be ignored
    _log_trial(client, exp_id, pid, arch="vgg16", mode="layerwise", seed=7,
               final=(99.9,) * 5, status="FAILED", hist_artifact=False, tmp_path=tmp_path)
    client.set_terminated(pid)

    abl_id = client.create_experiment(ABL, artifact_location=art + "/abl")
    ppid = client.create_run(abl_id, tags={"harness.role": "parent"}).info.run_id
    for delta, final in (("0.1", (88.0, 40.0, 55.0, 75.0, 85.0)),
                         ("0.2", (87.0, 45.0, 60.0, 78.0, 84.0))):
        _log_trial(client, abl_id, ppid, arch="resnet20", mode="fixed", seed=0, final=final,
                   delta=delta, hist_artifact=False, tmp_path=tmp_path)
    client.set_terminated(ppid)

    empty_id = client.create_experiment(EMPTY, artifact_location=art + "/empty")
    epid = client.create_run(empty_id, tags={"harness.role": "parent"}).info.run_id
    _log_trial(client, empty_id, epid, arch="vgg16", mode="qcfs", seed=0, final=(1.0,) * 5,
               status="FAILED", hist_artifact=False, tmp_path=tmp_path)
    return uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "toy"
    rc = main(["--experiment", EXP, "--tracking-uri", store, "--out", str(out), "--per-trial"])
    assert rc == 0
    return out


def _md_rows(md: str) -> dict[tuple[str, str], list[str]]:
    """(arch, method) -> value cells of a to_markdown table (first table in md)."""
    rows, header = {}, None
    for line in md.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        rows[(cells[0], cells[1])] = cells[2:]
    return header, rows


def _block(md: str, heading: str) -> str:
    part = md.split(f"## {heading}\n", 1)[1]
    return part.split("\n## ", 1)[0]


# ---------------------------------------------------------------------------- table 1
def test_table1_md_values_bold_and_delta(report):
    md = (report / "table1.md").read_text()
    header, rows = _md_rows(_block(md, "CIFAR-10"))
    assert header == ["Arch", "Method", "ANN", "T=1", "T=2", "T=4", "T=8"]
    B = lambda s: f"**{s}**"  # noqa: E731
    assert rows[("ResNet-20", "QCFS")] == [
        B("90.50 ± 0.71 (n=2)"), "51.00 ± 1.41 (n=2)", "61.00 ± 1.41 (n=2)",
        "81.00 ± 1.41 (n=2)", B("90.00 ± 0.71 (n=2)")]
    assert rows[("ResNet-20", "NQ")] == [
        "89.25 ± 0.35 (n=2)", B("56.00 ± 1.41 (n=2)"), B("66.50 ± 0.71 (n=2)"),
        B("84.50 ± 0.71 (n=2)"), "89.50 ± 0.71 (n=2)"]
    assert rows[("ResNet-20", "Δ NQ − QCFS")] == [
        "-1.25 ± 0.35 (n=2)", "+5.00 ± 0.00 (n=2)", "+5.50 ± 0.71 (n=2)",
        "+3.50 ± 0.71 (n=2)", "-0.50 ± 0.00 (n=2)"]
    assert rows[("VGG-16", "QCFS")] == [
        B("93.00 ± 0.00 (n=2)"), "71.00 ± 1.41 (n=2)", "81.00 ± 1.41 (n=2)",
        "90.00 ± 0.00 (n=2)", B("92.00 ± 0.00 (n=2)")]
    assert rows[("VGG-16", "NQ")] == [
        "92.00 ± 0.00 (n=2)", B("75.00 ± 0.00 (n=2)"), B("85.00 ± 0.00 (n=2)"),
        B("91.00 ± 0.00 (n=2)"), B("92.00 ± 0.00 (n=2)")]   # tie at T=8: both bold
    assert rows[("VGG-16", "Δ NQ − QCFS")] == [
        "-1.00 ± 0.00 (n=2)", "+4.00 ± 1.41 (n=2)", "+4.00 ± 1.41 (n=2)",
        "+1.00 ± 0.00 (n=2)", "+0.00 ± 0.00 (n=2)"]
    # published rows: present, plain values, never bold although e.g. 91.77 > 90.50
    assert rows[("ResNet-20", "QCFS (published)")] == ["91.77", "62.43", "73.20", "83.75", "89.55"]
    assert rows[("VGG-16", "NQ (published)")] == ["95.21", "88.46", "91.93", "94.80", "95.48"]
    assert not any("**" in c for k, v in rows.items() if "published" in k[1] for c in v)
    # the failed run (99.9) is not reported
    assert "99.9" not in md
    # order within an arch: measured, Δ, published
    keys = [k for k in rows if k[0] == "ResNet-20"]
    assert keys[:3] == [("ResNet-20", "QCFS"), ("ResNet-20", "NQ"), ("ResNet-20", "Δ NQ − QCFS")]
    assert all("published" in k[1] for k in keys[3:]) and keys[3:]


def _tabulars(tex: str) -> list[str]:
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1
    return top_tabulars(tex)


def _check_tabular(tab: str) -> int:
    return check_tabular(tab)


def test_table1_tex_is_a_booktabs_table(report):
    tex = (report / "table1.tex").read_text()
    tabs = _tabulars(tex)
    assert len(tabs) == 1                       # one dataset
    n = _check_tabular(tabs[0])
    # ANN and T = 1 … 8 do not fit \textwidth side by side: two panels (ANN, T=1, T=2 |
    # T=4, T=8), each: header + (2 measured + 2 published) x 2 archs; Δ rows: table1_delta
    assert n == 2 * (1 + 2 * 2 + 2 * 2)
    assert r"\bfseries 90.50 \pm 0.71" in tex
    assert "±" not in tex and "Δ" not in tex and "−" not in tex
    assert r"\bfseries 91.77" not in tex
    delta = (report / "table1_delta.tex").read_text()
    (dtab,) = _tabulars(delta)
    assert _check_tabular(dtab) == 1 + 2 * 5          # header + 5 columns x 2 archs
    assert r"NQ $-$ QCFS" in delta and r"{$\Delta$}" in dtab
    assert r"-1.25 \pm 0.35" in dtab and "n too small" in dtab
    for t in _tabulars((report / "table2.tex").read_text()):
        _check_tabular(t)
    assert (report / "preamble.tex").read_text() == latex.preamble_tex()


@needs_tex
def test_report_tex_compiles(report, stats_report):
    for out in (report, stats_report):
        pre = (out / "preamble.tex").read_text()
        for name in ("table1.tex", "table1_delta.tex", "table2.tex"):
            res = latex.compile_table((out / name).read_text(), pre)
            assert res.ok, (out.name, name, res.errors, res.overfull)


def test_table2_md(report):
    md = (report / "table2.md").read_text()
    header, rows = _md_rows(_block(md, "CIFAR-10"))
    assert header[:2] == ["Arch", "Method"]
    # ResNet-20 NQ: ANN 89.25, best at T<=4 is T=4 (84.50); T=8 89.50 >= 88.25 -> T=8
    assert header[-2] == tables.ENERGY_COLUMN      # next to the T it is measured at
    # energy at the best T (4) in % of the ANN: seeds 0 and 1 -> 20 and 22 %
    e = [100 * energy_ratio(s, 4) for s in (0, 1)]
    e_cell = f"{sum(e) / 2:.2f} ± {pd.Series(e).std():.2f} (n=2)"
    assert rows[("ResNet-20", "NQ")] == ["89.25 ± 0.35 (n=2)", "84.50 ± 0.71 (n=2)", "T=4",
                                         e_cell, "T=8"]
    # VGG-16 QCFS: ANN 93.00, T=8 92.00 >= 92.00 -> T=8; seed 1 recorded no energy: n = 1
    assert rows[("VGG-16", "QCFS")][2:] == ["T=4", f"{100 * energy_ratio(0, 4):.2f} (n=1)", "T=8"]
    # published ResNet-20 QCFS: no T <= 64 within 1 point of 91.77? T32=92.24 -> T=16 (91.62)
    assert rows[("ResNet-20", "QCFS (published)")][1:] == ["83.75", "T=4", "—", "T=16"]
    assert "TEBN" in md                         # other published methods (Table 2 of the paper)
    assert "1 of 8 runs recorded no energy" in md
    from harness.energy import E_AC_PJ, E_MAC_PJ    # the note states the constants in use
    assert (tables.E_AC_PJ, tables.E_MAC_PJ) == (E_AC_PJ, E_MAC_PJ)
    assert f"{E_AC_PJ:g} pJ per synaptic operation, {E_MAC_PJ:g} pJ per MAC" in md
    tex = (report / "table2.tex").read_text()
    assert r"21.00 \pm 1.41 & 8" in tex and "20.00 & 8" in tex    # the energy column
    assert "energy value without" in tex


# ---------------------------------------------------------------------------- figures
def test_figures_and_index(report):
    names = {p.name for p in report.iterdir()}
    must = ["acc_vs_T_cifar10.png", "epoch_time.png"]
    for m in must:
        assert m in names
    for prefix, count in (("curves_", 8), ("residual_hist_", 8), ("delta_heatmap_", 4)):
        got = [n for n in names if n.startswith(prefix) and n.endswith(".png")]
        assert len(got) == count, (prefix, sorted(got))   # heatmaps: NQ only (QCFS δ ≡ 0)
    pngs = [p for p in report.iterdir() if p.suffix == ".png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    for p in pngs:                                 # every figure also as PDF
        pdf = p.with_suffix(".pdf")
        assert pdf.read_bytes()[:5] == b"%PDF-", p.name
    assert "ablation_delta.png" not in names
    index = (report / "index.md").read_text()
    for p in pngs:
        assert f"({p.name})" in index
    for t in ("table1.md", "table1.tex", "table2.md", "table2.tex"):
        assert f"({t})" in index
    assert "**90.50 ± 0.71 (n=2)**" in index              # Table 1 inline
    assert "2x test CPU" in index and f"`{EXP}`" in index
    assert "Epochs: 3" in index and "TEST set" not in index
    assert "8 finished trial runs" in index


def test_default_figures_are_per_group(store, tmp_path):
    out = tmp_path / "default"
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    # no per-trial figure without --per-trial: one figure per dataset (or for all of them)
    assert names == ["acc_vs_T_cifar10.png", "acc_vs_energy_cifar10.png",
                     "delta_heatmaps_cifar10.png", "epoch_time.png",
                     "residual_overlay_cifar10.png", "selection_cifar10.png"]
    assert all((out / n).with_suffix(".pdf").exists() for n in names)
    index = (out / "index.md").read_text()
    assert "`harness report --per-trial`" in index and "curves_" not in index
    for n in names:
        assert f"[{n}]({n}) ([PDF]({n[:-4]}.pdf))" in index
    assert "epoch 1 is left out" in index and "QCFS only measures the residual" in index
    assert "ANN validation accuracy (`ann/val_acc`) would have selected" in index


def test_figures_in_parallel_equal_serial(store, report, tmp_path):
    """`--jobs 2` (forked workers) and `--jobs 1` (this process) draw the same figures,
    pixel for pixel, and write the same files."""
    serial = tmp_path / "serial"
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out", str(serial),
                 "--per-trial", "--jobs", "1", "--no-attach"]) == 0
    par = tmp_path / "parallel"
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out", str(par),
                 "--per-trial", "--jobs", "2", "--no-attach"]) == 0
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in par.iterdir())
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) > 20
    for n in pngs:
        assert (serial / n).read_bytes() == (par / n).read_bytes(), n
    assert (serial / "index.md").read_text() == (par / "index.md").read_text()


def test_collect_hands_over_the_runs_before_the_histories(store):
    """on_runs sees the runs before the metric histories are read (the report starts its
    tables and run-level figures then); progress is called while they are read."""
    import importlib

    collect_mod = importlib.import_module("harness.report.collect")
    seen, ticks = [], []
    for bulk in (True, False):
        col = collect_mod.collect(EXP, store, bulk=bulk,
                                  on_runs=lambda c: seen.append((len(c.runs), len(c.histories))),
                                  progress=lambda: ticks.append(bulk))
        assert seen[-1] == (8, 0) and len(col.histories) == 8
        assert ticks.count(bulk) >= 1

def _boom(path):
    raise ValueError(f"cannot draw {path}")


def test_fork_jobs_results_errors_and_isolation(tmp_path):
    """Jobs in forked children: results in the jobs' order (not their finishing order),
    the first error reaches the caller with the others stopped, and a child's changes to
    its memory never reach the parent or the next job."""
    import time

    from harness.report.cli import ReportError, _ForkJobs

    state = {"x": 0}

    def bump(k, pause):
        time.sleep(pause)
        state["x"] += k
        return state["x"]
    for workers in (1, 3):
        jobs = _ForkJobs([(bump, (k, 0.05 * (5 - k)), {}) for k in range(5)], workers)
        try:
            jobs.start()
            got = jobs.result()
        finally:
            jobs.close()
        if workers == 1:                        # in this process: the state accumulates
            assert got == [0, 1, 3, 6, 10] and state["x"] == 10
            state["x"] = 0
        else:                                   # each child starts from the parent's state
            assert got == [0, 1, 2, 3, 4] and state["x"] == 0
    for workers in (1, 2):
        slow = tmp_path / f"slow{workers}"
        jobs = _ForkJobs([(_boom, (tmp_path / "b",), {}),
                          (lambda p: (time.sleep(3), p.write_text("x")), (slow,), {})], workers)
        try:
            jobs.start()
            with pytest.raises(ValueError, match="cannot draw"):
                jobs.result()
        finally:
            jobs.close()
        assert not jobs.running
    time.sleep(0.2)
    assert not (tmp_path / "slow2").exists()    # stopped when the other job failed
    # a child that dies without a result is named
    jobs = _ForkJobs([(os._exit, (3,), {}), (bump, (1, 0), {})], 2)
    try:
        with pytest.raises(ReportError, match=r"_exit.*exit status 3"):
            jobs.result()
    finally:
        jobs.close()


def test_report_is_attached_to_the_parent_run(store, tmp_path):
    """The tables and index.md become artifacts report/<file> of the parent run,
    byte for byte (read back through MLflow); --no-attach leaves them as they were."""
    report = tmp_path / "attached"
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out", str(report),
                 "--format", "md,tex"]) == 0
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out",
                 str(tmp_path / "not_attached"), "--no-attach"]) == 0
    c = MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name(EXP)
    parent = [r for r in c.search_runs([exp.experiment_id])
              if r.data.tags.get("harness.role") == "parent"][0]
    listed = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    want = {"report/" + n for n in ("table1.md", "table2.md", "table1.tex", "table2.tex",
                                    "table1_delta.tex", "preamble.tex", "index.md")}
    assert listed == want
    local = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                artifact_path="report/index.md",
                                                tracking_uri=store)
    assert open(local).read() == (report / "index.md").read_text()


def test_figure_data_epoch_time_and_selection(stats_store):
    import importlib

    from harness.report import figures

    collect_mod = importlib.import_module("harness.report.collect")   # not the function
    uri, _, _ = stats_store
    col = collect_mod.collect(STATS, uri)
    et = figures.epoch_time_table(col.runs, col.histories)
    # epochs 2 and 3 only (epoch 1 is the warm-up): train 9 s, calib 2 s (NQ) / 0 (QCFS)
    assert set(et["n_epochs"]) == {N_EPOCHS - 1}
    assert (et["train"] == 9.0).all() and (et["eval"] == 1.0).all()
    assert set(et.loc[et["method"] == "NQ", "calib"]) == {2.0}
    assert set(et.loc[et["method"] == "QCFS", "calib"]) == {0.0}
    sel = figures.selection_table(col.runs, col.histories)
    # ann/val_acc rises every epoch: the ANN criterion picks the last epoch, as the SNN one
    assert (sel["epoch_ann"] == N_EPOCHS).all() and (sel["epoch_snn"] == 3).all()
    # selection on test (this sweep): the per-epoch SNN test accuracy is logged, so the
    # SNN test accuracy of the ANN-selected epoch is known
    assert sel["snn_test_at_ann"].notna().all()
    assert set(sel["sel_key"]) == {"snn/test_acc_T04"}


def test_ablation_delta(store, tmp_path):
    out = tmp_path / "abl"
    assert main(["--experiment", ABL, "--tracking-uri", store, "--out", str(out)]) == 0
    assert (out / "ablation_delta.png").stat().st_size > 1000
    assert not (out / "ablation_tau.png").exists()
    header, rows = _md_rows(_block((out / "table1.md").read_text(), "CIFAR-10"))
    assert header[:3] == ["Arch", "Method", "δ"]          # δ varies -> extra key column
    assert "(ablation_delta.png)" in (out / "index.md").read_text()


def test_format_subset(store, tmp_path):
    out = tmp_path / "mdonly"
    assert main(["--experiment", ABL, "--tracking-uri", store, "--out", str(out),
                 "--format", "md"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "table1.md", "table2.md"]


def test_discussion_survives_regeneration(store, tmp_path):
    out = tmp_path / "disc"
    out.mkdir()
    (out / "discussion.md").write_text("NQ trails QCFS at T=8, as the paper reports.\n")
    for _ in range(2):
        assert main(["--experiment", ABL, "--tracking-uri", store, "--out", str(out), "--format", "md"]) == 0
    index = (out / "index.md").read_text()
    assert index.count("## Discussion\n\nNQ trails QCFS at T=8, as the paper reports.") == 1


# ---------------------------------------------------------------------------- errors
def test_unknown_experiment(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", "nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == f"report error: no experiment 'nope' (existing: {ABL}, {EMPTY}, {EXP})"
    assert not (tmp_path / "reports").exists()


def test_no_finished_runs(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", EMPTY, "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"report error: experiment '{EMPTY}' has no finished trial runs"
    assert not (tmp_path / "reports").exists()


def test_default_store_missing_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", EXP]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- pure tables
def _frame(records):
    base = {"dataset": "CIFAR-10", "dataset_key": "cifar10", "L": "4", "delta": "—", "tau": "—",
            "scale": "—", "lam_init": "8", "epochs": "3", "residual": "—"}
    return pd.DataFrame([{**base, **r} for r in records])


def test_stat_formatting():
    assert tables.fmt_stat(tables.stat_of([90.0, 91.0])) == "90.50 ± 0.71 (n=2)"
    assert tables.fmt_stat(tables.stat_of([90.0, 91.0]), "tex") == r"90.50 $\pm$ 0.71"
    assert tables.fmt_stat(tables.stat_of([91.234])) == "91.23"
    assert tables.fmt_stat(tables.stat_of([1.0]), signed=True) == "+1.00"
    assert tables.fmt_stat(None) == "—"
    assert tables.latex_escape("a_b 5% ±") == r"a\_b 5\% $\pm$"


def test_table1_on_frame_varying_L_and_single_seed():
    runs = _frame([
        {"arch": "resnet20", "method": "QCFS", "seed": "0", "L": "4", "ann": 90.0, "T1": 50.0},
        {"arch": "resnet20", "method": "NQ", "seed": "0", "L": "4", "ann": 89.0, "T1": 55.0},
        {"arch": "resnet20", "method": "QCFS", "seed": "0", "L": "8", "ann": 91.0, "T1": 30.0},
        {"arch": "resnet20", "method": "NQ", "seed": "0", "L": "8", "ann": 90.0, "T1": 40.0},
    ])
    blocks = tables.build_table1(runs, published=None)
    assert blocks[0].setting_cols == ["L"]
    df = tables.table1_frame(blocks[0], "md")
    assert list(df.columns) == ["Arch", "Method", "L", "ANN", "T=1"]
    got = [tuple(r) for r in df.itertuples(index=False)]
    assert got == [
        ("ResNet-20", "QCFS", "4", "90.00", "50.00"),
        ("ResNet-20", "QCFS", "8", "**91.00**", "30.00"),
        ("ResNet-20", "NQ", "4", "89.00", "**55.00**"),
        ("ResNet-20", "NQ", "8", "90.00", "40.00"),
        ("ResNet-20", "Δ NQ − QCFS", "4", "-1.00", "+5.00"),   # paired within the same L
        ("", "↳ p (paired t)", "", "n too small", "n too small"),
        ("ResNet-20", "Δ NQ − QCFS", "8", "-1.00", "+10.00"),
        ("", "↳ p (paired t)", "", "n too small", "n too small"),
    ]
    tex = latex.render_table1_tex(blocks)
    assert _check_tabular(_tabulars(tex)[0]) == 5     # header + 4 measured rows
    delta = latex.render_table1_delta_tex(blocks)    # 2 Δ rows (L = 4, 8) x 2 columns
    assert _check_tabular(_tabulars(delta)[0]) == 1 + 2 * 2


# ============================================================ paired statistics, grouping,
# parent runs, protocol labels (second store: the first one's experiment list is asserted)
STATS = "toy_stats"
LR = "toy_lr"
OLD_NAMES = "toy_old_metric_names"
SEEDS5 = range(5)
# per-seed QCFS values and the NQ − QCFS differences designed for each column
_Q = {s: (90 + 0.1 * s, 50.0 + s, 60.0 + s, 80.0 + s, 89 + 0.2 * s) for s in SEEDS5}
_D = {"ANN": [0.3 - 1, -0.2 - 1, 0.1 - 1, -0.4 - 1, 0.2 - 1],     # about -1: significant
      "T=1": [5.5, 4.5, 5.2, 4.8, 5.0],                         # about +5: significant
      "T=2": [1.0, -1.0, 0.5, -0.5, 0.2],                       # about 0: not significant
      "T=4": [2.0, -1.0, 0.5, -1.5, 0.3],                       # about 0: not significant
      "T=8": [0.1] * 5}                                          # no spread: not tested
_COLS = list(_D)
OVERCLAIM = re.compile(r"\b(better|match\w*|reproduc\w*)\b", re.I)


def _nq(seed):
    q = _Q[seed]
    return tuple(v + _D[c][seed] for v, c in zip(q, _COLS))


@pytest.fixture(scope="module")
def stats_store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mlstore2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    art = (tmp_path / "artifacts").as_uri()
    exp_id = client.create_experiment(STATS, artifact_location=art + "/stats")
    # an older sweep of the same name in the same database: never mixed in by default
    old = client.create_run(exp_id, start_time=1_000_000, tags={"harness.role": "parent"})
    old_id = old.info.run_id
    for mode in ("qcfs", "layerwise"):
        _log_trial(client, exp_id, old_id, arch="resnet20", mode=mode, seed=0,
                   final=(11.11,) * 5, hist_artifact=False)
    client.set_terminated(old_id)
    new = client.create_run(exp_id, start_time=2_000_000, tags={"harness.role": "parent"})
    new_id = new.info.run_id
    proto = {"eval.select_on": "test", "model.grad": "qcfs_iclr",
             "noise.calib_augment": "false"}
    for s in SEEDS5:
        _log_trial(client, exp_id, new_id, arch="resnet20", mode="qcfs", seed=s, final=_Q[s],
                   hist_artifact=False, params=proto)
        _log_trial(client, exp_id, new_id, arch="resnet20", mode="layerwise", seed=s,
                   final=_nq(s), hist_artifact=False, params=proto, ann_noisy=80.0 + s)
    _log_trial(client, exp_id, new_id, arch="resnet20", mode="layerwise", seed=5,
               final=(99.9,) * 5, hist_artifact=False, params=proto, status="KILLED")
    _log_trial(client, exp_id, new_id, arch="resnet20", mode="qcfs", seed=5,
               final=(99.9,) * 5, hist_artifact=False, params=proto, status="RUNNING")
    client.set_terminated(new_id, status="RUNNING")

    lr_id = client.create_experiment(LR, artifact_location=art + "/lr")
    pid = client.create_run(lr_id, tags={"harness.role": "parent"}).info.run_id
    for lr, ann in (("0.1", 93.31), ("0.01", 56.27)):
        for mode in ("qcfs", "layerwise"):
            _log_trial(client, lr_id, pid, arch="resnet20", mode=mode, seed=0,
                       final=(ann - (mode == "layerwise"),) + (50.0,) * 4, hist_artifact=False,
                       params={"train.lr": lr}, name=f"{mode}_lr{lr}")
    client.set_terminated(pid)

    old_names = client.create_experiment(OLD_NAMES, artifact_location=art + "/old")
    pid = client.create_run(old_names, tags={"harness.role": "parent"}).info.run_id
    rid = client.create_run(old_names, tags={"mlflow.parentRunId": pid}).info.run_id
    client.log_batch(rid, metrics=[Metric("best_ann_test_acc", 90.0, 1, 0),
                                   Metric("snn_test_acc_T1", 50.0, 1, 0)],
                     params=[Param(k, v) for k, v in _params("vgg16", "qcfs", 0).items()])
    client.set_terminated(rid)
    client.set_terminated(pid)
    return uri, old_id, new_id


@pytest.fixture(scope="module")
def stats_report(stats_store, tmp_path_factory):
    uri, _, _ = stats_store
    out = tmp_path_factory.mktemp("report2") / "stats"
    assert main(["--experiment", STATS, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md,tex"]) == 0
    return out


def _expected(col):
    from scipy import stats as sst

    nq = [_nq(s)[_COLS.index(col)] for s in SEEDS5]
    q = [_Q[s][_COLS.index(col)] for s in SEEDS5]
    return sst.ttest_rel(nq, q), nq, q


def _table1_rows(md):
    """Table 1 of a markdown file -> list of (arch, method, cells)."""
    out = []
    for line in _block(md, "CIFAR-10").splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out.append(cells)
    return out[0], out[1:]


def test_paired_statistics_in_table1(stats_report):
    md = (stats_report / "table1.md").read_text()
    header, rows = _table1_rows(md)
    assert header == ["Arch", "Method", "ANN", "ANN (noise on)", "T=1", "T=2", "T=4", "T=8"]
    by_label = {r[1]: dict(zip(header[2:], r[2:])) for r in rows}
    delta, ci, boot = by_label["Δ NQ − QCFS"], by_label["↳ 95% CI (t)"], \
        by_label["↳ 95% CI (bootstrap)"]
    p, holm = by_label["↳ p (paired t)"], by_label["↳ p (Holm)"]
    for col in ("ANN", "T=1", "T=2", "T=4"):
        res, nq, q = _expected(col)
        lo, hi = res.confidence_interval(0.95)
        d = pd.Series(nq) - pd.Series(q)
        sig = lo > 0 or hi < 0
        assert delta[col] == f"{d.mean():+.2f} ± {d.std():.2f} (n=5)" + (" †" if sig else "")
        assert ci[col] == f"[{lo:+.2f}, {hi:+.2f}]"
        assert p[col] == ("< 0.001" if res.pvalue < 0.001 else f"{res.pvalue:.3f}")
        assert re.fullmatch(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", boot[col])
    assert delta["ANN"].endswith("†") and delta["T=1"].endswith("†")
    assert not delta["T=2"].endswith("†") and not delta["T=4"].endswith("†")
    assert p["T=8"] == "zero spread" and not delta["T=8"].endswith("†")
    assert delta["ANN (noise on)"] == "—"                   # QCFS has no noisy ANN: no pairs
    # Holm over the 4 tested columns of the row
    from harness.report.stats import holm as holm_fn
    raw = [_expected(c)[0].pvalue for c in ("ANN", "T=1", "T=2", "T=4")]
    for c, q in zip(("ANN", "T=1", "T=2", "T=4"), holm_fn(raw)):
        assert holm[c] == ("< 0.001" if q < 0.001 else f"{q:.3f}")
    # the measured NQ row: noisy ANN column, n everywhere
    assert by_label["NQ"]["ANN (noise on)"] == "82.00 ± 1.58 (n=5)"
    assert by_label["QCFS"]["ANN (noise on)"] == "—"
    assert "†" in md and "CI excludes 0" in md
    # LaTeX: the measured and published rows in table1.tex (two panels: ANN, ANN (noise
    # on), T=1 | T=2, T=4, T=8); the Δ row with its statistics in table1_delta.tex, one
    # row per column
    tex = (stats_report / "table1.tex").read_text()
    (tab,) = _tabulars(tex)
    assert _check_tabular(tab) == 2 * (1 + 2 + 2)     # header, 2 measured, 2 published
    dtex = (stats_report / "table1_delta.tex").read_text()
    (dtab,) = _tabulars(dtex)
    assert _check_tabular(dtab) == 1 + 5              # header; ANN, T = 1, 2, 4, 8
    rows = {ln.split(" & ")[1]: ln for ln in dtab.splitlines() if ln.count(" & ") > 3
            and not ln.startswith("Arch")}
    for col in ("ANN", "T=1", "T=2", "T=4"):
        res, nq, q = _expected(col)
        lo, hi = res.confidence_interval(0.95)
        line = rows["ANN" if col == "ANN" else f"$T={col[2:]}$"]
        assert latex.tex_escape(f"[{lo:+.2f}, {hi:+.2f}]".replace("-", "−")) in line
        assert latex.tex_escape(tables.fmt_p(res.pvalue)) in line
        assert (r"$^\dagger$" in line) == (lo > 0 or hi < 0)
    assert "zero spread" in rows["$T=8$"] and "↳" not in dtex and "↳" not in tex


def test_newest_parent_by_default_and_status(stats_store, stats_report):
    _, old_id, new_id = stats_store
    index = (stats_report / "index.md").read_text()
    assert "11.11" not in index and "99.9" not in index
    assert f"parent run `{new_id}` (newest of 2" in index and f"`{old_id}`" in index
    assert "5 FINISHED" not in index
    assert "10 FINISHED, 0 FAILED, 1 KILLED, 1 RUNNING (12 in total)" in index
    missing = index.split("## Trials not reported", 1)[1].split("## Table 1", 1)[0]
    assert "`resnet20_layerwise_d0.0_s5`" in missing and "**KILLED**" in missing
    assert "`resnet20_qcfs_d0.0_s5`" in missing and "**RUNNING**" in missing
    assert "n = 5 of the 6 trials of this cell that started" in missing
    assert index.index("## Trials not reported") < index.index("## Table 1")


def test_parent_flag(stats_store, tmp_path, capsys):
    uri, old_id, new_id = stats_store
    out = tmp_path / "old"
    assert main(["--experiment", STATS, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md", "--parent", old_id]) == 0
    index = (out / "index.md").read_text()
    assert "11.11" in index and f"parent run `{old_id}` (selected with `--parent`" in index
    assert "2 FINISHED, 0 FAILED, 0 KILLED, 0 RUNNING (2 in total)" in index
    assert main(["--experiment", STATS, "--tracking-uri", uri, "--out", str(tmp_path / "x"),
                 "--parent", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"report error: no parent run 'nope' in experiment '{STATS}' "
                   f"(parent runs, newest first: {new_id}, {old_id})")
    assert not (tmp_path / "x").exists()


def test_old_metric_names_are_refused(stats_store, tmp_path, capsys):
    uri, _, _ = stats_store
    assert main(["--experiment", OLD_NAMES, "--tracking-uri", uri,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no final/ metrics" in err
    assert not (tmp_path / "o").exists()


def test_parent_table_and_select_parent():
    from harness.report.collect import ReportError, parent_table, select_parent

    t = pd.Timestamp
    raw = pd.DataFrame([
        {"run_id": "P1", "start_time": t("2025-01-01", tz="UTC"), "tags.harness.role": "parent"},
        {"run_id": "P2", "start_time": t("2025-02-01", tz="UTC"), "tags.harness.role": "parent"},
        {"run_id": "c1", "start_time": t("2025-01-02", tz="UTC"), "tags.harness.role": "trial",
         "tags.mlflow.parentRunId": "P1"},
        {"run_id": "c2", "start_time": t("2025-02-02", tz="UTC"), "tags.harness.role": "trial",
         "tags.mlflow.parentRunId": "P2"},
        {"run_id": "c3", "start_time": t("2025-02-03", tz="UTC"), "tags.harness.role": "trial",
         "tags.mlflow.parentRunId": "P2"},
        # a child whose parent run is not in the experiment: dated by its first child
        {"run_id": "c4", "start_time": t("2024-12-01", tz="UTC"), "tags.harness.role": "trial",
         "tags.mlflow.parentRunId": "P0"},
    ])
    par = parent_table(raw)
    assert list(par["run_id"]) == ["P2", "P1", "P0"]
    assert list(par["n_trials"]) == [2, 1, 1]
    assert select_parent(par, None, "e") == "P2"
    assert select_parent(par, "P1", "e") == "P1"
    with pytest.raises(ReportError, match=r"^report error: no parent run 'X' in experiment 'e' "
                                          r"\(parent runs, newest first: P2, P1, P0\)$"):
        select_parent(par, "X", "e")


def _raw_runs(records):
    base = {"status": "FINISHED", "tags.mlflow.parentRunId": "P", "params.data.name": "cifar10",
            "params.data.root": "/data", "params.model.arch": "resnet20", "params.model.L": "4",
            "params.train.threads": "2", "params.noise.tau": "4", "params.train.lr": "0.1"}
    out = []
    for i, r in enumerate(records):
        rec = {**base, "run_id": f"r{i}", **r}
        rec["params.train.threads"] = str(i)                # varies, but never a row key
        rec["params.calib.class_counts"] = f"{i},5,5"       # drawn per seed: never a row key
        out.append(rec)
    return pd.DataFrame(out)


def test_every_varying_setting_is_a_row_key():
    from harness.report.collect import tidy_runs

    def run(mode, lr, ann, seed="0", tau="4"):
        return {"params.noise.mode": mode, "params.train.lr": lr, "params.train.seed": seed,
                "params.noise.tau": tau, "metrics.final/ann_test_acc": ann,
                "metrics.final/snn_test_acc_T01": ann - 40}

    runs = tidy_runs(_raw_runs([run("qcfs", "0.1", 93.31), run("qcfs", "0.01", 56.27),
                                run("layerwise", "0.1", 92.0), run("layerwise", "0.01", 55.0)]))
    assert tables.varying_settings(runs) == ["train.lr"]
    (block,) = tables.build_table1(runs, published=None)
    df = tables.table1_frame(block, "md")
    assert list(df.columns) == ["Arch", "Method", "train.lr", "ANN", "T=1"]
    got = [tuple(r)[:4] for r in df.itertuples(index=False)]
    assert got == [
        ("ResNet-20", "QCFS", "0.01", "56.27"), ("ResNet-20", "QCFS", "0.1", "**93.31**"),
        ("ResNet-20", "NQ", "0.01", "55.00"), ("ResNet-20", "NQ", "0.1", "92.00"),
        ("ResNet-20", "Δ NQ − QCFS", "0.01", "-1.27"), ("", "↳ p (paired t)", "", "n too small"),
        ("ResNet-20", "Δ NQ − QCFS", "0.1", "-1.31"), ("", "↳ p (paired t)", "", "n too small"),
    ]
    assert "74.79" not in tables.render_table1_md([block])
    # an NQ-only setting (noise.tau) splits NQ rows but not QCFS ones; QCFS runs of one
    # seed that differ only in it (a grid crossing mode x tau) are averaged per seed
    runs = tidy_runs(_raw_runs([run("qcfs", "0.1", 90.0, tau="4"), run("qcfs", "0.1", 90.2, tau="8"),
                                run("layerwise", "0.1", 89.0, tau="4"),
                                run("layerwise", "0.1", 88.0, tau="8")]))
    assert tables.varying_settings(runs) == ["tau"]
    (block,) = tables.build_table1(runs, published=None)
    rows = [(r.method, r.settings, r.cells["ANN"]) for r in block.rows]
    assert rows[0][:2] == ("QCFS", {"tau": "—"}) and rows[0][2].n == 1
    assert rows[0][2].mean == pytest.approx(90.1)
    assert [r[1]["tau"] for r in rows if r[0] == "NQ"] == ["4", "8"]
    assert [round(r[2].mean, 2) for r in rows if r[0] == "Δ NQ − QCFS"] == [-1.1, -2.1]
    assert any("averaged per seed" in n for n in block.notes)


def test_unpaired_seeds_are_named():
    runs = _frame([
        {"arch": "resnet20", "method": "QCFS", "seed": "0", "ann": 90.0, "T1": 50.0},
        {"arch": "resnet20", "method": "QCFS", "seed": "1", "ann": 91.0, "T1": 51.0},
        {"arch": "resnet20", "method": "NQ", "seed": "0", "ann": 89.0, "T1": 55.0},
        {"arch": "resnet20", "method": "NQ", "seed": "1", "ann": 89.5, "T1": 57.0},
        {"arch": "resnet20", "method": "NQ", "seed": "2", "ann": 88.0, "T1": 56.0},
    ])
    (block,) = tables.build_table1(runs, published=None)
    (delta,) = [r for r in block.rows if r.kind == "delta"]
    assert delta.cells["T=1"].n == 2 and delta.cells["T=1"].mean == pytest.approx(5.5)
    assert [r.cells["T=1"].n for r in block.rows if r.kind == "measured"] == [2, 3]
    assert block.notes == ["Δ ResNet-20: 2 seed pairs; unpaired seeds left out of the Δ: "
                           "NQ 2; QCFS none."]
    assert "Note: Δ ResNet-20: 2 seed pairs" in tables.render_table1_md([block])


def test_lr_sweep_end_to_end(stats_store, tmp_path):
    uri, _, _ = stats_store
    out = tmp_path / "lr"
    assert main(["--experiment", LR, "--tracking-uri", uri, "--out", str(out),
                 "--format", "md"]) == 0
    header, rows = _table1_rows((out / "table1.md").read_text())
    assert header[:4] == ["Arch", "Method", "train.lr", "ANN"]
    assert [r[:4] for r in rows if r[1] == "QCFS"] == [
        ["ResNet-20", "QCFS", "0.01", "56.27"], ["ResNet-20", "QCFS", "0.1", "**93.31**"]]
    assert "74.79" not in (out / "table1.md").read_text()
    assert "`train.lr`" in (out / "index.md").read_text()


def test_protocol_differences_labelled(stats_report):
    for name in ("table1.md", "table2.md"):
        md = (stats_report / name).read_text()
        line = _block(md, "CIFAR-10").strip().splitlines()[0]
        assert line.startswith("Protocol differences from the paper: ")
        for part in ("3 epochs (paper: 400)", "gradient formulation qcfs_iclr (paper: nq)",
                     "NQ calibration images not augmented (NQ official code: augmented)",
                     "ANN column with noise off (NQ official code: noise on; noise-on ANN "
                     "accuracy in the “ANN (noise on)” column of Table 1)"):
            assert part in line, (name, part)
        assert "checkpoint selected" not in line      # selected on test, as in the paper
    for name in ("table1.tex", "table1_delta.tex", "table2.tex"):
        tex = (stats_report / name).read_text()
        for tab in _tabulars(tex):
            _check_tabular(tab)
        cap = re.search(r"\\caption\{(.*?)\}\n", tex, flags=re.S).group(1)
        assert "Protocol differences from the paper: 3 epochs (paper: 400)" in cap
        assert "“" not in tex and "↳" not in tex
    index = (stats_report / "index.md").read_text()
    proto = index.split("## Protocol", 1)[1].split("\n## ", 1)[0]
    assert "Epochs: 3 — **differs from the paper** (400)" in proto
    assert "TEST set" in proto and "as in the paper (test set)" in proto
    assert "Gradient formulation (`model.grad`): qcfs_iclr — **differs from the paper** (nq)" \
        in proto
    assert "not augmented — **differs from the NQ official code** (augmented)" in proto
    assert "512 images (`calib.n_images`)" in proto and "class counts differ" in proto
    assert "ANN column: noise off" in proto
    assert "Never row keys: `train.seed`" in proto


def test_generated_prose_never_overclaims(stats_report, report):
    for out in (stats_report, report):
        index = (out / "index.md").read_text()
        generated = index.split("## Discussion", 1)[0]
        for text in [generated] + [(out / n).read_text() for n in ("table1.md", "table2.md")]:
            assert not OVERCLAIM.search(text), OVERCLAIM.search(text).group(0)
            for clause in re.split(r"[.;]\s|\n", text):
                if re.search(r"not significant|not tested|n too small", clause):
                    assert not OVERCLAIM.search(clause), clause
    index = (stats_report / "index.md").read_text()
    prose = index.split("(generated)", 1)[1].split("\n## ", 1)[0]
    (bullet,) = [ln for ln in prose.splitlines() if ln.startswith("- ")]
    assert "Significant at 95% (t-based CI excludes 0): ANN -1.00" in bullet
    assert "T=1 +5.00" in bullet and "Not significant: T=2 +0.04 (p = " in bullet
    assert "n = 5)" in bullet and "Not tested (all per-seed differences are equal" in bullet
    sig = bullet.split("Not significant")[0]
    assert "T=2" not in sig and "T=4" not in sig
    index2 = (report / "index.md").read_text()
    assert "Not tested (n too small, fewer than 3 seed pairs), so no difference is claimed" \
        in index2
    bullets2 = [ln for ln in index2.split("(generated)", 1)[1].split("\n## ", 1)[0].splitlines()
                if ln.startswith("- ")]
    assert len(bullets2) == 2 and not any("ignificant" in b for b in bullets2)


def test_discussion_overclaim_is_flagged(store, tmp_path):
    out = tmp_path / "claim"
    out.mkdir()
    (out / "discussion.md").write_text("NQ matches the paper and is better at T=1.\n")
    assert main(["--experiment", EXP, "--tracking-uri", store, "--out", str(out),
                 "--format", "md"]) == 0
    index = (out / "index.md").read_text()
    assert "_Caution: the discussion uses “better…”, “match…” but no NQ − QCFS difference" \
        in index
    assert "_Hand-written (`discussion.md`)" in index


def test_per_seed_appendix(stats_report, report):
    index = (stats_report / "index.md").read_text()
    app = index.split("## Appendix: per-seed values", 1)[1]
    trials = app.split("### CIFAR-10: every finished trial", 1)[1].split("###", 1)[0]
    lines = [ln for ln in trials.splitlines() if ln.startswith("| ResNet-20")]
    assert len(lines) == 10
    assert any("| NQ " in ln and "| 4 " in ln and f"{_nq(4)[1]:.2f}" in ln for ln in lines)
    deltas = app.split("### CIFAR-10: Δ NQ − QCFS per seed", 1)[1]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in deltas.splitlines()
            if ln.startswith("| ResNet-20")]
    assert [r[1] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r[3] for r in rows] == [f"{v:+.2f}" for v in _D["T=1"]]   # Seed, ANN, T=1 (no Δ of the noisy ANN)
    app2 = (report / "index.md").read_text().split("## Appendix: per-seed values", 1)[1]
    trials2, deltas2 = app2.split("### CIFAR-10: Δ NQ − QCFS per seed", 1)
    assert trials2.count("| VGG-16") == 4 and trials2.count("| ResNet-20") == 4
    assert "vgg16_layerwise_d0.0_s7" not in trials2                   # FAILED: not a row
    assert "| ResNet-20 | 0      | -1.00 | +5.00 | +6.00 | +4.00 | -0.50 |" in deltas2


def test_delta_heatmap_layers_by_name(tmp_path):
    from harness.report import figures

    hist = pd.DataFrame({"delta/l00_conv1.act": [0.0, 0.1], "delta/l01_stages.0.0.act2": [0.0, 0.3],
                         "delta_next/l00_conv1.act": [0.1, 0.2]}, index=[1, 2])
    names, cols, mat = figures.delta_matrix(hist)
    assert names == ["conv1.act", "stages.0.0.act2"]
    assert cols == ["delta/l00_conv1.act", "delta/l01_stages.0.0.act2"]   # δ_trained only
    assert mat.tolist() == [[0.0, 0.1], [0.0, 0.3]]
    assert figures.delta_heatmap(hist, "t", tmp_path / "h.png").stat().st_size > 1000


def test_trials_that_never_started_are_named(tmp_path):
    import json as _json
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("planned", artifact_location=(tmp_path / "art").as_uri())
    labels = ["arch=resnet20,mode=qcfs,seed=0", "arch=resnet20,mode=layerwise,seed=0",
              "arch=resnet20,mode=qcfs,seed=1"]
    parent = client.create_run(exp, tags={"harness.role": "parent", "harness.planned_trials": _json.dumps(labels),
                                          "harness.n_planned": "3"}).info.run_id
    _log_trial(client, exp, parent, arch="resnet20", mode="qcfs", seed=0, final=FINAL[("resnet20", "qcfs")][0],
               tmp_path=tmp_path, name=labels[0])
    _log_trial(client, exp, parent, arch="resnet20", mode="layerwise", seed=0,
               final=FINAL[("resnet20", "layerwise")][0], tmp_path=tmp_path, name=labels[1], status="KILLED")
    out = tmp_path / "r"
    assert main(["--experiment", "planned", "--tracking-uri", uri, "--out", str(out), "--format", "md"]) == 0
    head = (out / "index.md").read_text().split("## Table 1")[0]
    assert f"`{labels[2]}`: **never started**" in head
    assert f"`{labels[1]}`" in head and "**KILLED**" in head
    assert f"`{labels[0]}`" not in head


def test_fig4_layerwise_reference_is_tau_equal_L():
    from harness.report import figures
    nq = pd.DataFrame({"tau": ["1", "2", "4", "8", "8"], "L": ["4"] * 5,
                       "T4": [1.0, 2.0, 3.0, 4.0, 5.0]})
    tau, ref = figures.layerwise_reference(nq)
    assert tau == "4" and list(ref["T4"]) == [3.0]          # the paper's τ = L
    tau, ref = figures.layerwise_reference(nq.drop(columns="L"))
    assert tau == "8" and list(ref["T4"]) == [4.0, 5.0]     # else the most common τ
    assert figures.layerwise_reference(nq.iloc[:0])[0] is None
