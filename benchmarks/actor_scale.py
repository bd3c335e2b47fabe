"""The shared calibration actor under 1, 2, 4 and 8 simulated concurrent trials, against
local calibration (ResNet-20, tau = 4).

    python benchmarks/actor_scale.py [--quick] [--threads N]

A simulated trial is a Ray task that holds a ResNet-20 and calibrates it back to back
(closed loop, no training in between: the worst case for queueing), either through
`ActorCalibrator` (the shared actor, `start_actor` as the sweep driver starts it, with
1 torch thread per compute slot, as a 1-CPU trial would lend it) or with its own
`LocalCalibrator` (1 torch thread, in its own process). Every trial makes one untimed
warm-up call, waits at a barrier, then makes `calls` timed calls; every (trials,
setting) pair runs `reps` times, interleaved. Reported per setting: throughput (median
over the runs of calibrations per second between the first timed call's start and the
last one's end; and images per second), the actor's queueing delay per call (p50, p95:
from the trial's submission to the start of the computation) and computing time, and
the round trip the trial waits. `--threads` is the number of CPUs Ray is given.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, command, main, section, table

SCRIPT = "actor_scale.py"
TITLE = "Calibration actor at scale"
TAU = 4
LEVELS = (1, 2, 4, 8)
QUICK = dict(images=64, calls=2, reps=2, slots=(1, 2), batch=64, levels=LEVELS)
# 250 images in batches of 125: one 500-image batch at tau = 4 peaked at about 2 GB per
# calibration, and 8 local trials plus actors of 1, 2 and 4 slots then ran a 24 GB
# machine out of memory (the kernel killed an actor). 2 slots at most on 2 CPUs. 8
# concurrent trials fit again since the actor trims its heap after every call (its RSS
# grew by about 0.1 GB per calibration to 7 GB before; see reports/reliability.md).
FULL = dict(images=250, calls=3, reps=2, slots=(1, 2), batch=125, levels=LEVELS)


def _config(images: int, batch: int):
    from harness.config import load_config

    # synthetic data: the actor and local trials load the same split; 10% of 5,000 for validation
    return load_config(None, ["model.arch=resnet20", f"noise.tau={TAU}", "data.name=synthetic",
                              "data.synthetic.num_train=5000", "data.val_fraction=0.1",
                              f"noise.calib_samples={images}", f"data.eval_batch_size={batch}"])


def _trial(index: int, mode: str, cfg_dict: dict, spec: dict, calls: int, barrier, actor: str | None) -> list[dict]:
    """One simulated trial (runs as a Ray task): warm-up, barrier, `calls` timed calls."""
    import ray
    import torch

    import harness
    from harness.actor import ActorCalibrator, data_key
    from harness.calibration import LocalCalibrator
    from harness.config import Config
    from harness.data import CalibrationSet, load_dataset

    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict)
    torch.manual_seed(index)
    model = harness.create_model(**spec)
    if mode == "local":
        data = load_dataset(cfg.data, cfg.train.seed)
        cal = LocalCalibrator(CalibrationSet.from_dataset(data, cfg.resolved(data.image_size)),
                              cfg.data.eval_batch_size)
    else:
        cal = ActorCalibrator(actor, data_key(cfg), spec, cfg.data.eval_batch_size)
    trial_id = f"{mode}-{index}"
    cal.calibrate(model, tau=TAU, trial_id=trial_id, epoch=0)  # warm-up: kernels compiled in this process
    ray.get(barrier.wait.remote())
    out = []
    for epoch in range(1, calls + 1):
        t0 = time.time()
        cal.calibrate(model, tau=TAU, trial_id=trial_id, epoch=epoch)
        t1 = time.time()
        rec = {"start": t0, "end": t1, "round_trip_s": t1 - t0}
        if mode == "local":
            rec.update(queue_s=0.0, compute_s=t1 - t0)
        else:
            t = cal.timing(epoch)
            rec.update(queue_s=t["queue_s"], compute_s=t["compute_s"])
        out.append(rec)
    return out


class _Barrier:
    def __init__(self, n: int):
        import asyncio
        self.n, self.count, self.event = n, 0, asyncio.Event()

    async def wait(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.event.set()
        await self.event.wait()


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


def run(quick: bool, threads: int) -> str:
    import ray

    from harness.actor import actor_name, data_key, model_spec, start_actor
    from harness.data import load_dataset

    spec_ = QUICK if quick else FULL
    cmd = command(SCRIPT, quick, threads)
    cfg = _config(spec_["images"], spec_["batch"])
    data = load_dataset(cfg.data, cfg.train.seed)  # fills the dataset cache before the workers start
    cfg = cfg.resolved(data.image_size)
    mspec = model_spec(cfg, data.num_classes, data.in_chans)
    # Ray workers import this checkout's harness
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=threads, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True)
    ray_s = time.perf_counter() - t0
    trial = ray.remote(num_cpus=0, max_retries=0)(_trial)
    barrier_cls = ray.remote(num_cpus=0)(_Barrier)
    hist_dir = Path(tempfile.mkdtemp(prefix="harness-actor-scale-"))
    settings = [("local", None)] + [("actor", s) for s in spec_["slots"]]
    raw: dict = {}
    load = os.getloadavg()
    try:
        names, handles = {}, []  # a named actor lives as long as a handle to it does
        for slots in spec_["slots"]:
            names[slots] = actor_name(f"bench-{slots}")
            handles.append(start_actor(names[slots], {data_key(cfg): cfg.to_dict()}, cpu=0, max_concurrency=slots,
                                       threads=1, history_dir=hist_dir / f"slots{slots}")[0])
        # repetitions of every (level, setting), interleaved: drifting background load hits all alike
        for rep in range(spec_["reps"]):
            for n in spec_["levels"]:
                order = settings[rep % len(settings):] + settings[:rep % len(settings)]
                for mode, slots in order:
                    barrier = barrier_cls.remote(n)
                    recs = sum(ray.get([trial.remote(i, mode, cfg.to_dict(), mspec, spec_["calls"], barrier,
                                                     names.get(slots)) for i in range(n)]), [])
                    span = max(r["end"] for r in recs) - min(r["start"] for r in recs)
                    d = raw.setdefault((mode, slots, n), dict(calls=0, rates=[], q=[], c=[], rt=[]))
                    d["calls"] += len(recs)
                    d["rates"].append(len(recs) / span)
                    d["q"] += [r["queue_s"] for r in recs]
                    d["c"] += [r["compute_s"] for r in recs]
                    d["rt"] += [r["round_trip_s"] for r in recs]
    finally:
        ray.shutdown()
        shutil.rmtree(hist_dir, ignore_errors=True)
    rows = []
    for mode, slots in settings:
        for n in spec_["levels"]:
            d = raw[(mode, slots, n)]
            rate = statistics.median(d["rates"])
            label = "local (own process, 1 thread)" if mode == "local" else \
                f"actor, {slots} compute slot{'s' if slots > 1 else ''} × 1 thread"
            rows.append([label, n, d["calls"], f"{rate:.2f}", f"{rate * spec_['images']:.0f}",
                         "—" if mode == "local" else f"{_pct(d['q'], 0.5):.2f}",
                         "—" if mode == "local" else f"{_pct(d['q'], 0.95):.2f}",
                         f"{statistics.median(d['c']):.2f}", f"{statistics.median(d['rt']):.2f}"])
    verdict = _verdict(raw, spec_)
    body = (f"ResNet-20, τ = {TAU}, {spec_['images']} calibration images per call (synthetic 32×32, in batches of {spec_['batch']}, each simulated in chunks of up to 128 on CPU: a batch of 500 at τ = 4 peaked near 2 GB per calibration, and 8 concurrent local trials exhausted this machine's memory in the first full run), "
            f"{threads} CPUs for Ray (ray.init {ray_s:.0f} s, untimed); load average at start "
            f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs. Simulated trials are closed loops "
            f"of {spec_['calls']} timed calls each after one warm-up call, started together at a barrier, "
            "no training in between (worst-case contention). Every (trials, setting) pair ran "
            f"{spec_['reps']} times, interleaved; calls/s is the median over those runs of calls / (last end − "
            "first start), the time columns pool every call. Queueing: from the trial's submission to the "
            "start of the computation in the actor (Ray's queue, the state dict's transfer, the wait for a "
            "compute slot); compute: the actor's (or the local call's) time; round trip: what the trial "
            "waits.\n\n"
            + table(["calibration", "concurrent trials", "calls", "calls/s", "images/s", "queue p50 s",
                     "queue p95 s", "compute p50 s", "round trip p50 s"], rows)
            + f"\n\n{verdict}")
    return section(TITLE, cmd, body)


def _verdict(raw: dict, spec_: dict) -> str:
    """One sentence from the numbers: where the best actor setting keeps up with local."""
    lines = []
    for n in spec_["levels"]:
        local = raw[("local", None, n)]
        best = max(statistics.median(raw[("actor", s, n)]["rates"]) for s in spec_["slots"])
        ratio = best / statistics.median(local["rates"])
        lines.append(f"{n}: {ratio:.2f}×")
    return ("Throughput of the best actor setting relative to local calibration, by concurrent trials: "
            + ", ".join(lines) + ".")


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
