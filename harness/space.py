"""Search spaces: the schema of a sweep file and how it becomes Tune's param_space. Pure:
Ray is imported only by `SearchSpace.param_space()`.

    name: quickstart                 # default experiment name (else the file's stem)
    data: {...}  model: {...}  noise: {...}  train: {...}  eval: {...}   # the base config
    grid:                            # tune.grid_search over dotted config keys: every
      noise.mode: [qcfs, layerwise]  #   combination runs; a whole section varies several
      train.seed: [0, 1]             #   keys together: noise: [{mode: fixed, delta: 0.1}, ...]
    sample:                          # Tune samplers over dotted keys, drawn num_samples
      train.lr: {loguniform: [0.01, 0.2]}     # times (for each grid combination)
      model.L: {choice: [2, 4, 8]}   #   also: uniform [lo, hi], randint [lo, hi)
    num_samples: 1
    search: {algorithm: random}      # or {algorithm: optuna, metric: snn_sel_acc, mode: max}
    overrides:                       # optional per-trial settings: every trial whose
      - match: {model.arch: resnet20}   #   values equal all of `match` also gets `set`
        set: {model.L: 8}
    resources: {cpu: 1, gpu: 0, max_concurrent: 2}     # per trial
    calibration: {mode: actor, cpu: 0, gpu: 0, max_concurrency: 4}   # or mode: local
    scheduler: {name: fifo}          # or {name: asha, metric: snn_sel_acc, grace_period: 2}
    failure: {max_failures: 2}       # retries of a failed trial, from its last checkpoint
    tracking: {model: checkpoint}    # best.pt as an artifact; mlflow: an MLflow PyTorch model

A trial's config is `trial_config(values)`: the base config, the trial's axis values, then
the matching overrides, validated. Every problem is a one-line ConfigError before Ray
starts: all grid combinations are validated, and every sampler at its bounds or choices.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, ValidationError, model_validator

from .config import (Config, ConfigError, Section, apply_override, check_dotted_key, check_unique_overrides,
                     deep_merge, expected_error, format_validation_error, read_yaml, set_dotted)

__all__ = ["SearchSpace", "Trial", "SpaceCfg", "load_space", "NAME_PATTERN", "trial_label"]

SECTIONS = ("data", "model", "noise", "train", "eval")
PATH_KEYS = ("data.root",)  # relative values are resolved against the space file's folder or the CWD
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
LABEL_VALUE_CHARS = 40  # a trial label shows at most this much of each axis value
SAMPLERS = ("choice", "uniform", "loguniform", "randint")
TUNE_METRICS = ("snn_sel_acc", "ann_test_acc", "train_loss")  # what trials report to Tune each epoch


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
    metric: Literal[TUNE_METRICS] = "snn_sel_acc"  # ASHA stops trials low on this (mode max / min)
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the largest train.epochs of the sweep


class SearchCfg(Section):
    algorithm: Literal["random", "optuna"] = "random"  # random: Tune's own sampling of `sample`
    metric: Literal[TUNE_METRICS] = "snn_sel_acc"
    mode: Literal["max", "min"] = "max"
    seed: int | None = None


class FailureCfg(Section):
    max_failures: int = Field(2, ge=0)  # retries per trial, each from its last epoch checkpoint


class TrackingCfg(Section):
    # each finished trial's selected checkpoint (best.pt) goes to its MLflow run as
    #   checkpoint: a plain artifact (torch.load; harness.create_model + load_state_dict)
    #   mlflow:     an MLflow PyTorch model (the UI's Models tab, mlflow.pytorch.load_model;
    #               0.4-1.3 s of the MLflow writer per trial, benchmarks/sweep_overhead.py)
    model: Literal["checkpoint", "mlflow"] = "checkpoint"


class OverrideCfg(Section):
    match: dict[str, Any] = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1)


class SamplerCfg(Section):
    """Exactly one of: choice [values], uniform [lo, hi], loguniform [lo, hi], randint [lo, hi)."""
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)
    randint: list[int] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _one(self) -> SamplerCfg:
        given = [k for k in SAMPLERS if getattr(self, k) is not None]
        if len(given) != 1:
            raise expected_error(f"exactly one of: {', '.join(SAMPLERS)}")
        lo_hi = getattr(self, given[0])
        if given[0] != "choice" and not lo_hi[0] < lo_hi[1]:
            raise expected_error("[low, high] with low < high", given[0], list(lo_hi))
        if given[0] == "loguniform" and lo_hi[0] <= 0:
            raise expected_error("[low, high] with 0 < low < high", given[0], list(lo_hi))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SAMPLERS if getattr(self, k) is not None)

    def corners(self) -> list[Any]:
        """Values every draw lies between (or among): validated before Ray starts."""
        v = getattr(self, self.kind)
        return list(v) if self.kind == "choice" else ([v[0], v[1] - 1] if self.kind == "randint" else list(v))

    def to_tune(self):
        from ray import tune
        v = getattr(self, self.kind)
        return tune.choice(list(v)) if self.kind == "choice" else getattr(tune, self.kind)(*v)


class SpaceCfg(Section):
    name: str | None = Field(None, pattern=NAME_PATTERN)
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    sample: dict[str, SamplerCfg] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    search: SearchCfg = Field(default_factory=SearchCfg)
    overrides: list[OverrideCfg] = Field(default_factory=list)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    calibration: CalibrationCfg = Field(default_factory=CalibrationCfg)
    scheduler: SchedulerCfg = Field(default_factory=SchedulerCfg)
    failure: FailureCfg = Field(default_factory=FailureCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)


@dataclass
class Trial:
    """One grid combination (samplers at their first corner): known before Ray starts."""
    label: str           # e.g. "mode=qcfs,seed=0": MLflow run name and harness.trial tag
    values: dict          # dotted key -> value of every axis
    config: dict          # validated Config.to_dict()
    cfg: Config


@dataclass
class SearchSpace:
    path: Path
    name: str
    raw: dict                        # the validated file (plus --set overrides): what --resume compares
    base: dict                       # the base config (partial dict)
    base_cfg: Config
    grid: dict[str, list[Any]]
    sample: dict[str, SamplerCfg]
    overrides: list[OverrideCfg]
    num_samples: int
    search: SearchCfg
    resources: ResourcesCfg
    calibration: CalibrationCfg
    scheduler: SchedulerCfg
    failure: FailureCfg
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    trials: list[Trial] = field(default_factory=list)  # the grid, for validation and the actor

    @property
    def label_keys(self) -> list[str]:
        """The axes that tell trials apart: grid axes with more than one value, every sampler."""
        return [k for k, v in self.grid.items() if len(v) > 1] + list(self.sample)

    @property
    def is_grid(self) -> bool:
        """Every trial is known in advance (no sampler)."""
        return not self.sample

    @property
    def n_trials(self) -> int:
        return len(self.trials) * self.num_samples

    def trial_config(self, values: Mapping[str, Any]) -> Config:
        """The config of the trial with these axis values (base, values, matching overrides)."""
        return trial_config(self.base, values, self.overrides, self.path.parent)

    def param_space(self, sweep_cfg: dict) -> dict:
        """Tune's param_space: `axes` holds tune.grid_search / samplers over dotted keys."""
        from ray import tune
        axes: dict[str, Any] = {k: tune.grid_search(list(v)) for k, v in self.grid.items()}
        axes.update({k: s.to_tune() for k, s in self.sample.items()})
        return {"axes": axes, "space": {"base": self.base, "overrides": [o.model_dump() for o in self.overrides],
                                        "dir": str(self.path.parent), "label_keys": self.label_keys},
                "sweep": sweep_cfg}


def trial_config(base: Mapping[str, Any], values: Mapping[str, Any], overrides: Sequence[Any],
                 space_dir: str | Path) -> Config:
    """Base config, then the axis values, then every override whose `match` holds."""
    d = copy.deepcopy(dict(base))
    for key, value in values.items():
        _set_axis(d, key, value)
    for o in overrides:
        match, to_set = (o["match"], o["set"]) if isinstance(o, Mapping) else (o.match, o.set)
        if all(_get(d, k) == v for k, v in match.items()):
            for k, v in to_set.items():
                set_dotted(d, k, copy.deepcopy(v))
    _resolve_paths(d, Path(space_dir))
    return Config.model_validate(d)


def _set_axis(d: dict, key: str, value: Any) -> None:
    """Set an axis value; a mapping (a section axis, e.g. `noise: [{mode: fixed, delta: 0.1},
    {mode: layerwise, tau: 2}]`) is merged into what is there, so keys vary together."""
    if isinstance(value, Mapping):
        node = d
        for part in key.split("."):
            node = node.setdefault(part, {})
        node.update(deep_merge(node, value))
    else:
        set_dotted(d, key, copy.deepcopy(value))


def trial_label(values: Mapping[str, Any], label_keys: Sequence[str]) -> str:
    """Readable label from the axes that vary: 'mode=qcfs,seed=0' (last key part when unique)."""
    last = [k.split(".")[-1] for k in label_keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(label_keys, last)}
    return ",".join(f"{short[k]}={_short_value(values[k])}" for k in label_keys) or "trial"


def with_defaults(raw: dict) -> dict:
    """A saved `SearchSpace.raw` with the defaults of sections added since it was saved
    (e.g. `tracking`), so that --resume compares what the sweep means, not how the
    version that started it spelled it. Unchanged if it no longer validates."""
    d = {k: v for k, v in raw.items() if k != "set"}
    try:
        full = SpaceCfg.model_validate(d).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - then the comparison reports the difference
        return raw
    return {**full, "set": raw.get("set", [])}


def load_space(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpace:
    """Parse and validate a search space. `overrides` (`section.key=value`) apply to the
    base config."""
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
    grid = _check_grid(space.grid or {})
    for key in space.sample:
        check_dotted_key(key, "sample")
        if key in grid:
            raise ConfigError(f"sample.{key} is also a grid axis (expected each key in grid or sample, not both)")
    for i, o in enumerate(space.overrides):
        for part in ("match", "set"):
            for key in getattr(o, part):
                check_dotted_key(key, f"overrides[{i}].{part}")
    if space.search.algorithm == "optuna" and grid:
        raise ConfigError(f"search.algorithm = 'optuna' with grid axes ({', '.join(grid)}): Optuna cannot "
                          "expand a grid (expected the axes under sample: {choice: [...]})")
    if space.search.algorithm == "optuna" and not space.sample:
        raise ConfigError("search.algorithm = 'optuna' needs at least one sample axis")
    name = space.name or re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem)
    out = SearchSpace(path, name, {**space.model_dump(mode="json"), "set": list(overrides)}, base, base_cfg, grid,
                      dict(space.sample), space.overrides, space.num_samples, space.search, space.resources,
                      space.calibration, space.scheduler, space.failure, space.tracking)
    out.trials = _expand(out)
    return out


def _expand(space: SearchSpace) -> list[Trial]:
    """Every grid combination (with each sampler at its first corner), validated; and each
    sampler's other corners with the first combination."""
    first = {k: s.corners()[0] for k, s in space.sample.items()}
    trials = []
    for combo in itertools.product(*space.grid.values()):
        values = {**dict(zip(space.grid, combo)), **first}
        trials.append(_validated(space, values, trial_label(values, space.label_keys)))
    for key, s in space.sample.items():
        for corner in s.corners()[1:]:
            values = {**trials[0].values, key: corner}
            _validated(space, values, trial_label(values, space.label_keys))
    if space.is_grid and len({t.label for t in trials}) < len(trials):
        trials = [Trial(f"{t.label}#{i}", t.values, t.config, t.cfg) for i, t in enumerate(trials)]
    return trials


def _validated(space: SearchSpace, values: dict, label: str) -> Trial:
    try:
        cfg = space.trial_config(values)
    except ValidationError as e:
        applied = [i for i, o in enumerate(space.overrides) if all(
            _get(_with(space.base, values), k) == v for k, v in o.match.items())]
        raise ConfigError(_trial_error(e, space, applied, label)) from None
    return Trial(label, values, cfg.to_dict(), cfg)


def _with(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    d = copy.deepcopy(dict(base))
    for k, v in values.items():
        _set_axis(d, k, v)
    return d


def _check_grid(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if str(key) in SECTIONS:  # a whole section: its values are mappings varied together
            if not isinstance(values, list) or not all(isinstance(v, Mapping) for v in values):
                raise ConfigError(f"grid.{key} = {values!r} (expected a non-empty list of mappings of "
                                  f"{key} keys, varied together)")
            for v in values:
                for k in v:
                    check_dotted_key(f"{key}.{k}", "grid")
        else:
            check_dotted_key(str(key), "grid")
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} = {values!r} (expected a non-empty list of values)")
        if not values:
            raise ConfigError(f"grid.{key} = [] (expected a non-empty list of values; "
                              "an empty axis gives zero trials)")
        axes[str(key)] = values
    return axes


def _trial_error(e: ValidationError, space: SearchSpace, applied: list[int], label: str) -> str:
    loc = ".".join(str(p) for p in e.errors(include_url=False)[0]["loc"])
    for section, keys in (("grid", space.grid), ("sample", space.sample)):
        for key in sorted(keys, key=len, reverse=True):
            if loc == key or loc.startswith(key + "."):
                return format_validation_error(e, prefix_loc=(section,), model=Config)
    for i in applied:
        for key in space.overrides[i].set:
            if loc == key or loc.startswith(key + "."):
                return format_validation_error(e, prefix_loc=("overrides", i, "set"), model=Config)
    return f"trial {label}: {format_validation_error(e, model=Config)}"


def _short_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short_value(e) for e in v)
    if isinstance(v, Mapping):
        return "+".join(f"{k}:{_short_value(e)}" for k, e in v.items())
    if isinstance(v, float) and not v.is_integer():
        s = f"{v:.4g}" if math.isfinite(v) else str(v)
    else:
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
