from ._registry import create_model, list_models, register
from . import cnn, resnet, vgg  # noqa: F401  (registers the models)

__all__ = ["create_model", "list_models", "register"]
