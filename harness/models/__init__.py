from ._registry import TIMM_PREFIX, create_model, list_models, pretrained_cfg, register
from . import cnn, resnet, vgg  # noqa: F401  (registers the models)
from .timm_port import TimmAdaptationWarning, from_timm

__all__ = ["create_model", "list_models", "register", "from_timm", "pretrained_cfg", "TIMM_PREFIX",
           "TimmAdaptationWarning"]
