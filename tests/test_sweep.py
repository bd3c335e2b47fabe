"""`harness sweep`: search-space validation, Ray Tune + MLflow sweeps, the shared
calibration actor, trial retry and --resume. One local Ray (2 CPUs) for the module."""
import json
import os
from pathlib import Path

import pytest
import yaml

import faults
from harness.cli import main as cli_main
from harness.space import load_space
from harness.sweep import SweepOptions, run_sweep

TINY = {
    "data": {"name": "digits", "batch_size": 128},
    "model": {"arch": "cnn_small", "L": 4, "lam_init": 2.0},
    "noise": {"mode": "layerwise", "tau": 4, "calib_samples": 64},
    "train": {"epochs": 2, "lr": 0.1},
    "eval": {"T": [1, 2, 4, 8], "select_T": 4},
    "grid": {"noise.mode": ["layerwise", "qcfs"]},
    "resources": {"cpu": 1, "gpu": 0, "max_concurrent": 2},
}
EPOCHS = TINY["train"]["epochs"]


def write_space(tmp: Path, name: str, **changes) -> Path:
    d = json.loads(json.dumps(TINY))
    d["name"] = name
    d.update(changes)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ---------------------------------------------------------------- validation (no Ray)

def one_line_error(capsys, argv, code):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("changes, expected", [
    ({"grid": {"model.depth": [1, 2]}}, "config error: unknown key grid.model.depth (accepted: arch, L, lam_init, grad, cifar_stem)"),
    ({"grid": {"train.seed": []}}, "config error: grid.train.seed = [] (expected a non-empty list"),
    ({"grid": {"noise.mode": ["qcfs", "bogus"]}}, "config error: grid.noise.mode = 'bogus' (expected one of:"),
    ({"model": {"arch": "cnn_small", "L": 0}}, "config error: model.L = 0 (expected an integer >= 1)"),
    ({"resources": {"cpu": 1, "gpus": 1}}, "config error: unknown key resources.gpus"),
    ({"scheduler": {"name": "pbt"}}, "config error: scheduler.name = 'pbt' (expected one of: fifo, asha)"),
    ({"scheduler": {"name": "asha", "metric": "val_loss"}},
     "config error: scheduler.metric = 'val_loss' (expected one of: snn_sel_acc, ann_test_acc, train_loss)"),
    # samplers: every one is checked at its bounds / choices before Ray starts
    ({"sample": {"train.lr": {"loguniform": [0, 0.1]}}},
     "config error: sample.train.lr.loguniform = [0.0, 0.1] (expected [low, high] with 0 < low < high)"),
    ({"sample": {"train.lr": {"uniform": [0.2, 0.1]}}},
     "config error: sample.train.lr.uniform = [0.2, 0.1] (expected [low, high] with low < high)"),
    ({"sample": {"train.lr": {"uniform": [0.1, 0.2], "choice": [1]}}},
     "config error: sample.train.lr = {'uniform': [0.1, 0.2], 'choice': [1]} (expected exactly one of: choice, "
     "uniform, loguniform, randint)"),
    ({"sample": {"train.lr": {"normal": [0.0, 1.0]}}}, "config error: unknown key sample.train.lr.normal"),
    ({"sample": {"noise.mode": {"choice": ["qcfs"]}}},
     "config error: sample.noise.mode is also a grid axis (expected each key in grid or sample, not both)"),
    ({"sample": {"model.depth": {"choice": [1, 2]}}},
     "config error: unknown key sample.model.depth (accepted: arch, L, lam_init, grad, cifar_stem)"),
    ({"sample": {"model.L": {"randint": [0, 4]}}}, "config error: sample.model.L = 0 (expected an integer >= 1)"),
    ({"sample": {"noise.tau": {"choice": [4, -1]}}}, "config error: sample.noise.tau = -1"),
    ({"grid": {}, "sample": {"train.seed": {"randint": [0, 3]}}},
     "config error: sample.train.seed changes the calibration images from trial to trial"),
    ({"grid": {}, "sample": {"train.lr": {"loguniform": [0.01, 0.1]}}, "num_samples": 0},
     "config error: num_samples = 0 (expected an integer >= 1)"),
    ({"sample": {"train.lr": {"loguniform": [0.01, 0.1]}}, "search": {"algorithm": "optuna"}},
     "config error: search.algorithm = 'optuna' with grid axes (noise.mode): Optuna cannot expand a grid"),
    ({"grid": {}, "search": {"algorithm": "optuna"}},
     "config error: search.algorithm = 'optuna' needs at least one sample axis"),
    ({"search": {"algorithm": "hyperopt"}}, "config error: search.algorithm = 'hyperopt' (expected one of: random, optuna)"),
])
def test_invalid_space_is_one_line(tmp_path, capsys, changes, expected):
    p = write_space(tmp_path, "bad", **changes)
    err = one_line_error(capsys, ["sweep", str(p), "--storage-path", str(tmp_path / "rr"),
                                  "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], 2)
    assert err.startswith(expected), err
    assert not (tmp_path / "m.db").exists()  # nothing was created


def test_space_expansion_overrides_and_paths(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    p = write_space(tmp_path, "exp", grid={"model.arch": ["cnn_small", "resnet20"], "train.seed": [0, 1]},
                    overrides=[{"match": {"model.arch": "resnet20"}, "set": {"model.L": 8}}])
    d = yaml.safe_load(p.read_text())
    d["data"] = {"name": "imagefolder", "root": "data"}
    p.write_text(yaml.safe_dump(d))
    monkeypatch.chdir("/")
    s = load_space(p, ["train.epochs=3"])
    assert [t.label for t in s.trials] == ["arch=cnn_small,seed=0", "arch=cnn_small,seed=1",
                                           "arch=resnet20,seed=0", "arch=resnet20,seed=1"]
    assert [t.cfg.model.L for t in s.trials] == [4, 4, 8, 8]
    assert all(t.cfg.train.epochs == 3 for t in s.trials)
    assert all(t.cfg.data.root == str(tmp_path / "data") for t in s.trials)


@pytest.mark.parametrize("name", ["quickstart", "cpu_cifar10", "paper_table1_cifar10", "paper_table1_cifar100",
                                  "fig4_fixed_noise", "fig7_tau"])
def test_shipped_spaces_are_valid(name, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    s = load_space(root / "search_spaces" / f"{name}.yaml")
    assert s.trials and s.name == name
    if name == "paper_table1_cifar100":
        assert {(t.cfg.model.arch, t.cfg.model.L) for t in s.trials} == {("vgg16", 4), ("resnet18", 4),
                                                                         ("resnet20", 8)}


# ---------------------------------------------------------------- sweeps on a local Ray

@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "HARNESS_CACHE")
                                       if k in os.environ}})
    root = tmp_path_factory.mktemp("sweeps")
    yield {"root": root, "uri": f"sqlite:///{root}/mlflow.db", "storage": str(root / "ray_results")}
    ray.shutdown()


def sweep(env, space, *extra):
    return cli_main(["sweep", str(space), "--tracking-uri", env["uri"], "--storage-path", env["storage"], *extra])


def runs_of(env, experiment):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(env["uri"])
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("harness.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    return c, parents, children


def check_child(c, run, epochs=EPOCHS, model="checkpoint"):
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "ann/test_acc", "snn/val_acc_T04", "delta/l00_features.2", "delta_next/l00_features.2",
                "residual/std/l01_features.5", "train/lr"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    for key in ("final/snn_test_acc_T01", "final/snn_test_acc_T08", "final/ann_test_acc", "final/best_epoch"):
        assert key in run.data.metrics
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"result.json", "residual_hist.json",
                                                                  "curves.png"}
    assert run.data.params["model.arch"] == "cnn_small"
    full = c.get_run(run.info.run_id)
    # the selected checkpoint: an MLflow PyTorch model (tracking.model: mlflow), or best.pt
    # as an artifact that loads into the trial's architecture (the default)
    assert len(full.outputs.model_outputs) == (model == "mlflow")
    if model == "checkpoint":
        import torch

        import harness as h
        ck = torch.load(c.download_artifacts(run.info.run_id, "best.pt"), weights_only=True)
        h.create_model("cnn_small", num_classes=10, in_chans=1, L=4).load_state_dict(ck["model"])
    (ds,) = full.inputs.dataset_inputs
    assert ds.dataset.name == "digits" and len(ds.dataset.digest) == 16
    for tag in ("ray.node_id", "ray.node_ip", "mlflow.source.name", "mlflow.user", "harness.method"):
        assert full.data.tags.get(tag), tag
    return json.loads(Path(c.download_artifacts(run.info.run_id, "result.json")).read_text())


def tune_trials(env, name) -> dict:
    """Tune's own record of the sweep's trials (from its experiment state): label -> Trial."""
    from ray.tune import ExperimentAnalysis
    trials = ExperimentAnalysis(str(Path(env["storage"]) / name)).trials
    return {t.last_result["label"]: t for t in trials}


def run_space(env, space, trainable=None, resume=False) -> int:
    import ray.cloudpickle

    import faults
    ray.cloudpickle.register_pickle_by_value(faults)
    opts = SweepOptions(str(space), tracking_uri=env["uri"], storage_path=env["storage"], resume=resume)
    return run_sweep(load_space(space), opts, **({"trainable": trainable} if trainable else {}))


@pytest.mark.slow
def test_sweep_actor_mlflow_and_retried_trial(ray_local, capsys, tmp_path):
    """2 trials sharing the calibration actor; trial 1's worker is killed after epoch 1
    once: Tune retries it from its epoch-1 checkpoint and it continues its own MLflow run."""
    env = ray_local
    space = write_space(env["root"], "actor2", tracking={"model": "mlflow"})
    assert run_space(env, space, faults.die_once_after("mode=qcfs", 1, str(tmp_path))) == 0
    assert len(list(tmp_path.glob("died_mode=qcfs"))) == 1  # the worker really died once
    # ... and Tune really retried it from its epoch-1 checkpoint: one failure, and after the
    # restore it reported epoch 2 and the final report only (3 reports in all)
    trials = tune_trials(env, "actor2")
    retried, other = trials["mode=qcfs"], trials["mode=layerwise"]
    assert (retried.status, retried.run_metadata.num_failures) == ("TERMINATED", 1)
    assert (retried.last_result["training_iteration"], retried.last_result["iterations_since_restore"]) == \
        (EPOCHS + 1, EPOCHS)
    assert (other.status, other.run_metadata.num_failures) == ("TERMINATED", 0)
    assert other.last_result["iterations_since_restore"] == EPOCHS + 1
    out = capsys.readouterr().out
    assert "harness report --experiment actor2" in out and "2/2 trials finished" in out
    c, parents, children = runs_of(env, "actor2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parents[0].info.run_id)} >= {"actor2.yaml", "versions.json",
                                                                         "calibration_history.json"}
    assert len(children) == 2  # the retry continued its own run: no duplicate
    assert sorted(r.data.tags["harness.trial"] for r in children) == ["mode=layerwise", "mode=qcfs"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    results = {r.data.tags["harness.trial"]: check_child(c, r, model="mlflow") for r in children}
    assert results["mode=layerwise"]["method"] == "NQ"

    # the actor saw every trial at every epoch, and its deltas are the trials' deltas
    hist = json.loads((Path(env["storage"]) / "actor2" / "calibration_history.json").read_text())
    assert sorted(hist) == ["mode=layerwise", "mode=qcfs"]
    for trial, res in results.items():
        per_epoch = [h for h in hist[trial] if h["epoch"] is not None]
        assert [h["epoch"] for h in per_epoch] == [r["epoch"] for r in res["history"]] == list(range(1, EPOCHS + 1))
        for h, rec in zip(per_epoch, res["history"], strict=True):
            assert h["std"]["end_to_end"] == pytest.approx(rec["residual_std"], abs=1e-12)
    # NQ trains with the actor's delta (the model's delta buffers are float32); QCFS with none
    for h, rec in zip([h for h in hist["mode=layerwise"] if h["epoch"] is not None],
                      results["mode=layerwise"]["history"], strict=True):
        assert h["delta"]["end_to_end"] == pytest.approx(rec["delta_next"], rel=1e-6, abs=1e-9)
    assert all(d == 0.0 for rec in results["mode=qcfs"]["history"] for d in rec["delta_next"])

    # a second start of the same sweep must say --resume
    capsys.readouterr()
    err = one_line_error(capsys, ["sweep", str(space), "--tracking-uri", env["uri"],
                                  "--storage-path", env["storage"]], 2)
    assert "--resume" in err


@pytest.mark.slow
def test_failed_sweep_is_reported_and_resumes(ray_local, capsys, tmp_path):
    """failure.max_failures=0 and trial 1 killed after epoch 1: the sweep ends with exit 1
    and a FAILED parent; --resume finishes trial 1 in its own MLflow run and does not rerun
    trial 0."""
    from harness.trainable import work_dir
    env = ray_local
    space = write_space(env["root"], "resume2", calibration={"mode": "local"}, failure={"max_failures": 0})
    assert run_space(env, space, faults.die_once_after("mode=qcfs", 1, str(tmp_path))) == 1
    assert "FAILED after" in capsys.readouterr().out
    c, parents, children = runs_of(env, "resume2")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    status = {r.data.tags["harness.trial"]: r.info.status for r in children}
    assert status == {"mode=layerwise": "FINISHED", "mode=qcfs": "FAILED"}  # never left RUNNING
    done, = work_dir(parents[0].info.run_id, "mode=layerwise", "*").parent.glob("mode=layerwise_*/result.json")
    mtime = done.stat().st_mtime_ns

    assert run_space(env, space, resume=True) == 0
    trials = tune_trials(env, "resume2")  # the failed trial continued from its epoch-1 checkpoint
    assert trials["mode=qcfs"].last_result["iterations_since_restore"] == EPOCHS
    assert trials["mode=layerwise"].last_result["final"] and trials["mode=layerwise"].status == "TERMINATED"
    c, parents, children = runs_of(env, "resume2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    for r in children:
        check_child(c, r)
    assert done.stat().st_mtime_ns == mtime  # the finished trial was not rerun


def test_impossible_resources(ray_local, capsys):
    env = ray_local
    space = write_space(env["root"], "gpu1", resources={"cpu": 1, "gpu": 1})
    err = one_line_error(capsys, ["sweep", str(space), "--tracking-uri", env["uri"],
                                  "--storage-path", env["storage"]], 2)
    assert err == "sweep error: resources.gpu = 1 per trial, but the cluster has 0 GPU"
    space = write_space(env["root"], "cpu3", resources={"cpu": 3})
    err = one_line_error(capsys, ["sweep", str(space), "--tracking-uri", env["uri"],
                                  "--storage-path", env["storage"]], 2)
    assert err == "sweep error: resources.cpu = 3 per trial, but the cluster has 2 CPU"


# ---------------------------------------------------------------- Tune search: samplers, Optuna, ASHA

def child_status(children) -> dict:
    return {r.data.tags["harness.trial"]: r.info.status for r in children}


@pytest.mark.slow
def test_sampled_sweep_records_the_draws(ray_local, capsys):
    """3 samples of train.lr (loguniform), 1 epoch: each child run records its draw as the
    train.lr param, under the label made from it, and Tune's config holds the same value."""
    from harness.space import trial_label
    env = ray_local
    space = write_space(env["root"], "sampled3", grid={}, sample={"train.lr": {"loguniform": [0.01, 0.2]}},
                        num_samples=3, train={"epochs": 1, "lr": 0.1})
    assert run_space(env, space) == 0
    assert "3/3 trials finished" in capsys.readouterr().out
    c, parents, children = runs_of(env, "sampled3")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 3
    lrs = sorted(float(r.data.params["train.lr"]) for r in children)
    assert len(set(lrs)) == 3 and all(0.01 <= lr <= 0.2 for lr in lrs)
    for r in children:
        lr = float(r.data.params["train.lr"])
        assert r.data.tags["harness.trial"] == trial_label({"train.lr": lr}, ["train.lr"])
        check_child(c, r, epochs=1)
    assert sorted(t.config["axes"]["train.lr"] for t in tune_trials(env, "sampled3").values()) == lrs


@pytest.mark.slow
def test_optuna_sweep(ray_local, capsys):
    """search.algorithm optuna (Tune's OptunaSearch) over a sampled train.lr, 2 trials."""
    pytest.importorskip("optuna")
    env = ray_local
    space = write_space(env["root"], "optuna2", grid={}, sample={"train.lr": {"loguniform": [0.01, 0.2]}},
                        num_samples=2, train={"epochs": 1, "lr": 0.1},
                        search={"algorithm": "optuna", "metric": "snn_sel_acc", "mode": "max", "seed": 0})
    assert run_space(env, space) == 0
    assert "2/2 trials finished" in capsys.readouterr().out
    c, parents, children = runs_of(env, "optuna2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    lrs = {float(r.data.params["train.lr"]) for r in children}
    assert len(lrs) == 2 and all(0.01 <= lr <= 0.2 for lr in lrs)
    for r in children:
        check_child(c, r, epochs=1)


@pytest.mark.slow
def test_asha_stops_the_poor_trial_early(ray_local, capsys):
    """ASHA on snn_sel_acc (grace 1 epoch, reduction factor 2), one trial at a time: lr 0.1
    runs all its epochs; lr 1e-5 reaches rung 1 below it and is stopped. A stopped trial is
    not a failure: the sweep exits 0 with a FINISHED parent, and says what ASHA stopped;
    the stopped trial's child run is KILLED with the epochs it ran and no final metrics."""
    env = ray_local
    space = write_space(env["root"], "asha2", grid={"train.lr": [0.1, 1e-5]},
                        resources={"cpu": 1, "gpu": 0, "max_concurrent": 1}, calibration={"mode": "local"},
                        scheduler={"name": "asha", "metric": "snn_sel_acc", "mode": "max", "grace_period": 1,
                                   "reduction_factor": 2})
    assert run_space(env, space) == 0
    out = capsys.readouterr().out
    assert "sweep asha2: done in" in out and "1 finished, 1 stopped early by ASHA, 0 failed, 0 not finished, of 2" in out
    c, parents, children = runs_of(env, "asha2")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert child_status(children) == {"lr=0.1": "FINISHED", "lr=1e-05": "KILLED"}
    good, = [r for r in children if r.data.tags["harness.trial"] == "lr=0.1"]
    poor, = [r for r in children if r.data.tags["harness.trial"] == "lr=1e-05"]
    check_child(c, good)
    assert [m.step for m in c.get_metric_history(poor.info.run_id, "train/loss")] == [1]
    assert not [k for k in poor.data.metrics if k.startswith("final/")]
    # the parent's summary counts the finished trial only
    assert parents[0].data.metrics["summary/NQ/lr:0.1/n"] == 1 and "summary/NQ/lr:1e-05/n" not in parents[0].data.metrics
    trials = tune_trials(env, "asha2")
    assert trials["lr=1e-05"].status == "TERMINATED" and trials["lr=1e-05"].last_result["epoch"] == 1
    assert not trials["lr=1e-05"].last_result.get("final") and trials["lr=0.1"].last_result["final"]
