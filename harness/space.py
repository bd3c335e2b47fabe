"""Search spaces: the schema of a sweep file and its expansion into trials. Pure: no Ray.

A search-space file has three parts:

    name: quickstart                 # default experiment name (else the file's stem)
    data: {...}  model: {...}  noise: {...}  train: {...}  eval: {...}   # the base config
    grid:                            # axes over dotted config keys; the trials are
      noise.mode: [qcfs, layerwise]  #   their cartesian product, in file order
      train.seed: [0, 1]
    overrides:                       # optional per-trial settings: every trial whose
      - match: {model.arch: resnet20}   #   values equal all of `match` also gets `set`
        set: {model.L: 8}
    resources: {cpu: 1, gpu: 0, max_concurrent: 2}     # per trial
    calibration: {mode: actor, cpu: 0, gpu: 0, max_concurrency: 4}   # or mode: local
    scheduler: {name: fifo}          # or {name: asha, grace_period: 2, reduction_factor: 3}
    failure: {max_failures: 2}       # retries of a failed trial, from its last checkpoint

Every problem is a one-line ConfigError, before anything starts.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, ValidationError

from .config import (Config, ConfigError, Section, apply_override, check_dotted_key, check_unique_overrides,
                     format_validation_error, read_yaml, set_dotted)

__all__ = ["SearchSpace", "Trial", "SpaceCfg", "load_space", "NAME_PATTERN"]

SECTIONS = ("data", "model", "noise", "train", "eval")
PATH_KEYS = ("data.root",)  # relative values are resolved against the space file's folder or the CWD
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
LABEL_VALUE_CHARS = 40  # a trial label shows at most this much of each axis value


class ResourcesCfg(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1)


class CalibrationCfg(Section):
    mode: Literal["actor", "local"] = "actor"
    # The actor serves trials that wait for its answer, so by default it reserves no CPU
    # of its own (it borrows the waiting trial's); give it cpu/gpu for a dedicated device.
    cpu: float = Field(0.0, ge=0)
    gpu: float = Field(0.0, ge=0)
    max_concurrency: int = Field(4, ge=1)
    threads: int | None = Field(None, ge=1)  # torch threads in the actor (default: a trial's CPUs)


class SchedulerCfg(Section):
    name: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the largest train.epochs of the sweep


class FailureCfg(Section):
    max_failures: int = Field(2, ge=0)  # retries per trial, each from its last epoch checkpoint


class OverrideCfg(Section):
    match: dict[str, Any] = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1)


class SpaceCfg(Section):
    name: str | None = Field(None, pattern=NAME_PATTERN)
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    overrides: list[OverrideCfg] = Field(default_factory=list)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    calibration: CalibrationCfg = Field(default_factory=CalibrationCfg)
    scheduler: SchedulerCfg = Field(default_factory=SchedulerCfg)
    failure: FailureCfg = Field(default_factory=FailureCfg)


@dataclass
class Trial:
    index: int
    label: str           # e.g. "mode=qcfs,seed=0": MLflow run name and harness.trial tag
    config: dict          # validated Config.to_dict()
    cfg: Config

    @property
    def dirname(self) -> str:
        return trial_dirname(self.index, self.label)


def trial_dirname(index: int, label: str) -> str:
    return f"{index:02d}_{label}"


@dataclass
class SearchSpace:
    path: Path
    name: str
    base: Config
    trials: list[Trial]
    resources: ResourcesCfg
    calibration: CalibrationCfg
    scheduler: SchedulerCfg
    failure: FailureCfg
    axes: dict[str, list[Any]] = field(default_factory=dict)


def load_space(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpace:
    """Parse, expand and validate a search space. `overrides` (`section.key=value`) apply
    to the base config."""
    path = Path(path).expanduser().absolute()
    raw = read_yaml(path, "search space")
    try:
        space = SpaceCfg.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=SpaceCfg)) from None

    base = {s: copy.deepcopy(getattr(space, s)) or {} for s in SECTIONS if getattr(space, s) is not None}
    check_unique_overrides(overrides)
    for o in overrides:
        apply_override(base, o)
    _resolve_paths(base, path.parent)
    base_cfg = Config.from_dict(base)
    axes = _check_grid(space.grid or {})
    for i, o in enumerate(space.overrides):
        for part in ("match", "set"):
            for key in getattr(o, part):
                check_dotted_key(key, f"overrides[{i}].{part}")
    trials = [_trial(index, label, combo, base, axes, space.overrides, path.parent)
              for index, (label, combo) in enumerate(zip(_labels(axes), itertools.product(*axes.values())))]
    if not trials:
        raise ConfigError("the search space has zero trials")
    name = space.name or re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem)
    return SearchSpace(path, name, base_cfg, trials, space.resources, space.calibration, space.scheduler,
                       space.failure, axes)


def _trial(index: int, label: str, combo: tuple, base: dict, axes: dict[str, list[Any]],
           overrides: list[OverrideCfg], space_dir: Path) -> Trial:
    d = copy.deepcopy(base)
    for key, value in zip(axes, combo):
        set_dotted(d, key, copy.deepcopy(value))
    applied = []
    for i, o in enumerate(overrides):
        if all(_get(d, k) == v for k, v in o.match.items()):
            applied.append(i)
            for k, v in o.set.items():
                set_dotted(d, k, copy.deepcopy(v))
    _resolve_paths(d, space_dir)
    try:
        cfg = Config.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_trial_error(e, axes, overrides, applied, label)) from None
    return Trial(index, label, cfg.to_dict(), cfg)


def _check_grid(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for key, values in grid.items():
        check_dotted_key(str(key), "grid")
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} = {values!r} (expected a non-empty list of values)")
        if not values:
            raise ConfigError(f"grid.{key} = [] (expected a non-empty list of values; "
                              "an empty axis gives zero trials)")
        axes[str(key)] = values
    return axes


def _trial_error(e: ValidationError, axes, overrides, applied, label: str) -> str:
    loc = ".".join(str(p) for p in e.errors(include_url=False)[0]["loc"])
    for key in sorted(axes, key=len, reverse=True):
        if loc == key or loc.startswith(key + "."):
            return format_validation_error(e, prefix_loc=("grid",), model=Config)
    for i in applied:
        for key in overrides[i].set:
            if loc == key or loc.startswith(key + "."):
                return format_validation_error(e, prefix_loc=("overrides", i, "set"), model=Config)
    return f"trial {label}: {format_validation_error(e, model=Config)}"


def _labels(axes: Mapping[str, list[Any]]) -> list[str]:
    """Readable, unique trial labels from the varying axes: 'mode=qcfs,seed=0'."""
    varying = [k for k, v in axes.items() if len(v) > 1]
    last = [k.split(".")[-1] for k in varying]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(varying, last)}
    out = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        parts = [f"{short[k]}={_short_value(values[k])}" for k in varying]
        out.append(",".join(parts) or "trial")
    if len(set(out)) < len(out):
        out = [f"{lab}#{i}" for i, lab in enumerate(out)]
    return out


def _short_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short_value(e) for e in v)
    if isinstance(v, Mapping):
        return "+".join(f"{k}:{_short_value(e)}" for k, e in v.items())
    s = str(v)
    if isinstance(v, str) and "/" in s:
        s = Path(s).name
    return re.sub(r"[^A-Za-z0-9_.\-+:]", "_", s)[:LABEL_VALUE_CHARS]


def _get(d: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a (partial) config dict, else the config default."""
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _default(key)
        node = node[part]
    return node


def _default(key: str) -> Any:
    node: Any = Config().to_dict()
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _resolve_paths(d: dict[str, Any], space_dir: Path) -> None:
    """Relative data paths: against the space file's folder if that exists, else the CWD.
    (Trials chdir into their own folders, so every path they get must be absolute.)"""
    for key in PATH_KEYS:
        v = _get(d, key)
        if isinstance(v, str) and v and "://" not in v:
            p = Path(v).expanduser()
            if not p.is_absolute():
                p = space_dir / p if (space_dir / p).exists() else Path.cwd() / p
            set_dotted(d, key, os.path.normpath(p.absolute()))
