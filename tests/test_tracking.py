"""harness.tracking on a temporary SQLite store, and the driver's Tune callback
(harness.tune_mlflow.MlflowLogger) driven by fake Trial objects: no Ray cluster.

One real trial (digits, cnn_small, 2 epochs) is trained once for the module, so the
records, result.json, residual_hist.json and best.pt logged here are the real ones."""
import json
import shutil
from pathlib import Path

import pytest

from harness import tracking
from harness.config import load_config
from harness.train import run

DIGITS = ["data.augment.crop_pad=1", "data.augment.flip=false", "data.batch_size=128", "model.lam_init=2.0",
          "eval.T=[1,2,4]", "eval.select_T=2", "noise.calib_samples=64", "train.epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(result, out folder, on_start info, epoch records) of one real 2-epoch NQ trial."""
    out = tmp_path_factory.mktemp("trial")
    info, recs = {}, []
    result = run(load_config(None, DIGITS), out, progress=False, on_start=info.update,
                 callbacks=[lambda rec, _: recs.append(json.loads(json.dumps(rec)))])
    return result, out, info, recs


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "exp", uri)
    return c, exp, uri


def statuses(c, exp, parent):
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["harness.trial"]: r.info.status for r in runs}


# ---------------------------------------------------------------- URIs and retry

def test_normalize_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.normalize_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(tracking.TrackingError, match="does not exist"):  # no folder made behind the user's back
        tracking.normalize_uri("sqlite:///rel/m.db")
    (tmp_path / "rel").mkdir()
    assert tracking.normalize_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"
    assert tracking.normalize_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    for bad in ("file:///tmp/mlruns", "./mlruns", "sqlite:///:memory:", "sqlite:///"):
        with pytest.raises(tracking.TrackingError) as e:
            tracking.normalize_uri(bad)
        assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert tracking.db_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert tracking.db_path("http://h:1") is None


def test_retry_only_retries_a_locked_database():
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry(locked_twice, wait=0) == "ok" and len(calls) == 3

    calls.clear()

    def other():
        calls.append(1)
        raise ValueError("no such run")

    with pytest.raises(ValueError):
        tracking.retry(other, wait=0)
    assert len(calls) == 1  # not retried

    calls.clear()

    def always_locked():
        calls.append(1)
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError):
        tracking.retry(always_locked, attempts=4, wait=0)
    assert len(calls) == 4


# ---------------------------------------------------------------- parent and child runs

def test_experiment_parent_and_children(store, tmp_path):
    c, exp, uri = store
    assert tracking.ensure_experiment(c, "exp", uri) == exp  # idempotent
    assert c.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()
    c.delete_experiment(exp)
    assert tracking.ensure_experiment(c, "exp", uri) == exp  # a deleted experiment is restored
    assert c.get_experiment(exp).lifecycle_stage == "active"

    space = tmp_path / "space.yaml"
    space.write_text("grid: {noise.mode: [qcfs, layerwise]}\n")
    parent = tracking.create_parent(c, exp, "exp", space, {"grid": {"noise.mode": ["qcfs", "layerwise"]},
                                                            "num_samples": 1})
    p = c.get_run(parent)
    assert p.info.status == "RUNNING" and p.data.tags["harness.role"] == "parent"
    assert p.data.params == {"space.grid.noise.mode": '["qcfs", "layerwise"]', "space.num_samples": "1"}
    assert {a.path for a in c.list_artifacts(parent)} == {"space.yaml", "versions.json"}
    for tag in ("mlflow.source.name", "mlflow.user", "harness.hardware"):
        assert p.data.tags[tag]

    rid, logged = tracking.open_child(c, exp, parent, "mode=qcfs", "QCFS", tags={"extra": "x"})
    assert logged == set()
    r = c.get_run(rid)
    assert r.info.run_name == "mode=qcfs" and r.data.tags["mlflow.parentRunId"] == parent
    assert (r.data.tags["harness.role"], r.data.tags["harness.method"], r.data.tags["extra"]) == \
        ("trial", "QCFS", "x")
    tracking.set_status(c, rid, "KILLED")
    # a retry or --resume finds the same run (by parent and label) and marks it RUNNING again
    assert tracking.find_child(c, exp, parent, "mode=qcfs") == rid
    assert tracking.find_child(c, exp, parent, "mode=layerwise") is None
    assert tracking.open_child(c, exp, parent, "mode=qcfs", "QCFS") == (rid, set())
    assert c.get_run(rid).info.status == "RUNNING"
    with pytest.raises(AssertionError):
        tracking.set_status(c, rid, "DONE")
    tracking.set_status(c, rid, "FINISHED")
    assert c.get_run(rid).info.status == "FINISHED"
    assert len(c.search_runs([exp])) == 2  # one parent, one child: nothing duplicated


def test_node_tags_keep_every_node(store):
    c, exp, _ = store
    rid = c.create_run(exp).info.run_id
    tracking.set_node_tags(c, rid, {"ray.node_id": "a" * 8, "ray.node_ip": "10.0.0.1"})
    tracking.set_node_tags(c, rid, {"ray.node_id": "b" * 8, "ray.node_ip": "10.0.0.2"})
    tracking.set_node_tags(c, rid, {"ray.node_id": "c" * 8, "ray.node_ip": "10.0.0.1"})
    tags = c.get_run(rid).data.tags
    assert tags["ray.node_id"] == "c" * 8 and tags["ray.node_ip"] == "10.0.0.1"  # where it runs now
    assert tags["harness.nodes"] == "10.0.0.1,10.0.0.2"  # every node it ran on, once


@pytest.mark.parametrize("source,kind", [
    ("/data/cifar10-jpeg.tar.gz", "local"), ("file:///data/cifar10-jpeg.tar.gz", "local"),
    ("s3://bucket/cifar10", "s3"), ("sklearn.datasets.load_digits", "code")])
def test_dataset_input_for_every_kind_of_source(store, source, kind):
    """A CIFAR archive (a path) crashed the sweep's callback once (an abstract MLflow source
    class): every kind of source the data module reports must log as a dataset input."""
    c, exp, _ = store
    rid = c.create_run(exp).info.run_id
    tracking.log_dataset(c, rid, {"name": "cifar10", "source": source, "digest": "abc123"})
    (d,) = c.get_run(rid).inputs.dataset_inputs
    assert d.dataset.name == "cifar10" and d.dataset.digest == "abc123"
    assert kind in d.dataset.source_type and source in d.dataset.source


def test_epochs_params_dataset_and_final(store, trained):
    c, exp, _ = store
    result, out, info, recs = trained
    rid = c.create_run(exp).info.run_id
    tracking.log_trial_params(c, rid, info)
    tracking.log_trial_params(c, rid, info)  # a retried trial logs the same values again
    r = c.get_run(rid)
    assert r.data.params["layers"] == ",".join(info["layers"]) == ",".join(tracking.layer_names(c, rid))
    assert r.data.params["noise.mode"] == "layerwise" and r.data.params["calib.n_images"] == "64"
    assert len(r.inputs.dataset_inputs) == 1  # logged once
    assert r.inputs.dataset_inputs[0].dataset.name == "digits"

    layers = info["layers"]
    for rec in recs:
        tracking.log_epoch(c, rid, rec, layers)
    assert tracking.logged_epochs(c, rid) == {1, 2}
    names = tracking.epoch_metrics(recs[0], layers)
    assert {"train/loss", "ann/test_acc", "snn/val_acc_T01", "snn/val_acc_T02", "time/epoch_s",
            f"delta/l00_{layers[0]}", f"delta_next/l03_{layers[3]}", f"residual/std/l01_{layers[1]}"} <= set(names)
    for key in names:  # every per-epoch metric has one point per epoch, at step = epoch
        hist = c.get_metric_history(rid, key)
        assert sorted(m.step for m in hist) == [1, 2], key
    loss = {m.step: m.value for m in c.get_metric_history(rid, "train/loss")}
    assert loss == {1: recs[0]["train_loss"], 2: recs[1]["train_loss"]}

    tracking.log_final(c, rid, result, out)
    r = c.get_run(rid)
    assert r.data.metrics["final/snn_test_acc_T04"] == result["snn_test_acc"]["4"]
    assert r.data.metrics["final/best_epoch"] == result["best_epoch"]
    assert r.data.metrics["final/ann_test_acc"] == result["ann_test_acc"]
    assert sorted(m.step for m in c.get_metric_history(rid, "final/snn_test_acc_by_T")) == [1, 2, 4]
    assert {a.path for a in c.list_artifacts(rid)} >= {"result.json", "residual_hist.json", "curves.png"}
    assert len(r.outputs.model_outputs) == 1  # the selected model (mlflow.pytorch)

    # model="checkpoint" (sweeps' default): best.pt itself as an artifact, byte for byte
    rid2 = tracking.create_child(c, r.info.experiment_id, rid, "ckpt", "NQ")
    tracking.log_final(c, rid2, result, out, model="checkpoint")
    assert "best.pt" in {a.path for a in c.list_artifacts(rid2)}
    assert Path(c.download_artifacts(rid2, "best.pt")).read_bytes() == (out / "best.pt").read_bytes()
    assert len(c.get_run(rid2).outputs.model_outputs) == 0
    with pytest.raises(ValueError, match="model = 'onnx'"):
        tracking.log_final(c, rid2, result, out, model="onnx")


def test_summarise_parent_pairs_by_seed(store, tmp_path):
    c, exp, _ = store
    space = tmp_path / "s.yaml"
    space.write_text("x: 1\n")
    parent = tracking.create_parent(c, exp, "exp", space)
    acc = {("QCFS", "0"): 80.0, ("NQ", "0"): 85.0, ("QCFS", "1"): 70.0, ("NQ", "1"): 72.0, ("NQ", "2"): 99.0}
    for (method, seed), a in acc.items():
        rid = tracking.create_child(c, exp, parent, f"{method}-{seed}", method)
        c.log_param(rid, "train.seed", seed)
        c.log_metric(rid, "final/snn_test_acc_T04", a)
        tracking.set_status(c, rid, "FINISHED")
    killed = tracking.create_child(c, exp, parent, "QCFS-2", "QCFS")  # not FINISHED: left out
    c.log_param(killed, "train.seed", "2")
    c.log_metric(killed, "final/snn_test_acc_T04", 0.0)
    tracking.set_status(c, killed, "KILLED")
    out = tracking.summarise_parent(c, exp, parent, ["noise.mode", "train.seed"])
    assert out["summary/QCFS/snn_test_acc_T04"] == 75.0 and out["summary/QCFS/n"] == 2
    assert out["summary/NQ/snn_test_acc_T04"] == pytest.approx((85 + 72 + 99) / 3) and out["summary/NQ/n"] == 3
    assert out["summary/delta/snn_test_acc_T04"] == pytest.approx(3.5)  # seeds 0 and 1 only
    assert out["summary/delta/n_pairs"] == 2
    assert c.get_run(parent).data.metrics["summary/delta/n_pairs"] == 2


# ---------------------------------------------------------------- the driver's Tune callback

class FakeTrial:
    """What MlflowLogger reads of a Tune Trial: a trial of the trained config, with its own
    noise.mode; `info` is what it reports with its first epoch."""

    def __init__(self, trial_id: str, mode: str, space_dir: Path, info: dict):
        self.trial_id = trial_id
        self.info = json.loads(json.dumps(info))
        self.info["config"]["noise"]["mode"] = mode
        self.config = {"axes": {"noise.mode": mode},
                       "space": {"base": info["config"], "overrides": [], "dir": str(space_dir),
                                 "label_keys": ["noise.mode"]}}
        self.last_result: dict = {}
        self.checkpoint = None


def report(logger, trial, result):
    trial.last_result = result
    logger.on_trial_result(0, [], trial, result)


def test_mlflow_logger_with_fake_trials(store, trained, tmp_path):
    from ray import tune

    from harness.tune_mlflow import MlflowLogger
    c, exp, uri = store
    result, out, info, recs = trained
    space = tmp_path / "s.yaml"
    space.write_text("x: 1\n")
    parent = tracking.create_parent(c, exp, "exp", space)
    log = MlflowLogger(uri, exp, parent)
    node = {"ray.node_id": "n1", "ray.node_ip": "10.0.0.1"}

    # a trial that finishes; its epoch 1 is reported twice (a retry): the first values stay
    done = FakeTrial("t_done", "layerwise", tmp_path, info)
    log.on_trial_start(0, [], done)
    report(log, done, {"epoch": 1, "node": node, "info": done.info, "record": recs[0]})
    report(log, done, {"epoch": 1, "node": {**node, "ray.node_ip": "10.0.0.2"},
                       "record": {**recs[0], "train_loss": 123.0}})
    report(log, done, {"epoch": 2, "record": recs[1]})
    ckpt_dir = tmp_path / "final_ckpt"
    shutil.copytree(out, ckpt_dir, ignore=shutil.ignore_patterns(".harness*"))
    done.checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir))
    report(log, done, {"epoch": 2, "final": True})
    done.last_result["done"] = True
    log.on_trial_complete(0, [], done)

    # a trial the scheduler stopped after epoch 1 (no final report), and one that failed
    stopped = FakeTrial("t_stopped", "qcfs", tmp_path, info)
    log.on_trial_start(0, [], stopped)
    report(log, stopped, {"epoch": 1, "node": node, "info": stopped.info, "record": recs[0]})
    stopped.last_result["done"] = True
    stopped.checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir))  # an epoch checkpoint
    log.on_trial_complete(0, [], stopped)
    failed = FakeTrial("t_failed", "fixed", tmp_path, info)
    log.on_trial_start(0, [], failed)
    log.on_trial_error(0, [], failed)
    # it failed before its first report, yet its run says what it was (for harness report)
    p = c.get_run(log.runs["t_failed"]).data.params
    assert (p["data.name"], p["noise.mode"], p["train.seed"], p["model.arch"]) == ("digits", "fixed", "0", "cnn_small")
    assert "layers" not in p  # known only once the trial has built its model

    assert statuses(c, exp, parent) == {"mode=layerwise": "FINISHED", "mode=qcfs": "KILLED",
                                        "mode=fixed": "FAILED"}
    rid = log.runs["t_done"]
    r = c.get_run(rid)
    assert r.data.tags["harness.tune_trial_id"] == "t_done" and r.data.tags["harness.method"] == "NQ"
    assert r.data.tags["harness.nodes"] == "10.0.0.1,10.0.0.2"
    assert {m.step: m.value for m in c.get_metric_history(rid, "train/loss")} == \
        {1: recs[0]["train_loss"], 2: recs[1]["train_loss"]}
    assert r.data.metrics["final/snn_test_acc_T04"] == result["snn_test_acc"]["4"]
    assert {a.path for a in c.list_artifacts(rid)} >= {"result.json", "residual_hist.json", "curves.png"}
    assert "final/ann_test_acc" not in c.get_run(log.runs["t_stopped"]).data.metrics

    # a restarted driver (--resume): a new callback continues the same runs, reads the layer
    # names from the run's params and logs only the epochs not logged yet
    log2 = MlflowLogger(uri, exp, parent)
    again = FakeTrial("t_stopped", "qcfs", tmp_path, info)
    log2.on_trial_start(0, [], again)
    assert log2.runs["t_stopped"] == log.runs["t_stopped"]
    assert c.get_run(log.runs["t_stopped"]).info.status == "RUNNING"
    report(log2, again, {"epoch": 1, "record": {**recs[0], "train_loss": 99.0}})
    report(log2, again, {"epoch": 2, "record": recs[1]})
    assert {m.step: m.value for m in c.get_metric_history(log.runs["t_stopped"], "train/loss")} == \
        {1: recs[0]["train_loss"], 2: recs[1]["train_loss"]}
    # it reports final but its final checkpoint is gone: FAILED, never FINISHED without results
    report(log2, again, {"epoch": 2, "final": True})
    again.checkpoint = None
    log2.on_trial_complete(0, [], again)
    assert statuses(c, exp, parent)["mode=qcfs"] == "FAILED"
    assert len(c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")) == 3


def test_report_through_the_harness_cli(tmp_path, capsys):
    from harness.cli import main
    rc = main(["report", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--out",
               str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognized arguments" not in err, err  # the report's own error, not argparse's
