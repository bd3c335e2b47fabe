"""The driver's Tune callback that logs every trial to MLflow (sweeps on a SQLite store).

Trials never open the database: they report each epoch's record (and, once per start,
the resolved config and their node) to Tune, and their final files through the last
checkpoint. This callback, in the driver process, is the store's only writer:

    on_trial_start     find the trial's child run (a retry or --resume continues it) or create it
                       with the params its config fixes (a trial stopped before its first
                       report still says what it was)
    on_trial_result    params (first report after a start), node tags, the epoch's metrics
                       (an epoch already logged keeps its first values)
    on_trial_complete  final metrics and artifacts from the final checkpoint; FINISHED (KILLED
                       when the scheduler stopped the trial early: no final report)
    on_trial_error     FAILED (after Tune's last retry)

A run still RUNNING when the sweep ends is closed by the driver (KILLED on an interrupt).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import tracking

__all__ = ["MlflowLogger"]

log = logging.getLogger(__name__)


class MlflowLogger(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, model: str = "checkpoint"):
        self.uri, self.exp_id, self.parent_id = tracking_uri, experiment_id, parent_run_id
        self.model = model  # how best.pt is logged: tracking.log_final
        self._client = None
        self.runs: dict[str, str] = {}          # Tune trial id -> MLflow run id
        self.logged: dict[str, set[int]] = {}   # run id -> epochs logged
        self.layers: dict[str, list[str]] = {}  # run id -> layer names (from the trial's info)

    @property
    def client(self):
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def _run(self, trial) -> str:
        rid = self.runs.get(trial.trial_id)
        if rid is None:
            label, cfg = _label_and_config(trial)
            rid, logged = tracking.open_child(self.client, self.exp_id, self.parent_id, label, cfg.method,
                                              tags={"harness.tune_trial_id": trial.trial_id})
            if not logged:  # the trial reports its resolved config with its first epoch
                tracking.log_planned_params(self.client, rid, cfg)
            self.runs[trial.trial_id], self.logged[rid] = rid, logged
        return rid

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        tracking.set_status(self.client, self._run(trial), "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        rid = self._run(trial)
        if "node" in result:
            tracking.set_node_tags(self.client, rid, result["node"])
        if "info" in result:
            self.layers[rid] = result["info"]["layers"]
            tracking.log_trial_params(self.client, rid, result["info"])
        rec = result.get("record")
        if rec is not None and rec["epoch"] not in self.logged[rid]:
            if rid not in self.layers:  # a restarted driver (--resume) that saw no info yet
                self.layers[rid] = tracking.layer_names(self.client, rid)
            tracking.log_epoch(self.client, rid, rec, self.layers[rid])
            self.logged[rid].add(rec["epoch"])

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        rid = self._run(trial)
        if not (trial.last_result or {}).get("final"):
            # Tune also completes a trial that its scheduler (ASHA) stopped early: it has no
            # final results, and it did not fail
            tracking.set_status(self.client, rid, "KILLED")
            return
        ckpt = trial.checkpoint
        try:
            if ckpt is None:
                raise FileNotFoundError("the trial reported no checkpoint")
            with ckpt.as_directory() as d:
                import json
                result = json.loads((Path(d) / "result.json").read_text())
                tracking.log_final(self.client, rid, result, Path(d), model=self.model)
        except Exception as e:  # noqa: BLE001 - a trial without its final files did not finish
            log.error("trial %s: final results unavailable (%s)", trial.trial_id, e)
            tracking.set_status(self.client, rid, "FAILED")
            return
        tracking.set_status(self.client, rid, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        tracking.set_status(self.client, self._run(trial), "FAILED")


def _label_and_config(trial):
    """(label, config) of a trial, as train_trial builds them (its CPUs as train.threads)."""
    from .space import trial_config, trial_label
    sp = trial.config["space"]
    cfg = trial_config(sp["base"], trial.config["axes"], sp["overrides"], sp["dir"])
    threads = trial.config.get("sweep", {}).get("threads")
    if threads is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})})
    return trial_label(trial.config["axes"], sp["label_keys"]), cfg
