"""Helpers of the sweep integration tests that run `harness sweep` as a subprocess (the
real CLI: its own Ray or `--address`, its exit code, its output) and read the result back
from MLflow and from Tune's experiment state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "data": {"name": "digits", "batch_size": 128},
    "model": {"arch": "cnn_small", "L": 4, "lam_init": 2.0},
    "noise": {"mode": "layerwise", "tau": 4, "calib_samples": 64},
    "train": {"epochs": 2, "lr": 0.1},
    "eval": {"T": [1, 2, 4], "select_T": 4},
    "grid": {"noise.mode": ["layerwise", "qcfs"]},
    "resources": {"cpu": 1, "gpu": 0, "max_concurrent": 2},
}
# the per-epoch metrics every trial logs (cnn_small has 4 activation layers)
EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "ann/val_acc", "ann/test_acc", "snn/val_acc_T01",
              "snn/val_acc_T04", "time/epoch_s", "delta/l00_features.2", "delta_next/l03_classifier.2",
              "residual/std/l01_features.5", "residual/mean/l02_features.9")


def write_space(folder: Path, name: str, **changes) -> Path:
    d = json.loads(json.dumps(TINY))
    d["name"] = name
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict) and key not in ("grid", "resources"):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def env(**extra: str) -> dict[str, str]:
    """The environment of a `harness` subprocess: this checkout first on the path (Ray's
    workers inherit it from the raylet, which inherits it from the driver)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e.update({"RAY_DEDUP_LOGS": "0", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **extra})
    e.pop("RAY_ADDRESS", None)
    return e


class Harness:
    """A `python -m harness ...` subprocess in its own session, output to files."""

    def __init__(self, args: list[str], cwd: Path, log: Path, **extra_env: str):
        self.log = log
        self.out, self.err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=env(**extra_env),
                                     stdout=self.out, stderr=self.err, start_new_session=True)

    def output(self) -> str:
        for f in (self.out, self.err):
            if not f.closed:
                f.flush()
        return Path(f"{self.log}.out").read_text() + Path(f"{self.log}.err").read_text()

    def stdout(self) -> str:
        if not self.out.closed:
            self.out.flush()
        return Path(f"{self.log}.out").read_text()

    def interrupt(self) -> None:
        """SIGINT to the `harness sweep` process, as Ctrl-C would send it."""
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float = 900) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"harness did not end within {timeout:.0f} s:\n{self.output()[-4000:]}") from None
        self.wall = time.monotonic() - self.t0
        self.out.close()
        self.err.close()
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def harness(args: list[str], cwd: Path, log: Path, timeout: float = 900, **extra_env: str) -> tuple[int, Harness]:
    h = Harness(args, cwd, log, **extra_env)
    return h.wait(timeout), h


def wait_for(cond: Callable[[], object], what: str, h: Harness | None = None, timeout: float = 900,
             every: float = 1.0):
    """Poll `cond` until it returns something true; fail if `h` ends first or on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            got = cond()
        except Exception:  # noqa: BLE001 - the store may not exist yet
            got = None
        if got:
            return got
        if h is not None and h.proc.poll() is not None:
            raise AssertionError(f"harness ended (rc {h.proc.returncode}) before {what}:\n{h.output()[-4000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f":\n{h.output()[-4000:]}" if h else ""))


def runs(uri: str, experiment: str):
    """(client, parent runs, child runs) of an experiment; ([], []) if it does not exist yet."""
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return c, [], []
    all_runs = c.search_runs([exp.experiment_id], max_results=10_000)
    return (c, [r for r in all_runs if r.data.tags.get("harness.role") == "parent"],
            [r for r in all_runs if r.data.tags.get("harness.role") == "trial"])


def by_label(children) -> dict:
    out = {}
    for r in children:
        label = r.data.tags["harness.trial"]
        assert label not in out, f"two child runs for trial {label}"
        out[label] = r
    return out


def steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def assert_complete(c, run, epochs: int, model: str = "checkpoint") -> dict[str, float]:
    """A FINISHED child run with every per-epoch metric logged once per epoch, its final
    metrics and artifacts, and its selected checkpoint as the space's `tracking.model`
    says (best.pt as an artifact, or one MLflow model); returns its final/* metrics."""
    assert run.info.status == "FINISHED", run.data.tags["harness.trial"]
    for key in EPOCH_KEYS:
        assert steps(c, run.info.run_id, key) == list(range(1, epochs + 1)), (run.data.tags["harness.trial"], key)
    finals = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    assert {"final/ann_test_acc", "final/best_epoch", "final/snn_test_acc_T01", "final/snn_test_acc_T04"} <= set(finals)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert arts >= {"result.json", "residual_hist.json", "curves.png"}
    assert ("best.pt" in arts) == (model == "checkpoint"), arts
    assert len(c.get_run(run.info.run_id).outputs.model_outputs) == (model == "mlflow")
    return finals


def tune_trials(experiment_path: str) -> dict:
    """Tune's own record of a sweep's trials (its experiment state): label -> Trial."""
    from ray.tune import ExperimentAnalysis
    return {t.last_result.get("label", t.trial_id): t for t in ExperimentAnalysis(experiment_path).trials}


# ---------------------------------------------------------------- a local MLflow tracking server

def free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_mlflow_server(folder: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 and a free port, one worker, a SQLite backend and an
    artifact root in `folder`, serving artifacts; returns once /health answers."""
    import urllib.request
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/server.db",
                             "--serve-artifacts", "--artifacts-destination", str(folder / "server-artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env())
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited ({proc.returncode}):\n"
                                 + (folder / "mlflow-server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise AssertionError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
