"""MLflow with one writer per store: a sweep through a real `mlflow server` (trials log
to it over HTTP, artifacts through it), and a 32-trial sweep against the SQLite default
(the driver is the only writer) that must lose no metric point. Calibration is local
(in each trial): the calibration actor is tested in test_sweep, and one process less
keeps these sweeps within a shared machine's memory."""
import re
import sqlite3
import time

import pytest

from sweeps import assert_complete, by_label, harness, runs, start_mlflow_server, steps, stop_server, write_space

pytestmark = pytest.mark.slow

EPOCHS = 2


def test_sweep_through_a_tracking_server(tmp_path):
    proc, url = start_mlflow_server(tmp_path)
    try:
        space = write_space(tmp_path, "served", train={"epochs": EPOCHS}, calibration={"mode": "local"},
                            tracking={"model": "mlflow"})
        rc, h = harness(["sweep", str(space), "--tracking-uri", url, "--storage-path", str(tmp_path / "rr")],
                        tmp_path, tmp_path / "served")
        assert rc == 0, h.output()[-4000:]
        assert "MLflow logged by the trial" in h.stdout() and "2/2 trials finished" in h.stdout()
        c, parents, children = runs(url, "served")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0].info.run_id
        assert {a.path for a in c.list_artifacts(parent)} >= {"served.yaml", "versions.json"}
        assert parents[0].data.metrics["summary/NQ/n"] == 1 and parents[0].data.metrics["summary/delta/n_pairs"] == 1
        kids = by_label(children)
        assert sorted(kids) == ["mode=layerwise", "mode=qcfs"]
        for label, r in kids.items():
            assert r.data.tags["mlflow.parentRunId"] == parent
            assert r.data.tags["ray.node_id"] and r.data.tags["ray.node_ip"]
            assert_complete(c, r, EPOCHS, model="mlflow")
            for key in r.data.metrics:  # every metric's full per-epoch history
                want = [0] if key.startswith(("final/", "energy/")) and not key.endswith("_by_T") else None
                if key.endswith("_by_T") or key.startswith("energy/firing_rate/"):  # series over T
                    want = [1, 2, 4]
                assert steps(c, r.info.run_id, key) == (want or list(range(1, EPOCHS + 1))), (label, key)
            full = c.get_run(r.info.run_id)
            assert len(full.outputs.model_outputs) == 1 and len(full.inputs.dataset_inputs) == 1
        # artifacts went through the server (--serve-artifacts) into its artifact root, not
        # next to anything on the driver's disk
        exp = c.get_experiment_by_name("served")
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        assert len(list((tmp_path / "server-artifacts").rglob("result.json"))) == 2
        assert len(list((tmp_path / "server-artifacts").rglob("MLmodel"))) == 2
        assert not (tmp_path / "mlartifacts").exists()
    finally:
        stop_server(proc)
    assert proc.poll() is not None


def test_32_trials_on_sqlite_lose_no_metric_point(tmp_path):
    """32 one-epoch digits trials, 2 at a time, against the default SQLite store (no
    --tracking-uri): every trial's every per-epoch metric has its one point, and nothing
    says "database is locked"."""
    space = write_space(tmp_path, "load32", grid={"noise.mode": ["layerwise", "qcfs"], "train.seed": list(range(16))},
                        train={"epochs": 1}, calibration={"mode": "local"})
    t0 = time.monotonic()
    rc, h = harness(["sweep", str(space), "--storage-path", str(tmp_path / "rr")], tmp_path, tmp_path / "load32",
                    timeout=3600)
    wall = time.monotonic() - t0
    out = h.output()
    assert rc == 0, out[-4000:]
    assert "32/32 trials finished" in out
    assert not re.search(r"database is locked|OperationalError", out, re.I)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c, parents, children = runs(uri, "load32")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = by_label(children)
    assert len(kids) == 32 and all(r.info.status == "FINISHED" for r in kids.values())
    # count the points in the store itself: (run, key) -> points, and the steps they are at
    db = sqlite3.connect(f"file:{tmp_path}/mlflow.db?mode=ro", uri=True)
    counts = {}
    for run_id, key, n, lo, hi in db.execute("select run_uuid, key, count(*), min(step), max(step) from metrics "
                                             "group by run_uuid, key"):
        counts.setdefault(run_id, {})[key] = (n, lo, hi)
    db.close()
    keys = None
    points = 0
    for label, r in kids.items():
        per_epoch = {k: v for k, v in counts[r.info.run_id].items() if not k.startswith(("final/", "energy/"))}
        assert all(v == (1, 1, 1) for v in per_epoch.values()), (label, per_epoch)  # one epoch: one point, step 1
        keys = keys or set(per_epoch)
        assert set(per_epoch) == keys, label  # every trial logged the same metrics
        assert counts[r.info.run_id]["final/snn_test_acc_by_T"][0] == 3  # T = 1, 2, 4
        points += sum(n for n, _, _ in counts[r.info.run_id].values())
    print(f"\nload32: {len(kids)} trials, {len(keys)} per-epoch metrics each, {points} metric points, "
          f"wall {wall:.0f} s")
