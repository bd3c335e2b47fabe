"""Overhead of `harness sweep` (Ray Tune + MLflow + the calibration actor) over plain
`harness.train.run` calls.

    python benchmarks/sweep_overhead.py [--quick] [--part pair,many,logging] [--trials N]

pair (the original section), on two quickstart trials (QCFS and NQ, seed 0):

1. direct: the two trials run one after the other with train.run (1 thread each)
2. sweep:  the same two trials through harness.sweep.main with max_concurrent 1 (so the
           walls compare), Ray started beforehand and timed separately
3. calibration: per-call time of ActorCalibrator (state dict to the actor and back) vs
           LocalCalibrator on the same model
--quick: 2 epochs and 64 calibration images instead of the quickstart's 8 epochs and the
whole validation split.

many: trials per minute and overhead per trial of an N-trial digits sweep (default 64;
--quick 8): noise.mode x train.seed, 1 epoch, 64 calibration images, 2 trials at a time
(1 CPU each), the quickstart's calibration actor. overhead per trial = wall x 2 / N
(CPU-slot seconds per trial) - the time of the same trial run directly (warm process).

logging: what it costs to write one epoch's metrics to MLflow (the choice between
driver-side logging and trials that talk to a server):
  (a) a fresh process against SQLite: import mlflow, create a client, log one epoch
  (b) the same through a local `mlflow server` (and the server's start-up time)
  (c) the driver's cost per record in its warm process (tracking.log_epoch), and per
      trial (its child run; its final metrics, artifacts and model)
Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(quick: bool = False, threads: int = 2, calib_calls: int = 10, parts: str = "pair,many,logging",
        trials: int | None = None) -> str:
    """The Markdown section (threads: unused, each trial runs on 1 CPU)."""
    out = []
    names = [p.strip() for p in parts.split(",") if p.strip()]
    if "pair" in names:
        out.append(run_pair(quick, calib_calls))
    if "many" in names:
        out.append(run_many(trials or (8 if quick else 64), quick))
    if "logging" in names:
        out.append(run_logging(quick))
    return "\n".join(out)


def run_pair(quick: bool = False, calib_calls: int = 10) -> str:
    """Two quickstart trials, direct and through the sweep; actor vs local calibration."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")

    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    space["grid"] = {"noise.mode": ["qcfs", "layerwise"], "train.seed": [0]}
    space["resources"] = {"cpu": 1, "gpu": 0, "max_concurrent": 1}
    space["name"] = "bench_overhead"
    if quick:
        space["train"]["epochs"] = 2
        space["noise"]["calib_samples"] = 64
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    space_file = tmp / "bench_overhead.yaml"
    space_file.write_text(yaml.safe_dump(space))

    import torch

    from harness.space import load_space
    from harness.train import run

    s = load_space(space_file)
    rows: list[tuple[str, str]] = []

    # 1. direct
    direct = []
    for t in s.trials:
        cfg = t.cfg.model_copy(update={"train": t.cfg.train.model_copy(update={"threads": 1})})
        t0 = time.perf_counter()
        run(cfg, tmp / "direct" / t.label, progress=False)
        direct.append(time.perf_counter() - t0)
    torch.set_num_threads(1)

    # 2. sweep (Ray started here so its start-up is timed on its own)
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    t_ray = time.perf_counter() - t0
    from harness.sweep import SweepOptions, main as sweep_main
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        rc = sweep_main(SweepOptions(str(space_file), tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                     storage_path=str(tmp / "ray_results")))
    t_sweep = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"the sweep failed (rc {rc}); see {tmp}")

    # 3. calibration per call: actor vs local, same model and split
    from harness.actor import ActorCalibrator, data_key, model_spec, start_actor
    from harness.calibration import LocalCalibrator
    from harness.data import CalibrationSet, load_dataset
    from harness.models import create_model
    cfg = s.trials[1].cfg
    data = load_dataset(cfg.data, cfg.train.seed)
    cfg = cfg.resolved(data.image_size)
    model = create_model(cfg.model.arch, num_classes=data.num_classes, L=cfg.model.L,
                         lam_init=cfg.model.lam_init, in_chans=data.in_chans)
    key = data_key(cfg)
    handle, _ = start_actor("harness-calibrator-bench", {key: cfg.to_dict()}, threads=1)
    actor = ActorCalibrator("harness-calibrator-bench", key,
                            model_spec(cfg, data.num_classes, data.in_chans), cfg.data.eval_batch_size)
    local = LocalCalibrator(CalibrationSet.from_dataset(data, cfg), cfg.data.eval_batch_size)
    timings = {}
    for name, cal in (("local", local), ("actor", actor)):
        cal.calibrate(model, tau=cfg.noise.tau)  # warm-up
        t0 = time.perf_counter()
        for i in range(calib_calls):
            cal.calibrate(model, tau=cfg.noise.tau, trial_id="bench", epoch=i)
        timings[name] = (time.perf_counter() - t0) / calib_calls
    ray.kill(handle)
    ray.shutdown()

    total_direct = sum(direct)
    per_trial = (t_sweep - total_direct) / len(direct)
    n_calib = len(local.calib_set)
    rows += [
        ("trials", f"{len(direct)} x {cfg.train.epochs} epochs (digits, cnn_small), 1 CPU each, sequential"),
        ("direct train.run, sum", f"{total_direct:.1f} s ({' + '.join(f'{d:.1f}' for d in direct)})"),
        ("Ray start-up (ray.init)", f"{t_ray:.1f} s"),
        ("harness sweep (after Ray start)", f"{t_sweep:.1f} s"),
        ("sweep overhead per trial", f"{per_trial:.1f} s ({100 * per_trial / (total_direct / len(direct)):.0f}% "
                                     "of a direct trial)"),
        ("calibration per call, local", f"{1000 * timings['local']:.1f} ms ({n_calib} images, tau {cfg.noise.tau})"),
        ("calibration per call, actor", f"{1000 * timings['actor']:.1f} ms "
                                        f"(+{1000 * (timings['actor'] - timings['local']):.1f} ms)"),
    ]
    rows.append(("per-trial overhead against a 25-min trial", f"{100 * per_trial / 1500:.1f}% "
                 "(a 5-epoch ResNet-20 CIFAR-10 trial on 1 core, cpu_cifar10.yaml)"))
    cmd = "python benchmarks/sweep_overhead.py" + (" --quick" if quick else "")
    body = (f"{os.cpu_count()} CPUs. The overhead per trial is a fixed cost (a Ray worker "
            "process importing torch, ray and mlflow; the MLflow child run; Tune checkpoints), "
            "so it is large against the seconds-long digits trials and small against real ones.\n\n"
            "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    return f"## Sweep overhead\n\nReproduce: `{cmd}`\n\n{body}\n"

# ---------------------------------------------------------------- many: an N-trial digits sweep

def _quiet() -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def _many_space(n: int, tmp: Path) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    space["name"] = f"bench_many{n}"
    space["train"]["epochs"] = 1
    space["noise"]["calib_samples"] = 64
    space["eval"] = {"T": [1, 2, 4, 8], "select_T": 4, "select_on": "val"}
    space["grid"] = {"noise.mode": ["qcfs", "layerwise"], "train.seed": list(range(max(1, n // 2)))}
    space["resources"] = {"cpu": 1, "gpu": 0, "max_concurrent": 2}
    p = tmp / f"bench_many{n}.yaml"
    p.write_text(yaml.safe_dump(space))
    return p


def run_many(n: int = 64, quick: bool = False) -> str:
    """Trials per minute and overhead per trial of an n-trial digits sweep, 2 at a time."""
    _quiet()
    import torch

    from harness.space import load_space
    from harness.train import run as train_run

    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-many-"))
    space_file = _many_space(n, tmp)
    s = load_space(space_file)
    n = s.n_trials

    # the same trials run directly, one thread, in a warm process (a warm-up run of each
    # mode first: imports, data cache, compiled kernels)
    direct = []
    for rep in range(2):
        for t in s.trials[:2]:
            cfg = t.cfg.model_copy(update={"train": t.cfg.train.model_copy(update={"threads": 1})})
            t0 = time.perf_counter()
            train_run(cfg, tmp / "direct" / f"{t.label}_{rep}", progress=False)
            if rep:
                direct.append(time.perf_counter() - t0)
    t_direct = statistics.mean(direct)

    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_ray = time.perf_counter() - t0
    from harness.sweep import SweepOptions, main as sweep_main
    uri = f"sqlite:///{tmp}/mlflow.db"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        rc = sweep_main(SweepOptions(str(space_file), tracking_uri=uri, storage_path=str(tmp / "ray_results")))
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    ray.shutdown()
    if rc != 0:
        raise SystemExit(f"the sweep failed (rc {rc}); see {tmp}")
    torch.set_num_threads(1)

    # where a trial's time goes, from its MLflow child run (the driver logs each epoch when
    # the trial reports it): start-up = child run created (Tune started the trial) -> epoch 1
    # logged, less the epoch's own time; final = last epoch logged -> run FINISHED (final
    # test at every T, the final report, the driver logging metrics, artifacts and model)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(s.name)
    kids = [r for r in c.search_runs([exp.experiment_id], max_results=10_000)
            if r.data.tags.get("harness.role") == "trial"]
    startup, final, life = [], [], []
    for r in kids:
        (ep,) = c.get_metric_history(r.info.run_id, "time/epoch_s")
        startup.append((ep.timestamp - r.info.start_time) / 1000 - ep.value)
        final.append((r.info.end_time - ep.timestamp) / 1000)
        life.append((r.info.end_time - r.info.start_time) / 1000)
    per_trial = wall * 2 / n - t_direct
    rows = [
        ("trials", f"{n} (digits, cnn_small, 1 epoch, calib 64, T up to 8), 1 CPU each, 2 at a time, "
                   f"calibration actor; {len(kids)} child runs, all "
                   f"{'FINISHED' if all(r.info.status == 'FINISHED' for r in kids) else 'NOT finished'}"),
        ("Ray start-up (ray.init, not in the sweep wall)", f"{t_ray:.1f} s"),
        ("sweep wall", f"{wall:.0f} s ({n / (wall / 60):.1f} trials per minute)"),
        ("direct train.run of one trial (warm process, 1 thread)", f"{t_direct:.1f} s"),
        ("**overhead per trial** (wall x 2 / trials - direct)", f"**{per_trial:.1f} s**"),
        ("median trial lifetime in MLflow (run created -> FINISHED)", f"{statistics.median(life):.1f} s"),
        ("median start-up (run created -> epoch 1 logged, less epoch_s)", f"{statistics.median(startup):.1f} s"),
        ("median final phase (epoch logged -> FINISHED)", f"{statistics.median(final):.1f} s"),
        ("load average (1 min) before / after the sweep", f"{load0:.1f} / {load1:.1f}"),
    ]
    cmd = "python benchmarks/sweep_overhead.py --part many" + (" --quick" if quick else "") + \
        (f" --trials {n}" if n != (8 if quick else 64) else "")
    return (f"### {n}-trial digits sweep: trials per minute and overhead per trial\n\nReproduce: `{cmd}`\n\n"
            "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")


# ---------------------------------------------------------------- logging: who writes MLflow

_LOG_ONE_EPOCH = r"""
import json, sys, time
t0 = time.perf_counter()
import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
t1 = time.perf_counter()
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name("bench_logging").experiment_id
t2 = time.perf_counter()
run = c.create_run(exp, run_name="probe")
t3 = time.perf_counter()
ts = int(time.time() * 1000)
c.log_batch(run.info.run_id, metrics=[Metric(k, float(v), ts, 1) for k, v in json.loads(sys.argv[2]).items()])
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "client": t2 - t1, "create_run": t3 - t2, "log_epoch": t4 - t3}))
"""


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_mlflow_server(backend: str, artifacts: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str, float]:
    """(process, URL, start-up seconds): `mlflow server` on 127.0.0.1, a free port, one
    worker, serving artifacts; ready when /health answers."""
    import urllib.request
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", backend, "--serve-artifacts",
                             "--artifacts-destination", str(artifacts)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _epoch_record(layers: list[str]) -> dict:
    rec = {"epoch": 1, "train_loss": 1.2, "train_acc": 60.0, "lr": 0.1, "ann_val_acc": 70.0, "ann_test_acc": 71.0,
           "epoch_s": 3.0, "train_s": 2.0, "calib_s": 0.3, "eval_s": 0.7, "snn_acc": [10.0, 30.0, 50.0, 60.0],
           "snn_split": "val"}
    for key in ("delta_trained", "delta_next", "residual_std", "residual_mean"):
        rec[key] = [0.01 * (i + 1) for i in range(len(layers))]
    return rec


def run_logging(quick: bool = False, reps: int | None = None) -> str:
    """(a) fresh process + SQLite, (b) fresh process + local server, (c) the driver's warm client."""
    _quiet()
    from harness import tracking
    reps = reps or (2 if quick else 5)
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-log-"))
    layers = ["features.2", "features.5", "features.9", "classifier.1"]
    rec = _epoch_record(layers)
    metrics = tracking.epoch_metrics(rec, layers)
    sqlite = f"sqlite:///{tmp}/mlflow.db"
    c = tracking.client(sqlite)
    exp = tracking.ensure_experiment(c, "bench_logging", sqlite)

    def fresh(uri: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _LOG_ONE_EPOCH, uri, json.dumps(metrics)], capture_output=True,
                             text=True, timeout=600)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def med(samples: list[dict]) -> dict:
        return {k: statistics.median(s[k] for s in samples) for k in samples[0]}

    a = med([fresh(sqlite) for _ in range(reps)])
    proc, url, t_server = start_mlflow_server(f"sqlite:///{tmp}/server.db", tmp / "server-artifacts")
    try:
        tracking.ensure_experiment(tracking.client(url), "bench_logging", url)
        b = med([fresh(url) for _ in range(reps)])
        cs = tracking.client(url)
        rid_s = cs.create_run(tracking.ensure_experiment(cs, "bench_logging", url)).info.run_id
        t0 = time.perf_counter()
        for i in range(20):
            tracking.log_epoch(cs, rid_s, {**rec, "epoch": i + 1}, layers)
        warm_server = (time.perf_counter() - t0) / 20
    finally:
        stop_server(proc)

    # (c) the driver: its client is warm; per trial it creates the child run and logs params,
    # then one record per epoch, then the final metrics, artifacts and model
    parent = tracking.create_parent(c, exp, "bench", Path(__file__))
    t0 = time.perf_counter()
    kids = [tracking.open_child(c, exp, parent, f"trial{i}", "NQ")[0] for i in range(10)]
    t_child = (time.perf_counter() - t0) / len(kids)
    t0 = time.perf_counter()
    for i in range(20):
        tracking.log_epoch(c, kids[0], {**rec, "epoch": i + 1}, layers)
    t_epoch = (time.perf_counter() - t0) / 20
    t_final, t_final_warm, t_model = _driver_final_cost(c, exp, parent, tmp)

    rows = [
        ("(a) fresh process, SQLite", a, None),
        ("(b) fresh process, local mlflow server (HTTP)", b, None),
    ]
    lines = ["| path | import mlflow | client + first query | create run | log one epoch | total |",
             "|---|---|---|---|---|---|"]
    for name, d, _ in rows:
        lines.append(f"| {name} | {d['import']:.2f} s | {d['client']:.2f} s | {d['create_run']:.3f} s | "
                     f"{d['log_epoch']:.3f} s | {sum(d.values()):.2f} s |")
    body = (f"One epoch = {len(metrics)} metrics (cnn_small: 4 layers, T up to 4). Medians of {reps} fresh "
            "processes for (a) and (b).\n\n" + "\n".join(lines) + "\n\n"
            "| measure | value |\n|---|---|\n"
            f"| (b) `mlflow server` start-up (1 worker, until /health answers) | {t_server:.1f} s |\n"
            f"| (b) log one epoch through the server, warm client | {1000 * warm_server:.1f} ms |\n"
            f"| (c) driver: create a child run (tags), warm client, SQLite | {1000 * t_child:.1f} ms per trial |\n"
            f"| (c) driver: log one epoch record (tracking.log_epoch), SQLite | {1000 * t_epoch:.1f} ms per record |\n"
            f"| (c) driver: final metrics + artifacts + curves.png + model (tracking.log_final), first trial | "
            f"{t_final:.2f} s |\n"
            f"| (c) driver: the same, every later trial (warm) | {t_final_warm:.2f} s per trial, of which the "
            f"model (mlflow.pytorch.log_model) {t_model:.2f} s |\n")
    cmd = "python benchmarks/sweep_overhead.py --part logging" + (" --quick" if quick else "")
    return f"### MLflow logging: trial-side vs driver-side\n\nReproduce: `{cmd}`\n\n{body}"


def _driver_final_cost(c, exp: str, parent: str, tmp: Path) -> tuple[float, float, float]:
    """Seconds of tracking.log_final for one real 1-epoch digits trial: the first call in
    the process (imports matplotlib and mlflow.pytorch), then warm (median of 3), and the
    warm cost of its model (mlflow.pytorch.log_model) alone."""
    from harness import tracking
    from harness.config import load_config
    from harness.train import run as train_run
    out = tmp / "trial"
    cfg = load_config(None, ["train.epochs=1", "noise.calib_samples=64", "eval.T=[1,2,4]", "eval.select_T=2",
                             "train.threads=1"])
    result = train_run(cfg, out, progress=False)
    times, model = [], []
    for i in range(4):
        rid = tracking.create_child(c, exp, parent, f"final{i}", "NQ")
        t0 = time.perf_counter()
        tracking.log_final(c, rid, result, out)
        times.append(time.perf_counter() - t0)
        if i:
            t0 = time.perf_counter()
            tracking.log_model(c, rid, result, out / "best.pt")
            model.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), statistics.median(model)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib-calls", type=int, default=10)
    ap.add_argument("--part", default="pair,many,logging", help="comma-separated: pair, many, logging")
    ap.add_argument("--trials", type=int, default=None, help="trials of the `many` part (default 64; --quick 8)")
    a = ap.parse_args()
    print(run(a.quick, calib_calls=a.calib_calls, parts=a.part, trials=a.trials))


if __name__ == "__main__":
    main()
