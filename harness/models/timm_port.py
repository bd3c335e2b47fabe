"""Any timm CNN, prepared for ANN -> SNN conversion.

    model = from_timm("resnet18", num_classes=10, L=4, lam_init=8.0, in_chans=3, cifar_stem=True)
    # or: create_model("timm/resnet18", ...), or model.arch: timm/resnet18 in a config

What changes, in this order (each change is listed in `model.harness_adaptations`,
which `train.finish` copies into result.json as `model_adaptations`):

  1. `cifar_stem=True` adapts the network to 32x32 input:
       - the stem's first conv (timm's `pretrained_cfg['first_conv']`) becomes a 3x3 conv
         with stride 1 and padding 1 (ResNets: 7x7 / stride 2);
       - the stem's max-pool (`model.maxpool`, timm's ResNet family) is removed;
       - timm's VGG head (`pre_logits`, a 7x7 ConvMlp that upsamples the 1x1 map of a
         32x32 input to 7x7 first) becomes a 1x1 ConvMlp on the 1x1 map.
     Any other downsampling in a stem is kept (and said so in the adaptation record).
  2. every `nn.ReLU` becomes `act_layer()` (NQ/QCFS by default);
  3. every `nn.MaxPool2d` becomes `nn.AvgPool2d` with the same kernel, stride, padding
     and ceil_mode (count_include_pad=True, so border windows divide by the full kernel
     area: a uniform scale, which NIR export folds into the next layer). Max-pooling of
     spike trains is not max-pooling of rates; average pooling converts exactly, but it
     is a different ANN: each replacement is logged as a warning.
     `nn.AdaptiveMaxPool2d` becomes `nn.AdaptiveAvgPool2d` likewise.

Nothing else is touched. Ops without a faithful IF counterpart (SiLU, GELU, attention,
functional activations) are left in place; `to_snn` refuses them with the module path.

The model's `pretrained_cfg` gets `num_classes` and, with `cifar_stem`, a 32x32 input
with CIFAR statistics, so `timm.data.resolve_data_config(model=m)` describes the input
the model was adapted to.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable

from torch import nn

from ..neurons import NQ
from ._registry import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

__all__ = ["from_timm", "TimmAdaptationWarning"]

class TimmAdaptationWarning(UserWarning):
    """A change to a timm model that changes the ANN (e.g. max-pooling -> average pooling)."""


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _describe(m: nn.Module) -> str:
    return f"{type(m).__name__}({m.extra_repr()})"


def _warn(msg: str) -> None:
    warnings.warn(msg, TimmAdaptationWarning, stacklevel=3)


def _cifar_stem(model: nn.Module, name: str, in_chans: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) else first
    try:
        conv = model.get_submodule(first) if first else None
    except AttributeError:
        conv = None
    if conv is None:
        conv_name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        conv = model.get_submodule(conv_name) if conv_name else None
        first = conv_name
    if isinstance(conv, nn.Conv2d):
        if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (1, 1):
            new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None,
                            groups=conv.groups)
            _set(model, first, new)
            out.append(dict(module=first, change="cifar_stem", before=_describe(conv), after=_describe(new),
                            changes_ann=True))
    pool = getattr(model, "maxpool", None)
    if isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        model.maxpool = nn.Identity()
        out.append(dict(module="maxpool", change="cifar_stem", before=_describe(pool), after="Identity()",
                        changes_ann=True))
    head = getattr(model, "pre_logits", None)
    if head is not None and hasattr(head, "input_kernel_size") and isinstance(getattr(head, "fc1", None), nn.Conv2d):
        fc1 = head.fc1
        if fc1.kernel_size != (1, 1):
            new = nn.Conv2d(fc1.in_channels, fc1.out_channels, 1, bias=fc1.bias is not None)
            head.fc1 = new
            head.input_kernel_size = 1
            out.append(dict(module="pre_logits.fc1", change="cifar_stem", before=_describe(fc1),
                            after=_describe(new), changes_ann=True,
                            note="a 32x32 input leaves a 1x1 map; timm's head would upsample it to 7x7"))
    strided = [n for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and n.split(".")[0] in ("stem", "conv1") and n != first
               and tuple(m.stride) != (1, 1)]
    if strided:
        out.append(dict(module=",".join(strided), change="cifar_stem", before="strided stem conv",
                        after="kept", changes_ann=False,
                        note="cifar_stem only changes the first conv and the stem max-pool"))
    if not out:
        out.append(dict(module=first or "", change="cifar_stem", before="3x3 stride-1 stem", after="unchanged",
                        changes_ann=False))
    return out


def from_timm(name: str, num_classes: int = 10, L: int = 4, lam_init: float = 8.0, in_chans: int = 3,
              grad: str = "nq", cifar_stem: bool = False, act_layer: Callable[[], nn.Module] | None = None,
              pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's `name` with every ReLU an NQ/QCFS activation and max-pooling replaced by
    average pooling (module docstring). `kwargs` go to `timm.create_model`."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (expected a name from timm.list_models())")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if act_layer is None:
        act_layer = partial(NQ, L=L, lam_init=lam_init, grad=grad)
    adaptations: list[dict[str, Any]] = []
    if cifar_stem:
        adaptations += _cifar_stem(model, name, in_chans)
    relus = [n for n, m in model.named_modules() if type(m) is nn.ReLU]
    for n in relus:
        _set(model, n, act_layer())
    if relus:
        adaptations.append(dict(module=",".join(relus), change="activation", before="ReLU",
                                after=type(act_layer()).__name__, changes_ann=True, count=len(relus)))
    for n, m in list(model.named_modules()):
        if isinstance(m, nn.MaxPool2d):
            new = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, count_include_pad=True)
            if m.dilation not in (1, (1, 1)):
                raise ValueError(f"timm/{name}: '{n}' is a dilated max-pool, which has no average-pool equivalent")
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            new = nn.AdaptiveAvgPool2d(m.output_size)
        else:
            continue
        _set(model, n, new)
        msg = (f"timm/{name}: max-pooling '{n}' ({_describe(m)}) replaced by {_describe(new)}; "
               "this changes the ANN (max-pooling has no IF counterpart)")
        _warn(msg)
        adaptations.append(dict(module=n, change="max_pool_to_avg_pool", before=_describe(m), after=_describe(new),
                                changes_ann=True, warning=msg))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(num_classes=num_classes, architecture=name, source="timm", harness_arch=f"timm/{name}")
    if cifar_stem:
        mean, std = ((CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)) \
            if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        cfg.update(input_size=(in_chans, 32, 32), test_input_size=None, crop_pct=1.0, test_crop_pct=None,
                   interpolation="bilinear", mean=tuple(mean), std=tuple(std), pool_size=None)
        cfg = {k: v for k, v in cfg.items() if v is not None}
    else:
        size = cfg.get("input_size", (3, 224, 224))
        cfg["input_size"] = (in_chans, *tuple(size)[1:])
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    model.harness_adaptations = adaptations
    return model
