"""`harness report` at sweep scale: wall time and peak memory on synthetic child runs.

    python benchmarks/report_scale.py [--quick] [--runs N] [--epochs E] [--src DIR]
                                      [--per-trial] [--keep DIR]

Builds a temporary sqlite MLflow store (not timed) with one experiment, one parent run
and N child runs (default 1,000; --quick: 60) carrying what the trials log: the
Config.flat() params, every per-epoch metric (train/*, ann/*, snn/val_acc_T01…T04,
delta/ and delta_next/ and residual/{mean,std}/ per layer, time/*) for E epochs
(default 20), the final/ metrics, and the residual_hist.json and result.json artifacts.
The grid: CIFAR-10 and CIFAR-100 x VGG-16, ResNet-18, ResNet-20 x 5 seeds x (QCFS at
L = 2…32, NQ at L = 2…32 x tau = 1…8, NQ-fixed at 8 values of delta), 1% of the runs
FAILED. Runs, params and tags go through MlflowClient; the metric rows are written with
one executemany into the `metrics` and `latest_metrics` tables MLflow created.

Then `harness report --experiment … --out …` runs in a fresh Python process (as from
the command line), twice: as shipped (the figures drawn by forked workers, one per CPU)
and with --jobs 1 (all in one process). Its wall and CPU time (wait4 rusage, workers
included), the peak memory of the process tree (sum of PSS, sampled) and of its largest
process (RSS) are reported with the time of each phase (import, reading the runs,
writing tables and figures, attaching) and the files written. --keep DIR keeps the store
and reuses it on the next run with the same --runs/--epochs.  --src DIR imports `harness`
from another checkout (e.g. an older commit, for a before/after comparison).  Target:
<= 10 s and <= 500 MB for 1,000 runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, section, table, target

SCRIPT = "report_scale.py"
TITLE = "Report at sweep scale"
TARGET_S, TARGET_MB = 10.0, 500.0
FULL = dict(runs=1000, epochs=20)
QUICK = dict(runs=60, epochs=5)
EXPERIMENT = "scale_sweep"
BUILDER = 2    # bump when build_store changes what it writes (a kept store is rebuilt)
TS = (1, 2, 4, 8, 16, 32, 64)
LAYERS = {"vgg16": 15, "resnet18": 17, "resnet20": 19}
MODE = {"QCFS": "qcfs", "NQ": "layerwise", "NQ-fixed": "fixed"}


def grid(n_runs: int) -> list[dict]:
    """The trial settings, in sweep order, cut to n_runs (the last 1% FAILED)."""
    variants = ([("QCFS", {"model.L": L}) for L in (2, 4, 8, 16, 32)]
                + [("NQ", {"model.L": L, "noise.tau": tau}) for L in (2, 4, 8, 16, 32)
                   for tau in (1, 2, 4, 8)]
                + [("NQ-fixed", {"noise.delta": d}) for d in (0.05, 0.1, 0.2, 0.3, 0.4, 0.6,
                                                              0.8, 1.0)])
    out = []
    while len(out) < n_runs:
        for ds in ("cifar10", "cifar100"):
            for arch in LAYERS:
                for method, settings in variants:
                    for seed in range(5):
                        out.append({"dataset": ds, "arch": arch, "method": method,
                                    "seed": seed + 5 * (len(out) // 990), **settings})
    out = out[:n_runs]
    n_failed = max(1, n_runs // 100)
    for rec in out[-n_failed:]:
        rec["status"] = "FAILED"
    return out


def _params(t: dict, epochs: int) -> dict[str, str]:
    L = t.get("model.L", 4)
    return {"data.name": t["dataset"], "data.root": f"/data/{t['dataset']}",
            "data.eval_batch_size": "512", "data.download": "False",
            "model.arch": t["arch"], "model.L": str(L), "model.lam_init": "8.0",
            "model.grad": "nq", "noise.mode": MODE[t["method"]],
            "noise.delta": str(t.get("noise.delta", 0.0)), "noise.tau": str(t.get("noise.tau", 4)),
            "noise.residual": "end_to_end", "noise.scale": "1.0", "noise.calib_augment": "True",
            "calib.n_images": "512", "calib.class_counts": ",".join(["51"] * 10),
            "train.epochs": str(epochs), "train.lr": "0.1", "train.seed": str(t["seed"]),
            "train.threads": "1", "eval.T": ",".join(map(str, TS)), "eval.select_T": "4",
            "eval.select_on": "val"}


def _metric_rows(t: dict, run_id: str, epochs: int, rng) -> list[tuple]:
    """(key, value, timestamp, run_uuid, step, is_nan) for one run."""
    import numpy as np

    method, n_layers = t["method"], LAYERS[t["arch"]]
    names = [f"l{i:02d}_layer{i}.act" for i in range(n_layers)]
    ann_final = (93.0 if t["dataset"] == "cifar10" else 72.0) + rng.normal(0, 0.5) \
        - (1.0 if method != "QCFS" else 0.0)
    rows, ts0 = [], 1_700_000_000_000
    best_epoch = int(rng.integers(max(1, epochs - 3), epochs + 1))
    for ep in range(1, epochs + 1):
        frac = ep / epochs
        ann = ann_final - 20 * (1 - frac) + rng.normal(0, 0.3)
        calib = 1.5 if method == "NQ" else 0.2 if method == "QCFS" else 0.0
        vals = {"train/loss": 2.0 / ep, "train/acc": ann + 3, "train/lr": 0.1 * (1 - frac),
                "ann/val_acc": ann + rng.normal(0, 0.3), "ann/test_acc": ann,
                "time/train_s": 20.0 + (25.0 if ep == 1 else 0.0), "time/calib_s": calib,
                "time/eval_s": 2.0, "time/epoch_s": 22.0 + calib + (25.0 if ep == 1 else 0.0)}
        if method != "QCFS":
            vals["ann/noisy_test_acc"] = ann - 4
        for T in (1, 2, 3, 4):
            vals[f"snn/val_acc_T{T:02d}"] = ann - 40 / T + rng.normal(0, 1)
        for i, name in enumerate(names):
            d = 0.0 if method == "QCFS" else float(t.get("noise.delta", 0.1 * (i + 1) / n_layers))
            vals[f"delta/{name}"] = d
            vals[f"delta_next/{name}"] = d * 1.05
            vals[f"residual/std/{name}"] = 0.3 + 0.01 * i
            vals[f"residual/mean/{name}"] = 0.01
        rows += [(k, float(v), ts0 + ep, run_id, ep, 0) for k, v in vals.items()]
    for i, T in enumerate(TS):
        acc = min(ann_final, ann_final - 45 / T + rng.normal(0, 1))
        rows.append((f"final/snn_test_acc_T{T:02d}", acc, ts0 + 999, run_id, 0, 0))
        rows.append(("final/snn_test_acc_by_T", acc, ts0 + 999, run_id, T, 0))
    rows += [("final/ann_test_acc", ann_final, ts0 + 999, run_id, 0, 0),
             ("final/ann_val_acc", ann_final - 0.3, ts0 + 999, run_id, 0, 0),
             ("final/best_epoch", float(best_epoch), ts0 + 999, run_id, 0, 0)]
    if method != "QCFS":
        rows.append(("final/ann_noisy_test_acc", ann_final - 4, ts0 + 999, run_id, 0, 0))
    # the energy block, as harness.tracking.energy_metrics logs it
    ann_macs = {"vgg16": 313e6, "resnet18": 557e6, "resnet20": 41e6}[t["arch"]]
    ann_uj = ann_macs * 4.6e-6
    rows += [("energy/ann_uJ", ann_uj, ts0 + 999, run_id, 0, 0),
             ("energy/ann_macs", ann_macs, ts0 + 999, run_id, 0, 0),
             ("energy/first_layer_macs", ann_macs / 20, ts0 + 999, run_id, 0, 0)]
    for T in TS:
        rate = 0.12 + rng.normal(0, 0.01)
        sops = rate * ann_macs * T
        uj = sops * 0.9e-6 + T * ann_macs / 20 * 4.6e-6
        rec = {"sops": sops, "spikes": sops / 9, "uJ": uj, "ratio_to_ann": uj / ann_uj,
               "firing_rate": rate}
        for key, v in rec.items():
            rows.append((f"energy/{key}_T{T:02d}", v, ts0 + 999, run_id, 0, 0))
            rows.append((f"energy/{key}_by_T", v, ts0 + 999, run_id, T, 0))
        for name in names:
            rows.append((f"energy/firing_rate/{name}", rate, ts0 + 999, run_id, T, 0))
    return rows


def _hist(t: dict, rng) -> dict:
    import numpy as np

    n_layers = LAYERS[t["arch"]]
    edges = np.linspace(-1, 1, 81)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 0.08 if t["method"] == "NQ" else 0.15
    counts = []
    for i in range(n_layers):
        c = np.exp(-0.5 * (centers / (width + 0.005 * i)) ** 2) * 10000
        c[40] += 50000                             # the exact-zero bin
        counts.append([int(v) for v in c + rng.integers(0, 20, size=c.size)])
    return {"layers": [f"layer{i}.act" for i in range(n_layers)], "lam": [2.0] * n_layers,
            "edges": edges.tolist(), "edges_unit": "residual / lambda", "counts": counts,
            "counts_by_residual": {"end_to_end": counts, "layer_local": counts},
            "mean": [0.01] * n_layers, "std": [width] * n_layers, "residual": "end_to_end",
            "tau": int(t.get("noise.tau", 4)), "n_images": 512}


def build_store(root: Path, n_runs: int, epochs: int) -> tuple[str, dict]:
    """The sqlite store under root; returns (tracking URI, facts about it)."""
    import logging

    import numpy as np
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    pid = client.create_run(exp_id, tags={"harness.role": "parent"}).info.run_id
    rng = np.random.default_rng(0)
    rows: list[tuple] = []
    statuses: list[tuple[str, str]] = []
    trials = grid(n_runs)
    for t in trials:
        name = (f"{t['dataset']}_{t['arch']}_{t['method']}_L{t.get('model.L', 4)}"
                f"_tau{t.get('noise.tau', 4)}_d{t.get('noise.delta', 0)}_s{t['seed']}")
        run = client.create_run(exp_id, run_name=name, tags={
            "mlflow.parentRunId": pid, "harness.role": "trial", "harness.trial": name,
            "harness.method": t["method"]})
        rid = run.info.run_id
        client.log_batch(rid, params=[Param(k, v) for k, v in _params(t, epochs).items()],
                         tags=[RunTag("mlflow.runName", name)])
        rows += _metric_rows(t, rid, epochs, rng)
        art = Path(run.info.artifact_uri.removeprefix("file://"))
        art.mkdir(parents=True, exist_ok=True)
        (art / "residual_hist.json").write_text(json.dumps(_hist(t, rng)))
        (art / "result.json").write_text(json.dumps({"method": t["method"], "seed": t["seed"]}))
        statuses.append((t.get("status", "FINISHED"), rid))
    con = sqlite3.connect(db)
    with con:
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                        "VALUES (?, ?, ?, ?, ?, ?)", rows)
        latest: dict[tuple[str, str], tuple] = {}
        for r in rows:      # latest = largest (step, timestamp), as MLflow keeps it
            k = (r[3], r[0])
            if k not in latest or (r[4], r[2]) >= (latest[k][4], latest[k][2]):
                latest[k] = r
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, "
                        "run_uuid) VALUES (?, ?, ?, ?, ?, ?)",
                        [(r[0], r[1], r[2], r[4], r[5], r[3]) for r in latest.values()])
        con.executemany("UPDATE runs SET status = ?, end_time = start_time + 1000, "
                        "lifecycle_stage = 'active' WHERE run_uuid = ?", statuses)
        con.execute("UPDATE runs SET status = 'FINISHED' WHERE run_uuid = ?", (pid,))
    con.close()
    return uri, {"runs": len(trials), "epochs": epochs, "metric_rows": len(rows),
                 "db_mb": db.stat().st_size / 2**20}


def build_store_in_subprocess(root: Path, n_runs: int, epochs: int) -> tuple[str, dict]:
    """:func:`build_store` in another process: this one stays small, so that the report
    process it starts does not begin with its memory (a fork's RSS counts in the
    child's peak RSS until exec)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.report_scale import build_store; from pathlib import Path; "
            "print(json.dumps(build_store(Path(sys.argv[2]), int(sys.argv[3]), "
            "int(sys.argv[4]))))")
    stamp = root / "facts.json"
    if stamp.exists():          # a kept store of the same spec and builder: reuse it
        uri, facts = json.loads(stamp.read_text())
        if (facts.get("runs"), facts.get("epochs"), facts.get("builder")) == (
                n_runs, epochs, BUILDER) and (root / "mlflow.db").exists():
            return uri, {**facts, "reused": True}
    if root.exists():
        shutil.rmtree(root)
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(root), str(n_runs),
                           str(epochs)], capture_output=True, text=True, check=True)
    uri, facts = json.loads(proc.stdout.strip().splitlines()[-1])
    facts["builder"] = BUILDER
    stamp.write_text(json.dumps([uri, facts]))
    return uri, facts


_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import harness.cli as main_cli
import harness.report.cli as cli
phases = {}
def timed(name, fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    return wrap
cli.collect = timed("read", cli.collect)
if hasattr(cli, "_ReportJobs"):     # the rest of the tables and figures, and index.md
    cli._ReportJobs.finish = timed("write", cli._ReportJobs.finish)
else:
    cli.write_report = timed("write", cli.write_report)
if hasattr(cli, "_attach"):
    cli._attach = timed("attach", cli._attach)
t_import = time.perf_counter() - t0
rc = main_cli.main(["report", *sys.argv[2:]])
phases["import"] = t_import
phases["total"] = time.perf_counter() - t0
phases["torch_imported"] = "torch" in sys.modules
phases["mlflow_imported"] = "mlflow" in sys.modules
print("PHASES " + json.dumps(phases))
sys.exit(rc)
"""


class _TreeMemory:
    """Peak memory of a process and all its descendants (the forked figure workers):
    the sum of their proportional set sizes (PSS, /proc/<pid>/smaps_rollup; pages shared
    by fork are split between the sharers, so the sum is the tree's real footprint),
    sampled every 20 ms in a thread. ``peak_mb`` is NaN where /proc has no PSS."""

    def __init__(self, pid: int, every_s: float = 0.02):
        import threading
        self.pid, self.every_s, self.peak_mb, self.max_procs = pid, every_s, float("nan"), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return pids

    @staticmethod
    def _pss_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = self._tree()
            kb = sum(self._pss_kb(p) for p in pids)
            if kb:
                mb = kb / 1024
                self.peak_mb = mb if self.peak_mb != self.peak_mb else max(self.peak_mb, mb)
                self.max_procs = max(self.max_procs, len(pids))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_report(uri: str, out: Path, src: Path, extra: list[str], memory: bool = False) -> dict:
    """`harness report` in a fresh process: wall and CPU s (user + system of it and its
    reaped children), peak RSS MB (its largest process), phases, files; with ``memory``
    also the peak PSS MB of the process tree (the sampler slows the report down by
    about 10%: time and memory come from separate runs)."""
    shutil.rmtree(out, ignore_errors=True)     # no file of an earlier run is counted
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", _CHILD, str(src), "--experiment", EXPERIMENT,
           "--tracking-uri", uri, "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(out.parent))
    sampler = _TreeMemory(proc.pid) if memory else None
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if sampler is not None:
        sampler.stop()
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    phases = {}
    for line in stdout.splitlines():
        if line.startswith("PHASES "):
            phases = json.loads(line[len("PHASES "):])
    files = list(out.iterdir()) if out.exists() else []
    return {"rc": rc, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024,
            "pss_mb": sampler.peak_mb if sampler else float("nan"),
            "procs": sampler.max_procs if sampler else 0, "phases": phases,
            "png": sum(p.suffix == ".png" for p in files),
            "pdf": sum(p.suffix == ".pdf" for p in files), "files": len(files),
            "stderr": stderr.strip().splitlines()[-3:]}


def run(quick: bool = False, threads: int = 2, runs: int | None = None,
        epochs: int | None = None, src: str | None = None, per_trial: bool = False,
        keep: str | None = None) -> str:
    """The Markdown section (threads: unused). Two measurements on the same store, side
    by side: ``harness report`` as shipped (figures drawn by forked workers, as many as
    the CPUs) and with ``--jobs 1`` (every figure in the one process); with ``src``, the
    other checkout as shipped only."""
    from harness.report.cli import default_jobs

    spec = dict(QUICK if quick else FULL)
    if runs:
        spec["runs"] = runs
    if epochs:
        spec["epochs"] = epochs
    src_dir = Path(src).resolve() if src else ROOT
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="harness-report-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    extra = ["--per-trial"] if per_trial else []
    jobs = default_jobs()
    try:
        t0 = time.perf_counter()
        uri, facts = build_store_in_subprocess(tmp / "store", spec["runs"], spec["epochs"])
        t_build = time.perf_counter() - t0
        load0 = os.getloadavg()
        variants = {f"as shipped (--jobs {jobs} by default)" if not src else "as shipped": extra}
        if not src:
            variants["--jobs 1"] = [*extra, "--jobs", "1"]
        results = {}
        for name, args in variants.items():   # timed without the memory sampler, then sampled
            timed = run_report(uri, tmp / "report", src_dir, args)
            sampled = run_report(uri, tmp / "report", src_dir, args, memory=True)
            results[name] = {**timed, "pss_mb": sampled["pss_mb"], "procs": sampled["procs"],
                             "rc": timed["rc"] or sampled["rc"]}
        load1 = os.getloadavg()
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cmd = "python benchmarks/report_scale.py" + (" --quick" if quick else "") + (
        f" --runs {runs}" if runs else "") + (f" --epochs {epochs}" if epochs else "") + (
        " --per-trial" if per_trial else "") + (f" --src {src}" if src else "")
    n_fin = facts["runs"] - max(1, facts["runs"] // 100)
    body = [f"Synthetic sweep: {facts['runs']:,} child runs ({n_fin:,} FINISHED) x "
            f"{facts['epochs']} epochs, {facts['metric_rows']:,} metric rows (every per-epoch "
            "metric, the final and energy metrics), sqlite store "
            f"{facts['db_mb']:.0f} MB ("
            + ("kept from an earlier build, " if facts.get("reused") else
               f"built in {t_build:.0f} s, ") + "not timed). "
            f"`harness report` ({'with' if per_trial else 'without'} `--per-trial`) in a "
            "fresh process" + (f", code from `{src}`" if src else "") + f"; load average "
            f"{load0[0]:.1f} before, {load1[0]:.1f} after. Wall: the whole command, Python "
            "start-up included. CPU: user + system time of the process and its figure "
            "workers. Memory, from a second run of the same command (sampling slows it by about "
            "10%): the peak of the sum of the proportional set sizes (PSS) of the "
            "process and its workers (pages shared by fork are counted once, split between "
            "the sharers), sampled every 20 ms; beside it the peak RSS of the largest single "
            "process (wait4; a process forked from a large parent counts the parent's RSS "
            "until it execs). The 500 MB target is judged on the PSS sum. Phases: read = the runs and "
            "metric histories from the store (the tables and the run-level figures are "
            "already being drawn by the workers meanwhile); write = the rest of the figures, "
            "and index.md; attach = the tables and index.md into the parent run's artifacts.", ""]
    headers = ["", "wall (s)", "CPU (s)", "peak PSS, all processes (MB)",
               "peak RSS, largest process (MB)", "import (s)", "read (s)", "write (s)",
               "attach (s)", "files", f"≤ {TARGET_S:g} s", f"≤ {TARGET_MB:g} MB"]
    rows = []
    nan = float("nan")
    for name, res in results.items():
        ph = res["phases"]
        if res["rc"] != 0:
            body.append(f"**{name}: failed** (exit status {res['rc']}): "
                        f"{' / '.join(res['stderr'])}")
        mem = res["pss_mb"] if res["pss_mb"] == res["pss_mb"] else res["rss_mb"]
        rows.append((name, f"{res['wall']:.1f}", f"{res['cpu']:.1f}",
                     f"{res['pss_mb']:.0f} ({res['procs']} processes)", f"{res['rss_mb']:.0f}",
                     f"{ph.get('import', nan):.1f}", f"{ph.get('read', nan):.1f}",
                     f"{ph.get('write', nan):.1f}", f"{ph.get('attach', nan):.2f}",
                     f"{res['png']} PNG + {res['pdf']} PDF, {res['files']} in all",
                     *(("failed", "failed") if res["rc"] != 0 else
                       (target(res["wall"] <= TARGET_S), target(mem <= TARGET_MB))
                       if facts["runs"] >= FULL["runs"] else ("n/a", "n/a"))))
    body.append(table(headers, rows))
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        body.append(f"\nWall time of `--jobs 1` / as shipped: **{rb['wall'] / ra['wall']:.2f}×** "
                    f"(CPU time {rb['cpu'] / ra['cpu']:.2f}×).")
    if facts["runs"] < FULL["runs"]:
        body.append(f"\nThe targets are for {FULL['runs']:,} runs (n/a here).")
    return section(TITLE, cmd, "\n".join(body))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="60 runs x 5 epochs")
    p.add_argument("--threads", type=int, default=2, help="unused (run_all compatibility)")
    p.add_argument("--runs", type=int, default=None, help="child runs (default 1000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20)")
    p.add_argument("--src", default=None, help="import harness from this checkout")
    p.add_argument("--per-trial", action="store_true", help="pass --per-trial to the report")
    p.add_argument("--keep", default=None, help="build the store and report here, keep them")
    a = p.parse_args(argv)
    text = run(a.quick, a.threads, a.runs, a.epochs, a.src, a.per_trial, a.keep)
    print(text)
    return text


if __name__ == "__main__":
    main()
