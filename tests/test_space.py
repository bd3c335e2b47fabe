"""Search spaces without Ray: grid and section axes, samplers, one-line errors."""
from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError
from harness.space import load_space, trial_label

BASE = {"data": {"name": "digits"}, "model": {"arch": "cnn_small"}, "noise": {"tau": 4, "calib_samples": 64},
        "train": {"epochs": 1}, "eval": {"T": [1, 4], "select_T": 4}}


def space(tmp_path: Path, **parts) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**BASE, **parts}, sort_keys=False))
    return p


def test_section_axis_varies_keys_together_and_keeps_the_base(tmp_path):
    s = load_space(space(tmp_path, grid={"train.seed": [0, 1], "noise": [
        {"mode": "fixed", "delta": 0.1}, {"mode": "layerwise", "tau": 2}]}))
    got = [(t.cfg.train.seed, t.cfg.noise.mode, t.cfg.noise.delta, t.cfg.noise.tau, t.cfg.noise.calib_samples)
           for t in s.trials]
    assert got == [(0, "fixed", 0.1, 4, 64), (0, "layerwise", 0.0, 2, 64),
                   (1, "fixed", 0.1, 4, 64), (1, "layerwise", 0.0, 2, 64)]
    assert s.trials[1].label == "seed=0,noise=mode:layerwise+tau:2"


@pytest.mark.parametrize("parts, message", [
    ({"grid": {"noise": [{"mode": "fixed", "bogus": 1}]}}, "config error: unknown key grid.noise.bogus"),
    ({"grid": {"noise": [1, 2]}}, "config error: grid.noise = [1, 2] (expected a non-empty list of mappings"),
    ({"grid": {"noise": [{"mode": "fixed", "delta": -1}]}}, "config error: grid.noise.delta = -1"),
    ({"sample": {"train.lr": {"uniform": [0.2, 0.1]}}}, "config error: sample.train.lr.uniform = [0.2, 0.1]"),
    ({"sample": {"train.lr": {"loguniform": [0.0, 0.1]}}}, "config error: sample.train.lr.loguniform = [0.0, 0.1]"),
    ({"sample": {"train.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "config error: sample.train.lr = "),
    ({"sample": {"train.nope": {"choice": [1]}}}, "config error: unknown key sample.train.nope"),
    ({"sample": {"model.L": {"choice": [4, 0]}}}, "config error: sample.model.L = 0 (expected an integer >= 1)"),
    ({"sample": {"train.epochs": {"randint": [0, 3]}}}, "config error: sample.train.epochs = 0"),
    ({"grid": {"train.seed": [0, 1]}, "sample": {"train.seed": {"randint": [0, 9]}}},
     "config error: sample.train.seed is also a grid axis"),
    ({"grid": {"train.seed": [0, 1]}, "sample": {"train.lr": {"choice": [0.1]}}, "search": {"algorithm": "optuna"}},
     "config error: search.algorithm = 'optuna' with grid axes (train.seed)"),
    ({"search": {"algorithm": "optuna"}}, "config error: search.algorithm = 'optuna' needs at least one sample axis"),
    ({"scheduler": {"name": "asha", "metric": "loss"}}, "config error: scheduler.metric = 'loss' (expected one of:"),
])
def test_invalid_spaces_fail_before_ray_with_one_line(tmp_path, parts, message):
    with pytest.raises(ConfigError) as info:
        load_space(space(tmp_path, **parts))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_samplers_are_validated_at_their_bounds_and_labelled(tmp_path):
    s = load_space(space(tmp_path, grid={"noise.mode": ["qcfs", "layerwise"]}, num_samples=3,
                         sample={"train.lr": {"loguniform": [0.01, 0.2]}, "model.L": {"choice": [2, 4]}}))
    assert s.n_trials == 6 and s.label_keys == ["noise.mode", "train.lr", "model.L"]
    assert trial_label({"noise.mode": "qcfs", "train.lr": 0.0123456, "model.L": 4}, s.label_keys) == \
        "mode=qcfs,lr=0.01235,L=4"
    ps = s.param_space({"name": "x"})
    from ray.tune.search.sample import Categorical, Float
    assert isinstance(ps["axes"]["train.lr"], Float) and isinstance(ps["axes"]["model.L"], Categorical)
    assert ps["axes"]["noise.mode"] == {"grid_search": ["qcfs", "layerwise"]}
    cfg = s.trial_config({"noise.mode": "layerwise", "train.lr": 0.05, "model.L": 2})
    assert (cfg.noise.mode, cfg.train.lr, cfg.model.L) == ("layerwise", 0.05, 2)


def test_resume_state_is_the_whole_space(tmp_path):
    a = load_space(space(tmp_path, grid={"train.seed": [0, 1]}))
    b = load_space(space(tmp_path, grid={"train.seed": [0, 1]}), ["train.epochs=2"])
    assert a.raw != b.raw and a.raw == load_space(space(tmp_path, grid={"train.seed": [0, 1]})).raw


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml")))
def test_resume_compares_a_space_saved_before_a_new_section(name):
    """A sweep's saved space (its state file) from before a section existed, e.g.
    `tracking`, equals today's space once the defaults are filled in; a saved space that
    differs in a value still differs."""
    from harness.space import with_defaults

    s = load_space(Path(__file__).parents[1] / "search_spaces" / name)
    assert with_defaults(s.raw) == s.raw
    old = {k: v for k, v in s.raw.items() if k != "tracking"}
    assert old != s.raw and with_defaults(old) == s.raw
    changed = {**old, "num_samples": s.raw["num_samples"] + 1}
    assert with_defaults(changed) != s.raw
    assert with_defaults({**old, "tracking": {"model": "mlflow"}}) != s.raw
