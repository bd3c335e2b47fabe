from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.config import Config, ConfigError, format_validation_error, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.data.augment.crop_pad is None  # resolved per dataset
    assert cfg.model.grad == "nq" and cfg.noise.calib_augment is False
    assert cfg.model.arch == "cnn_small" and cfg.noise.mode == "layerwise"
    assert cfg.eval.T == [1, 2, 4, 8, 16, 32, 64]
    assert cfg.train.weight_decay == 5.0e-4
    assert cfg.method == "NQ"
    assert cfg.lr == 0.1


@pytest.mark.parametrize("name, lr", [("cifar100", 0.05), ("cifar10", 0.1), ("digits", 0.1)])
def test_dataset_default_lr(name, lr):
    cfg = load_config(overrides=[f"data.name={name}"])
    assert cfg.lr == lr == cfg.train.resolved_lr(name)
    assert load_config(overrides=[f"data.name={name}", "train.lr=0.02"]).lr == 0.02


@pytest.mark.parametrize("mode, method", [("qcfs", "QCFS"), ("layerwise", "NQ"), ("fixed", "NQ-fixed")])
def test_method(mode, method):
    assert load_config(overrides=[f"noise.mode={mode}"]).method == method


def test_fixed_with_zero_delta_is_allowed():
    assert load_config(overrides=["noise.mode=fixed", "noise.delta=0"]).noise.delta == 0


MALFORMED = [
    # (yaml text, overrides, message)
    ("noise: {mode: layer}", [],
     "config error: noise.mode = 'layer' (expected one of: qcfs, fixed, layerwise)"),
    ("noise: {foo: 1}", [],
     "config error: unknown key noise.foo (accepted: mode, delta, tau, residual, calib_samples, calib_augment, "
     "scale)"),
    ("nosie: {mode: qcfs}", [],
     "config error: unknown key nosie (accepted: data, model, noise, train, eval)"),
    ("data: {augment: {flipp: true}}", [],
     "config error: unknown key data.augment.flipp (accepted: crop_pad, flip, cutout, autoaugment)"),
    ("train: {epochs: 0}", [], "config error: train.epochs = 0 (expected an integer >= 1)"),
    ("train: {epochs: three}", [], "config error: train.epochs = 'three' (expected an integer >= 1)"),
    ("model: {L: 2.5}", [], "config error: model.L = 2.5 (expected an integer >= 1)"),
    ("data: {val_fraction: 0.7}", [],
     "config error: data.val_fraction = 0.7 (expected a number > 0 and <= 0.5)"),
    ("train: {momentum: 1.0}", [], "config error: train.momentum = 1.0 (expected a number >= 0 and < 1)"),
    ("train: {lr: -0.1}", [], "config error: train.lr = -0.1 (expected a number > 0 or null)"),
    ("noise: {calib_samples: 0}", [],
     "config error: noise.calib_samples = 0 (expected an integer >= 1 or null)"),
    ("data: {augment: {flip: maybe}}", [],
     "config error: data.augment.flip = 'maybe' (expected true or false, or null)"),
    ("eval: {T: [1, 0, 4]}", [], "config error: eval.T[1] = 0 (expected an integer >= 1)"),
    ("eval: {T: []}", [], "config error: eval.T = [] (expected a non-empty list of integers >= 1)"),
    ("model: {arch: resnet99}", [],
     "config error: model.arch = 'resnet99' (expected one of: cnn_small, resnet18, resnet20, vgg16)"),
    ("data: {name: imagefolder}", [],
     "config error: data.root = None (expected a folder or .tar.gz path when data.name is imagefolder)"),
    ("data: 5", [],
     "config error: data = 5 (expected a mapping with keys: name, root, download, val_fraction, "
     "batch_size, eval_batch_size, augment, synthetic)"),
    ("", ["foo"], "config error: override 'foo' (expected section.key=value)"),
    ("", ["epochs=3"], "config error: override 'epochs=3' (expected section.key=value)"),
    ("", ["train..lr=1"], "config error: override 'train..lr=1' (expected section.key=value)"),
    ("", ["train.epoch=3"],
     "config error: unknown key train.epoch (accepted: epochs, lr, momentum, nesterov, weight_decay, "
     "lam_weight_decay, label_smoothing, seed, threads, amp, channels_last, device)"),
    ("", ["data.augment.flip.x=1"],
     "config error: override 'data.augment.flip.x=1' (data.augment.flip is not a section)"),
    ("", ["eval.T=[1,2"], "config error: override 'eval.T=[1,2' (value is not valid YAML)"),
    ("", ["train.device=gpu"], "config error: train.device = 'gpu' (expected one of: auto, cpu, cuda)"),
    ("- data\n- model\n", [],
     "config error: file '{path}' must hold a mapping of sections, not a list"),
    ("train: {epochs: [1\n", [],
     "config error: file '{path}' is not valid YAML at line 2, column 1 (expected ',' or ']', but got '<stream end>')"),
]


@pytest.mark.parametrize("text, overrides, message", MALFORMED)
def test_malformed(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value) == message.format(path=path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config error: file '{path}' not found"


def test_every_error_at_once_one_line_each():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"train": {"epochs": 0, "lr": -1}, "noise": {"mode": "x"}})
    assert str(info.value).splitlines() == [
        "config error: noise.mode = 'x' (expected one of: qcfs, fixed, layerwise)",
        "config error: train.epochs = 0 (expected an integer >= 1)",
        "config error: train.lr = -1 (expected a number > 0 or null)"]


@pytest.mark.parametrize("text, message", [
    ("train: {epochs: true}", "config error: train.epochs = True (expected an integer >= 1)"),
    ("train: {epochs: '3'}", "config error: train.epochs = '3' (expected an integer >= 1)"),
    ("model: {L: 4.0}", "config error: model.L = 4.0 (expected an integer >= 1)"),
    ("data: {augment: {flip: 1}}", "config error: data.augment.flip = 1 (expected true or false, or null)"),
    ("train: {lr: .inf}", "config error: train.lr = inf (expected a number > 0 or null)"),
])
def test_no_silent_coercion(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == message
    assert load_config(write(tmp_path, "train: {lr: 1}")).train.lr == 1.0  # an int is a number


def test_binary_file_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config error: file '{path}' is not UTF-8 text (expected a YAML file)"


def test_T_sorted_and_deduplicated(tmp_path):
    cfg = load_config(write(tmp_path, "eval: {T: [8, 1, 4, 1]}"))
    assert cfg.eval.T == [1, 4, 8]


def test_overrides_parse_types(tmp_path):
    cfg = load_config(write(tmp_path, "train: {epochs: 7}"),
                      ["eval.T=[1,2]", "eval.select_T=2", "data.augment.flip=false", "train.lr=0.05", "noise.calib_samples=null"])
    assert cfg.eval.T == [1, 2]
    assert cfg.data.augment.flip is False
    assert cfg.train.lr == 0.05 and cfg.lr == 0.05
    assert cfg.noise.calib_samples is None
    assert cfg.train.epochs == 7


def test_file_over_base_and_overrides_over_file(tmp_path):
    base = {"train": {"epochs": 1, "seed": 5}, "data": {"augment": {"cutout": 8}}}
    cfg = load_config(write(tmp_path, "train: {epochs: 2}\ndata: {augment: {flip: false}}"),
                      ["train.seed=9"], base=base)
    assert (cfg.train.epochs, cfg.train.seed) == (2, 9)
    assert (cfg.data.augment.cutout, cfg.data.augment.flip) == (8, False)


def test_empty_section_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "noise:\n")).noise.mode == "layerwise"


def test_flat_keys():
    flat = load_config(overrides=["eval.T=[4,1,2]"]).flat()
    assert flat["eval.T"] == "1,2,4"
    assert flat["data.augment.flip"] is None  # a dataset default until Config.resolved
    assert flat["data.synthetic.num_train"] == 2000
    assert flat["noise.mode"] == "layerwise"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())
    assert len(flat) == 43


def test_dict_round_trip():
    cfg = load_config(overrides=["noise.mode=qcfs", "eval.T=[2,8]", "eval.select_T=2"])
    d = cfg.to_dict()
    assert d["eval"]["T"] == [2, 8]
    assert Config.from_dict(d) == cfg
    with pytest.raises(ConfigError, match=r"^config error: unknown key model.foo "):
        Config.from_dict({**d, "model": {**d["model"], "foo": 1}})


def test_format_validation_error_reusable():
    class Space(BaseModel):
        model_config = ConfigDict(extra="forbid")
        samples: int = Field(1, ge=1)

    with pytest.raises(ValidationError) as info:
        Space.model_validate({"samples": 0})
    assert (format_validation_error(info.value, prefix_loc=("search",), model=Space)
            == "search.samples = 0 (expected an integer >= 1)")
    # without the model, pydantic's own wording is used
    assert (format_validation_error(info.value, prefix_loc=("search",))
            == "search.samples = 0 (expected greater than or equal to 1)")
    with pytest.raises(ValidationError) as info:
        Space.model_validate({"sample": 2})
    assert format_validation_error(info.value, model=Space) == "unknown key sample (accepted: samples)"


# ---------------------------------------------------------------- dataset-aware defaults

@pytest.mark.parametrize("name, arch, size, expected", [
    ("digits", "cnn_small", 8, dict(crop_pad=1, flip=False, autoaugment=False, cutout=0, lam_init=2.0)),
    ("synthetic", "cnn_small", 32, dict(crop_pad=4, flip=False, autoaugment=False, cutout=0, lam_init=2.0)),
    ("cifar10", "resnet20", 32, dict(crop_pad=4, flip=True, autoaugment=True, cutout=16, lam_init=8.0)),
    ("cifar100", "vgg16", 32, dict(crop_pad=4, flip=True, autoaugment=True, cutout=16, lam_init=8.0)),
    ("imagefolder", "resnet18", 64, dict(crop_pad=8, flip=True, autoaugment=False, cutout=0, lam_init=8.0)),
])
def test_resolved_defaults_depend_on_dataset_and_arch(name, arch, size, expected):
    extra = ["data.root=/x"] if name == "imagefolder" else []
    cfg = load_config(overrides=[f"data.name={name}", f"model.arch={arch}", *extra])
    assert set(cfg.auto_keys()) == {"data.augment.crop_pad", "data.augment.flip", "data.augment.autoaugment",
                                    "data.augment.cutout", "model.lam_init", "train.lr"}
    r = cfg.resolved(size)
    got = {**r.data.augment.model_dump(), "lam_init": r.model.lam_init}
    assert got == expected
    assert r.train.lr == (0.05 if name == "cifar100" else 0.1)  # the paper's settings, now explicit
    assert r.auto_keys() == [] and r.resolved(size) == r


def test_explicit_values_survive_resolution():
    cfg = load_config(overrides=["data.augment.flip=true", "model.lam_init=3.0", "data.augment.crop_pad=0"])
    r = cfg.resolved(8)
    assert r.data.augment.flip is True and r.model.lam_init == 3.0 and r.data.augment.crop_pad == 0
    assert r.data.augment.cutout == 0  # still resolved


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "config error: train.lr = inf"),
    ("noise.delta=.nan", "config error: noise.delta = nan"),
    ("model.grad=autograd", "config error: model.grad = 'autograd' (expected one of: nq, qcfs_iclr)"),
    ("eval.select_T=5", "config error: eval.select_T = 5 (expected one of eval.T"),
])
def test_more_bad_values(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(message), str(info.value)
