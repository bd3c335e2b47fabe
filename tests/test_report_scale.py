"""`harness report` at scale: bulk SQL reading equals the client API; per-trial figures
only on request; the report-scale benchmark builds a store that the report reads."""
from __future__ import annotations

import importlib
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# the module (harness.report exports a function of the same name)
collect_mod = importlib.import_module("harness.report.collect")
from harness.report import tables  # noqa: E402
from harness.cli import main as _harness_main  # noqa: E402


def main(argv):
    """`harness report ARGV` (the CLI is the only argv parser)."""
    return _harness_main(["report", *argv])
from test_report import FINAL, _log_trial  # noqa: E402

EXP = "scale_toy"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("scale")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXP, artifact_location=(tmp_path / "art").as_uri())
    pid = client.create_run(exp_id, tags={"harness.role": "parent"}).info.run_id
    ids = []
    for (arch, mode), seeds in FINAL.items():
        for seed, final in seeds.items():
            ids.append(_log_trial(client, exp_id, pid, arch=arch, mode=mode, seed=seed,
                                  final=final, tmp_path=tmp_path))
    # a value logged twice at one step (the later one counts) and a NaN
    client.log_batch(ids[0], metrics=[Metric("ann/test_acc", 11.0, 5000, 2),
                                      Metric("ann/test_acc", 12.0, 5001, 2),
                                      Metric("time/eval_s", float("nan"), 5000, 3)])
    client.set_terminated(pid)
    # another experiment in the same store: never read
    other = client.create_experiment("other", artifact_location=(tmp_path / "o").as_uri())
    opid = client.create_run(other, tags={"harness.role": "parent"}).info.run_id
    _log_trial(client, other, opid, arch="vgg16", mode="qcfs", seed=0, final=(1.0,) * 5,
               tmp_path=tmp_path)
    return uri, ids


def test_bulk_sql_reading_equals_client_api(small_store):
    uri, ids = small_store
    bulk = collect_mod.collect(EXP, uri, bulk=True)
    slow = collect_mod.collect(EXP, uri, bulk=False)
    assert isinstance(bulk.histories, collect_mod.Histories)
    pd.testing.assert_frame_equal(bulk.runs, slow.runs)
    pd.testing.assert_frame_equal(bulk.trials, slow.trials)
    assert bulk.parent_ids == slow.parent_ids and bulk.parent_id == slow.parent_id
    assert set(bulk.histories) == set(slow.histories) == set(bulk.runs["run_id"])
    for rid, h in slow.histories.items():
        b = bulk.histories[rid]
        if rid == ids[0]:
            # the client path skips a history whose latest value is NaN (it picks the
            # keys from the latest metrics); the bulk path keeps it
            assert "time/eval_s" not in h.columns and "time/eval_s" in b.columns
            assert b["time/eval_s"].tolist()[:2] == [1.0, 1.0]
            b = b.drop(columns="time/eval_s")
        pd.testing.assert_frame_equal(b[sorted(b.columns)], h[sorted(h.columns)],
                                      check_dtype=False)
    h = bulk.histories[ids[0]]
    assert h.loc[2, "ann/test_acc"] == 12.0 and math.isnan(h.loc[3, "time/eval_s"])
    # only the metrics the figures use are read
    assert not any(c.startswith(("train/", "delta_next/", "residual/")) for c in h.columns)
    assert any(c.startswith("delta/") for c in h.columns)
    # artifacts of a local store are read from disk, as MLflow would download them
    rid = bulk.runs["run_id"].iloc[0]
    assert bulk.residual_hist(rid) == collect_mod._download_json(uri, rid,
                                                                 "residual_hist.json")


def test_markdown_tables_as_tabulate_writes_them():
    from harness.report import tables

    frames = [pd.DataFrame({"Arch": ["ResNet-20", "", "VGG-16"], "Method": ["Δ NQ − QCFS",
                                                                          "↳ p (paired t)",
                                                                          "  **QCFS** "],
                            "δ": ["0.1", "—", "τ=4"], "T=1": ["-1.25 ± 0.35 (n=2)", "", "†"]}),
              pd.DataFrame({"A": ["x"], "Long header here": ["1"]})]
    for df in frames:
        assert tables._md(df) == df.to_markdown(index=False, disable_numparse=True)
    empty = pd.DataFrame({"A": [], "B": []})
    assert tables._md(empty) == empty.to_markdown(index=False, disable_numparse=True)


@pytest.mark.slow
def test_benchmark_store_is_a_harness_sweep(tmp_path):
    """The synthetic store of benchmarks/report_scale.py reads like a real sweep."""
    from benchmarks.report_scale import EXPERIMENT, build_store, grid
    from harness.report.cli import write_report

    assert len(grid(1000)) == 1000 and sum(t.get("status") == "FAILED" for t in grid(1000)) == 10
    uri, facts = build_store(tmp_path / "store", 40, 3)
    col = collect_mod.collect(EXPERIMENT, uri)
    assert len(col.runs) == 39 and col.status_counts["FAILED"] == 1
    assert set(col.runs["method"]) == {"QCFS", "NQ"}          # the first 40 of the grid
    assert tables.varying_settings(col.runs) == ["L", "tau"]
    h = col.histories[col.runs["run_id"].iloc[0]]
    assert list(h.index) == [1, 2, 3] and "time/epoch_s" in h.columns
    out = tmp_path / "report"
    written = write_report(col, out, {"md", "tex", "png"})
    names = {p.name for p in written["figures"]}
    assert {"selection_cifar10.png", "residual_overlay_cifar10.png", "epoch_time.png",
            "ablation_tau.png", "acc_vs_energy_cifar10.png"} <= names
    assert col.runs["Eratio4"].between(0, 1).all() and (col.runs["ann_uJ"] > 0).all()
    assert not any(n.startswith("curves_") for n in names)
