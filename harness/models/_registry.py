"""Model registry. `create_model(arch, ...)` is the public entry point; every model
is also registered with timm as `nq_<arch>` so `timm.create_model('nq_resnet20')` works,
and `timm.data.resolve_data_config(model=...)` returns the model's own input settings
(`pretrained_cfg`: 32x32 CIFAR input and statistics; no weights are published).

`create_model('timm/<name>', ...)` builds a stock timm model prepared for conversion
(see `timm_port.from_timm`)."""
from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable

from torch import nn

from ..neurons import NQ

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, dict[str, Any]] = {}
TIMM_PREFIX = "timm/"

# per-channel statistics of the training images in [0, 1] units (what harness.data
# computes for these datasets); 3-channel input only
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def register(name: str, *, first_conv: str, classifier: str, input_hw: tuple[int, int] = (32, 32)):
    """Register a model builder `fn(num_classes, in_chans, act_layer, **kw)` as `name`
    (and with timm as `nq_<name>`). `first_conv`, `classifier`: module names that
    timm's pretrained_cfg records; `input_hw`: the input size the model is built for."""
    def deco(fn):
        _MODELS[name] = fn
        _INFO[name] = dict(first_conv=first_conv, classifier=classifier, input_hw=tuple(input_hw))
        _register_timm(name, fn)
        return fn
    return deco


def pretrained_cfg(arch: str, num_classes: int = 10, in_chans: int = 3) -> dict[str, Any]:
    """timm pretrained_cfg of a built-in model: its input size, CIFAR-10 (CIFAR-100 when
    num_classes == 100) mean and std for 3-channel input (0.5 / 0.5 otherwise), no weights."""
    info = _INFO[arch]
    if in_chans == 3:
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    else:
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    return dict(url="", hf_hub_id=None, architecture=f"nq_{arch}", tag=None, custom_load=False,
                input_size=(in_chans, *info["input_hw"]), fixed_input_size=False, interpolation="bilinear",
                crop_pct=1.0, crop_mode="center", mean=tuple(mean), std=tuple(std), num_classes=num_classes,
                pool_size=None, first_conv=info["first_conv"], classifier=info["classifier"],
                license="same as nq-snn-harness", description="NQ/QCFS network for ANN->SNN conversion "
                "(harness); no pretrained weights")


def _register_timm(name: str, fn) -> None:
    try:
        from timm.models import register_model
    except Exception:  # timm is optional for the core
        return

    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"nq_{name}: no pretrained weights are published")
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        for k in ("pretrained_cfg", "cache_dir"):
            kwargs.pop(k, None)
        model = create_model(name, **kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, **overlay}
        model.default_cfg = model.pretrained_cfg
        return model

    entry.__name__ = f"nq_{name}"
    entry.__qualname__ = entry.__name__
    entry.__module__ = fn.__module__
    # timm reads the default pretrained cfg from the module's `default_cfgs`
    mod = sys.modules[fn.__module__]
    if not isinstance(getattr(mod, "default_cfgs", None), dict):
        mod.default_cfgs = {}
    cfg = pretrained_cfg(name, 10, 3)  # create_model's defaults
    mod.default_cfgs[entry.__name__] = {k: v for k, v in cfg.items() if k not in ("architecture", "tag")}
    register_model(entry)


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(arch: str, num_classes: int = 10, L: int = 4, lam_init: float = 8.0,
                 in_chans: int = 3, grad: str = "nq", act_layer: Callable[[], nn.Module] | None = None,
                 cifar_stem: bool = False, **kwargs) -> nn.Module:
    """Build a CIFAR-style network whose activations are NQ (QCFS when delta = 0).

    Every activation is `act_layer()`; by default `partial(NQ, L=L, lam_init=lam_init,
    grad=grad)`. Pass your own `act_layer` to use another activation module.

    `arch = 'timm/<name>'` builds timm's `<name>` and prepares it for conversion
    (`harness.models.from_timm`; `cifar_stem` adapts it to 32x32 input). The built-in
    models are CIFAR networks already: `cifar_stem` changes nothing for them."""
    if arch.startswith(TIMM_PREFIX):
        from .timm_port import from_timm
        return from_timm(arch[len(TIMM_PREFIX):], num_classes=num_classes, L=L, lam_init=lam_init,
                         in_chans=in_chans, grad=grad, act_layer=act_layer, cifar_stem=cifar_stem, **kwargs)
    try:
        fn = _MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r} (expected one of: {', '.join(list_models())}, "
                         f"or {TIMM_PREFIX}<a timm model name>)") from None
    if act_layer is None:
        act_layer = partial(NQ, L=L, lam_init=lam_init, grad=grad)
    model = fn(num_classes=num_classes, in_chans=in_chans, act_layer=act_layer, **kwargs)
    model.pretrained_cfg = pretrained_cfg(arch, num_classes, in_chans)
    if isinstance(getattr(model, "_classifier_name", None), str):
        model.pretrained_cfg["classifier"] = model._classifier_name
    model.default_cfg = model.pretrained_cfg
    return model


class TimmMethodsMixin:
    """timm's model API for the built-in models: `num_classes`, `num_features`,
    `get_classifier`, `reset_classifier`, `forward_features`, `forward_head`.
    A subclass defines `forward_features`, `_pre_logits(x)` and the `_classifier_name`
    attribute path of its last Linear layer."""

    _classifier_name: str

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool = {global_pool!r} (expected 'avg': max-pooling does not convert)")
        old = self.get_classifier()
        in_features = old.in_features if isinstance(old, nn.Linear) else self._classifier_in
        self._classifier_in = in_features
        new = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        parent, _, leaf = self._classifier_name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)
        self.num_classes = num_classes
        cfg = getattr(self, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            self.pretrained_cfg = {**cfg, "num_classes": num_classes}
            self.default_cfg = self.pretrained_cfg

    def forward_head(self, x, pre_logits: bool = False):
        x = self._pre_logits(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
