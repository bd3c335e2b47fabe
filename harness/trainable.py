"""The Ray Tune function trainable: one trial = one `harness.train.run`.

    train_trial(config)       config = {"axes": {dotted key: value}, "space": {...}, "sweep": {...}}
        cfg = trial_config(...)             base config + the trial's axis values + overrides
        restore_checkpoint(out)             Tune's last checkpoint (a retry, --resume) into a
                                            local work folder, or a clean folder
        run(cfg, out, callbacks=[report])   each epoch: report the record and the checkpoint
                                            to Tune (and log it to MLflow when the trial logs)
        report the final files (result.json, residual_hist.json, best.pt) as the last checkpoint

Who writes MLflow (`sweep["log_from"]`):
  "driver"  a SQLite store: trials never open the database; the driver's Tune callback
            (harness.tune_mlflow) logs what they report. Nodes need no access to it.
  "trial"   a tracking server (http/https): each trial logs its own child run through the
            server, artifacts included (--serve-artifacts), as the records happen.

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

__all__ = ["train_trial", "restore_checkpoint", "work_dir", "node", "FINAL_FILES"]

FINAL_FILES = ("result.json", "residual_hist.json")  # with best.pt: the final checkpoint's files
TUNE_COLUMNS = ("train_loss", "ann_test_acc", "calib_s", "epoch_s")  # scalars for Tune's table


def work_dir(parent_run_id: str, label: str, trial_id: str) -> Path:
    """The trial's local scratch folder: one per sweep invocation (its parent run, which
    --resume keeps) and trial, on each node."""
    return Path(tempfile.gettempdir()) / "harness-trials" / parent_run_id / f"{label}_{trial_id}"


def node() -> dict[str, str]:
    """Where this process runs: Ray's node id and IP (tags of the trial's run)."""
    import ray
    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


def restore_checkpoint(out: Path) -> bool:
    """Put Tune's last checkpoint of this trial (if any) into `out`; True if there was one.
    Without one, `out` is emptied of checkpoints: a checkpoint newer than Tune's would skip
    epochs that Tune and MLflow never saw."""
    from ray import tune

    from .train import BEST, CKPT

    out.mkdir(parents=True, exist_ok=True)
    for name in (CKPT, BEST, *FINAL_FILES):
        (out / name).unlink(missing_ok=True)
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        for name in (CKPT, BEST):
            if (Path(d) / name).exists():
                shutil.copy2(Path(d) / name, out / name)
    return True


def _report(metrics: dict, out: Path, files: Iterable[str]) -> None:
    """tune.report with a checkpoint holding `files` of `out` (hard links where possible)."""
    from ray import tune

    stage = out / "_tune_checkpoint"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for name in files:
        if (out / name).exists():
            try:
                os.link(out / name, stage / name)
            except OSError:
                shutil.copy2(out / name, stage / name)
    try:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _TrialLog:
    """The trial's own MLflow logging (log_from "trial"); a no-op when the driver logs."""

    def __init__(self, sweep: Mapping[str, Any], label: str, cfg: Config, restored: bool, out: Path):
        self.on = sweep["log_from"] == "trial"
        self.model = sweep.get("model", "checkpoint")
        self.layers: list[str] = []
        if not self.on:
            return
        from . import tracking
        from .train import read_checkpoint_extra
        self.c = tracking.client(sweep["tracking_uri"])
        run_id = read_checkpoint_extra(out).get("mlflow_run_id") if restored else None
        self.run_id, self.logged = tracking.open_child(self.c, sweep["experiment_id"], sweep["parent_run_id"],
                                                       label, cfg.method, run_id)
        tracking.set_node_tags(self.c, self.run_id, node())

    def start(self, info: dict) -> None:
        self.layers = info["layers"]
        if self.on:
            from . import tracking
            tracking.log_trial_params(self.c, self.run_id, info)

    def epoch(self, rec: dict) -> None:
        if self.on and rec["epoch"] not in self.logged:  # a retried epoch keeps its first values
            from . import tracking
            tracking.log_epoch(self.c, self.run_id, rec, self.layers)
            self.logged.add(rec["epoch"])

    def final(self, result: dict, out: Path) -> None:
        if self.on:
            from . import tracking
            tracking.log_final(self.c, self.run_id, result, out, model=self.model)
            tracking.set_status(self.c, self.run_id, "FINISHED")

    def close(self, status: str) -> None:
        if self.on:
            from . import tracking
            try:
                tracking.set_status(self.c, self.run_id, status)
            except Exception:  # noqa: BLE001 - the trial's own error is the one to report
                pass


def train_trial(config: dict, extra_callbacks: Iterable[Callable[[dict, Path], None]] = ()) -> None:
    """Ray Tune function trainable (see the module docstring). `extra_callbacks(record,
    out)` run after each epoch, after the Tune report."""
    import torch
    from ray import tune

    from .space import trial_config, trial_label
    from .train import BEST, CKPT, run

    s, space = config["sweep"], config["space"]
    cfg = trial_config(space["base"], config["axes"], space["overrides"], space["dir"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": s["threads"]})})
    label = trial_label(config["axes"], space["label_keys"])
    torch.set_num_threads(s["threads"])
    out = work_dir(s["parent_run_id"], label, tune.get_context().get_trial_id())
    restored = restore_checkpoint(out)
    log = _TrialLog(s, label, cfg, restored, out)
    calibrator = None
    if s["calibration_mode"] == "actor":
        from .actor import ActorCalibrator, data_key, model_spec
        key = data_key(cfg)
        split = s["actor_splits"][key]
        calibrator = ActorCalibrator(s["actor_name"], key, model_spec(cfg, split["num_classes"], split["in_chans"]),
                                     cfg.data.eval_batch_size)
    pending: dict[str, Any] = {"node": node()}  # sent with the first report after a (re)start
    last_sel = [0.0]

    def on_start(info: dict) -> None:
        log.start(info)
        pending["info"] = info

    def report(rec: dict, out_dir: Path) -> None:
        if calibrator is not None:  # the shared actor's queueing and computing time for this epoch
            t = calibrator.timing(rec["epoch"])
            rec = {**rec, "calib_queue_s": t.get("queue_s"), "calib_compute_s": t.get("compute_s")}
        log.epoch(rec)
        if rec.get("snn_sel_acc") is not None:
            last_sel[0] = float(rec["snn_sel_acc"])
        shown = {k: rec[k] for k in TUNE_COLUMNS if k in rec}
        _report({**shown, "epoch": rec["epoch"], "snn_sel_acc": last_sel[0], "label": label,
                 "record": rec, **pending}, out_dir, (CKPT, BEST))
        pending.clear()

    extra = {"mlflow_run_id": log.run_id} if log.on else {}
    try:
        result = run(cfg, out, calibrator=calibrator, callbacks=[report, *extra_callbacks], on_start=on_start,
                     extra=extra, progress=False, trial_id=label)
        log.final(result, out)
        # the final report: Tune (and the driver's MLflow callback) get result.json,
        # residual_hist.json and best.pt through the trial's last checkpoint
        _report({"epoch": cfg.train.epochs, "snn_sel_acc": last_sel[0], "label": label, "final": True},
                out, (CKPT, BEST, *FINAL_FILES))
    except BaseException as e:
        # Tune stops a trial (scheduler / Ctrl-C) by raising SystemExit in tune.report
        log.close("KILLED" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "FAILED")
        raise
    finally:  # Tune reuses this worker for the next trial: hand the trial's freed heap back
        from .memory import release_freed_memory
        release_freed_memory()
