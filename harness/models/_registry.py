"""Model registry. `create_model(arch, ...)` is the public entry point; every model
is also registered with timm as `nq_<arch>` so `timm.create_model('nq_resnet20')` works."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from ..neurons import NQ

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _MODELS[name] = fn
        _register_timm(name, fn)
        return fn
    return deco


def _register_timm(name: str, fn) -> None:
    try:
        from timm.models import register_model
    except Exception:  # timm is optional for the core
        return

    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"nq_{name}: no pretrained weights are published")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        return create_model(name, **kwargs)

    entry.__name__ = f"nq_{name}"
    entry.__qualname__ = entry.__name__
    entry.__module__ = fn.__module__
    register_model(entry)


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(arch: str, num_classes: int = 10, L: int = 4, lam_init: float = 8.0,
                 in_chans: int = 3, grad: str = "nq", act_layer: Callable[[], nn.Module] | None = None,
                 **kwargs) -> nn.Module:
    """Build a CIFAR-style network whose activations are NQ (QCFS when delta = 0).

    Every activation is `act_layer()`; by default `partial(NQ, L=L, lam_init=lam_init,
    grad=grad)`. Pass your own `act_layer` to use another activation module."""
    try:
        fn = _MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r} (expected one of: {', '.join(list_models())})") from None
    if act_layer is None:
        act_layer = partial(NQ, L=L, lam_init=lam_init, grad=grad)
    return fn(num_classes=num_classes, in_chans=in_chans, act_layer=act_layer, **kwargs)
