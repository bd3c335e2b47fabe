"""Memory of a long-lived calibration actor: RSS after pairs of concurrent calibrations,
with glibc's default allocator settings and two alternatives.

    python benchmarks/actor_memory.py [--pairs N] [--trials N]

One `CalibrationActor(slots=2)` in a fresh process per setting (no Ray: the plain class,
as the Ray actor runs it), ResNet-20 with random weights, 250 synthetic 32x32 images in
batches of 125, tau = 4; N pairs (default 8) of calls sent from two threads at once. The
settings: glibc's defaults; `malloc_trim(0)` after every call; and
`MALLOC_MMAP_THRESHOLD_=131072` (every allocation over 128 KiB mmapped, so freed
tensors leave the RSS). Prints a Markdown table: RSS after the first pair, after half
the pairs and after all of them, and the wall time of all pairs.

Second table: a reused Ray trial worker, which Tune hands one trial after another
(`reuse_actors=True`). N (default 6) `harness.train.run` trials in one fresh process, one
thread, ResNet-20 on 2,000 synthetic images, 1 epoch, local calibration on 250 images;
RSS after each trial, with glibc's defaults and with `harness.memory.release_freed_memory()`
after each trial (what `harness.trainable.train_trial` does).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import ctypes, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
import harness
from benchmarks.actor_scale import _config
from harness.actor import CalibrationActor, data_key, model_spec
from harness.data import load_dataset

pairs, trim = int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(1)
cfg = _config(250, 125)
data = load_dataset(cfg.data, cfg.train.seed)
cfg = cfg.resolved(data.image_size)
spec = model_spec(cfg, data.num_classes, data.in_chans)
actor = CalibrationActor({data_key(cfg): cfg.to_dict()}, slots=2)
libc = ctypes.CDLL("libc.so.6") if trim else None
if not trim:  # the actor trims after every call since this benchmark: off for the baseline
    import harness.actor
    harness.actor.release_freed_memory = lambda: None

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))

def call(i):
    torch.manual_seed(i)
    m = harness.create_model(**spec)
    actor.calibrate(spec, m.state_dict(), 4, data_key(cfg), f"t{i}", i, 125)
    if libc is not None:
        libc.malloc_trim(0)

rss, t0 = [], time.perf_counter()
for k in range(pairs):
    ts = [threading.Thread(target=call, args=(2 * k + j,)) for j in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rss.append(rss_mb())
print(json.dumps({"rss": rss, "wall": time.perf_counter() - t0}))
"""

_TRIALS = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from harness.config import load_config
from harness.memory import release_freed_memory
from harness.train import run

n, trim = int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(1)

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))

rss, t0, tmp = [], time.perf_counter(), Path(tempfile.mkdtemp(prefix="harness-bench-trials-"))
for i in range(n):
    cfg = load_config(None, ["model.arch=resnet20", "data.name=synthetic", "data.synthetic.num_train=2000",
                             "train.epochs=1", "train.threads=1", f"train.seed={i}", "noise.calib_samples=250",
                             "eval.T=[1,2,4]", "eval.select_T=4"])
    run(cfg, tmp / f"t{i}", progress=False)
    if trim:
        release_freed_memory()
    rss.append(rss_mb())
print(json.dumps({"rss": rss, "wall": time.perf_counter() - t0}))
"""

SETTINGS = [("glibc defaults", {}, False),
            ("`malloc_trim(0)` after every call", {}, True),
            ("`MALLOC_MMAP_THRESHOLD_=131072`", {"MALLOC_MMAP_THRESHOLD_": "131072"}, False)]


def run(pairs: int = 8) -> str:
    rows = []
    for name, env, trim in SETTINGS:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(pairs), "1" if trim else "0"],
                              env={**os.environ, **env}, capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        r = res["rss"]
        rows.append(f"| {name} | {r[0]:,} / {r[len(r) // 2 - 1]:,} / {r[-1]:,} MB | {res['wall']:.1f} s |")
    half = pairs // 2
    return "\n".join([f"| allocator setting | RSS after 1 / {half} / {pairs} pairs | wall of {pairs} pairs |",
                      "|---|---|---|", *rows])


def run_trials(n: int = 6) -> str:
    rows = []
    for name, trim in (("glibc defaults", False), ("`release_freed_memory()` after each trial", True)):
        proc = subprocess.run([sys.executable, "-c", _TRIALS, str(ROOT), str(n), "1" if trim else "0"],
                              capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(f"| {name} | {' / '.join(f'{r:,}' for r in res['rss'])} MB | {res['wall']:.1f} s |")
    return "\n".join([f"| trial worker (one process, {n} trials) | RSS after each trial | wall |",
                      "|---|---|---|", *rows])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--trials", type=int, default=6)
    a = p.parse_args()
    print(run(a.pairs))
    print()
    print(run_trials(a.trials))
