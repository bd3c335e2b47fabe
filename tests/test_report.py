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

from harness.report import tables  # noqa: E402
from harness.report.cli import main  # noqa: E402

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


def _log_trial(client, exp_id, parent_id, *, arch, mode, seed, final, delta="0.0",
               status="FINISHED", hist_artifact=True, tmp_path=None, params=None,
               ann_noisy=None, name=None):
    name = name or f"{arch}_{mode}_d{delta}_s{seed}"
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.parentRunId": parent_id, "harness.role": "trial", "harness.trial": name,
        "harness.method": METHOD[mode]})
    rid = run.info.run_id
    params = {**_params(arch, mode, seed, delta), **(params or {})}
    metrics = _metrics(mode, final, delta, ann_noisy, params["eval.select_on"])
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
    rc = main(["--experiment", EXP, "--tracking-uri", store, "--out", str(out)])
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
    return re.findall(r"\\begin\{tabular\}.*?\\end\{tabular\}", tex, flags=re.S)


def _check_tabular(tab: str) -> int:
    spec = re.match(r"\\begin\{tabular\}\{([^}]*)\}", tab).group(1)
    ncols = len(re.findall(r"[lrc]", spec))
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tab
    n_rows = 0
    for line in tab.splitlines()[1:-1]:
        line = line.strip()
        if not line or line.startswith("\\") and line.rstrip("}").endswith("rule"):
            continue
        assert line.endswith(r"\\"), line
        assert len(re.split(r"(?<!\\)&", line)) == ncols, line
        n_rows += 1
    return n_rows


def test_table1_tex_is_a_booktabs_table(report):
    tex = (report / "table1.tex").read_text()
    tabs = _tabulars(tex)
    assert len(tabs) == 1                       # one dataset
    n = _check_tabular(tabs[0])
    assert n == 1 + 2 * 3 + 2 * 2               # header + (2 measured + Δ) x 2 archs + published
    assert r"\textbf{90.50 $\pm$ 0.71}" in tex
    assert "±" not in tex and "Δ" not in tex and "−" not in tex
    assert r"$\Delta$ NQ $-$ QCFS" in tex
    assert r"$-$1.25 $\pm$ 0.35" in tex
    assert r"\textbf{91.77}" not in tex
    for t in _tabulars((report / "table2.tex").read_text()):
        _check_tabular(t)


def test_table2_md(report):
    md = (report / "table2.md").read_text()
    header, rows = _md_rows(_block(md, "CIFAR-10"))
    assert header[:2] == ["Arch", "Method"]
    # ResNet-20 NQ: ANN 89.25, best at T<=4 is T=4 (84.50); T=8 89.50 >= 88.25 -> T=8
    assert rows[("ResNet-20", "NQ")] == ["89.25 ± 0.35 (n=2)", "84.50 ± 0.71 (n=2)", "T=4", "T=8"]
    # VGG-16 QCFS: ANN 93.00, T=8 92.00 >= 92.00 -> T=8
    assert rows[("VGG-16", "QCFS")][2:] == ["T=4", "T=8"]
    # published ResNet-20 QCFS: no T <= 64 within 1 point of 91.77? T32=92.24 -> T=16 (91.62)
    assert rows[("ResNet-20", "QCFS (published)")][1:] == ["83.75", "T=4", "T=16"]
    assert "TEBN" in md                         # other published methods (Table 2 of the paper)


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
        ("ResNet-20", "Δ NQ − QCFS", "8", "-1.00", "+10.00"),
    ]
    tex = tables.render_table1_tex(blocks)
    assert _check_tabular(_tabulars(tex)[0]) == 7
