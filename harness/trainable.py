"""The Ray Tune function trainable: one trial = one `harness.train.run`, one MLflow child run.

    train_trial(config)                        config = {"trial": {...}, "sweep": {...}}
        out = restore_checkpoint(...)           Tune's last checkpoint (a retry, --resume) into
                                                a local work folder, or a clean folder
        run_id = open_child_run(...)            the trial's MLflow child run: found again on a
                                                retry, created otherwise
        run(cfg, out, callbacks=[report])       each epoch: log to MLflow, report the metrics
                                                and the checkpoint to Tune
        log the final metrics and artifacts; close the child run FINISHED (FAILED / KILLED
        when the trial raises or Tune stops it)

The work folder is local scratch: everything that must outlive the worker goes through
`tune.Checkpoint` (to the sweep's storage, wherever it is) and MLflow.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .config import Config
from .space import trial_dirname

__all__ = ["train_trial", "restore_checkpoint", "open_child_run", "work_dir"]

# shown in Tune's progress table; the full record goes to MLflow
TUNE_COLUMNS = ("train_loss", "ann_test_acc", "calib_s", "epoch_s")


def work_dir(sweep: Mapping[str, Any], trial: Mapping[str, Any]) -> Path:
    """The trial's local scratch folder (one per sweep and trial on each node)."""
    return Path(tempfile.gettempdir()) / "harness-trials" / sweep["name"] / trial_dirname(trial["index"], trial["label"])


def restore_checkpoint(out: Path) -> bool:
    """Put Tune's last checkpoint of this trial (if any) into `out`; True if there was one.
    Without one, `out` is emptied of checkpoints: a checkpoint newer than Tune's would skip
    epochs that Tune and MLflow never saw."""
    from ray import tune

    from .train import BEST, CKPT

    out.mkdir(parents=True, exist_ok=True)
    for name in (CKPT, BEST):
        (out / name).unlink(missing_ok=True)
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        for name in (CKPT, BEST):
            if (Path(d) / name).exists():
                shutil.copy2(Path(d) / name, out / name)
    return True


def open_child_run(client, sweep: Mapping[str, Any], label: str, cfg: Config, out: Path,
                   restored: bool) -> tuple[str, set[int]]:
    """(run id, epochs already logged): a retried trial continues its own child run."""
    from . import tracking
    from .train import read_checkpoint_extra

    run_id = read_checkpoint_extra(out).get("mlflow_run_id") if restored else None
    run_id = run_id or tracking.find_child(client, sweep["experiment_id"], sweep["parent_run_id"], label)
    if run_id is None:
        return tracking.create_child(client, sweep["experiment_id"], sweep["parent_run_id"], label, cfg), set()
    tracking.set_status(client, run_id, "RUNNING")
    return run_id, tracking.logged_epochs(client, run_id)


def _report_to_tune(rec: dict, out: Path, last_sel: float) -> None:
    """Report the epoch's record and its checkpoint (hard links of the trial's files)."""
    from ray import tune

    from .train import BEST, CKPT

    stage = out / "_tune_checkpoint"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for name in (CKPT, BEST):
        if (out / name).exists():
            try:
                os.link(out / name, stage / name)
            except OSError:
                shutil.copy2(out / name, stage / name)
    shown = {k: rec[k] for k in TUNE_COLUMNS if k in rec}
    try:
        tune.report({**shown, "epoch": rec["epoch"], "snn_sel_acc": last_sel},
                    checkpoint=tune.Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def train_trial(config: dict, extra_callbacks: Iterable[Callable[[dict, Path], None]] = ()) -> None:
    """Ray Tune function trainable (see the module docstring). `extra_callbacks(record,
    out)` run after each epoch, after the Tune report."""
    import torch

    from . import tracking
    from .train import run

    t, s = config["trial"], config["sweep"]
    cfg = Config.from_dict(t["config"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = work_dir(s, t)
    restored = restore_checkpoint(out)
    client = tracking.client(s["tracking_uri"])
    run_id, logged = open_child_run(client, s, t["label"], cfg, out, restored)
    calibrator = None
    if s["calibration_mode"] == "actor":
        from .actor import ActorCalibrator
        calibrator = ActorCalibrator(s["actor_name"], t["data_key"], t["model_spec"], cfg.data.eval_batch_size)
    layers: list[str] = []
    last_sel = [0.0]

    def on_start(info: dict) -> None:
        layers[:] = info["layers"]
        tracking.log_trial_params(client, run_id, info)

    def report(rec: dict, out_dir: Path) -> None:
        if calibrator is not None:  # the shared actor's queueing and computing time for this epoch
            t = calibrator.timing(rec["epoch"])
            rec = {**rec, "calib_queue_s": t.get("queue_s"), "calib_compute_s": t.get("compute_s")}
        if rec["epoch"] not in logged:  # a retried epoch that was already logged keeps its first values
            tracking.log_epoch(client, run_id, rec, layers)
            logged.add(rec["epoch"])
        if rec.get("snn_sel_acc") is not None:
            last_sel[0] = float(rec["snn_sel_acc"])
        _report_to_tune(rec, out_dir, last_sel[0])

    try:
        result = run(cfg, out, calibrator=calibrator, callbacks=[report, *extra_callbacks], on_start=on_start,
                     extra={"mlflow_run_id": run_id}, progress=False, trial_id=t["label"])
        tracking.log_final(client, run_id, result, out)
        tracking.set_status(client, run_id, "FINISHED")
    except BaseException as e:
        # Tune stops a trial (scheduler / Ctrl-C) by raising SystemExit in tune.report
        status = "KILLED" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "FAILED"
        try:
            tracking.set_status(client, run_id, status)
        except Exception:  # noqa: BLE001 - the trial's own error is the one to report
            pass
        raise
