"""Fault injection for sweep tests: trainables that wrap `harness.trainable.train_trial`.

Ray pickles a trainable into its workers; the tests register this module to be pickled
by value (`ray.cloudpickle.register_pickle_by_value`), so the workers need not import it.
"""
from __future__ import annotations

import os
from pathlib import Path


def die_once_after(label: str, epoch: int, marker_dir: str):
    """A trainable: train_trial, but the worker of the trial labelled `label` dies
    (os._exit) right after epoch `epoch` was reported to Tune, once: a file in `marker_dir`
    records the death."""
    from harness.space import trial_label
    from harness.trainable import train_trial

    def trainable(config: dict) -> None:
        mine = trial_label(config["axes"], config["space"]["label_keys"])
        marker = Path(marker_dir) / f"died_{mine}"
        if mine != label or marker.exists():
            return train_trial(config)

        def die(rec: dict, out: Path) -> None:
            if rec["epoch"] == epoch:
                marker.write_text(str(os.getpid()))
                os._exit(137)

        return train_trial(config, extra_callbacks=[die])

    # Tune identifies a trainable by name; --resume restores it with train_trial itself
    trainable.__name__ = trainable.__qualname__ = train_trial.__name__
    return trainable
