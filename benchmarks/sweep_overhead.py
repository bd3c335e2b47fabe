"""Overhead of `harness sweep` (Ray Tune + MLflow + the calibration actor) over plain
`harness.train.run` calls, on two quickstart trials (QCFS and NQ, seed 0).

    python benchmarks/sweep_overhead.py [--quick]

1. direct: the two trials run one after the other with train.run (1 thread each)
2. sweep:  the same two trials through harness.sweep.main with max_concurrent 1 (so the
           walls compare), Ray started beforehand and timed separately
3. calibration: per-call time of ActorCalibrator (state dict to the actor and back) vs
           LocalCalibrator on the same model
Prints a Markdown table. --quick: 2 epochs and 64 calibration images instead of the
quickstart's 8 epochs and the whole validation split.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(quick: bool = False, threads: int = 2, calib_calls: int = 10) -> str:
    """The Markdown section (threads: unused, each trial runs on 1 CPU)."""
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
    n_calib = len(local.images)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib-calls", type=int, default=10)
    a = ap.parse_args()
    print(run(a.quick, calib_calls=a.calib_calls))


if __name__ == "__main__":
    main()
