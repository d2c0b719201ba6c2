"""Model constructors behind one registry: ``lipnet.models.create(name, **kwargs)``."""

from lipnet.models import fmnist as fmnist  # registers fmnist_convnet_s, fmnist_convnet_m
from lipnet.models import lipconvnet as lipconvnet  # registers lipconvnet_{xs,s,m,l}
from lipnet.models import liresnet as liresnet  # registers liresnet
from lipnet.models import sll as sll  # registers sll_{small,medium,large,xlarge}
from lipnet.models import small as small  # registers small_cnn
from lipnet.models import vgg as vgg  # registers bethune_vgg
from lipnet.models.registry import (
    ModelDefaults,
    create,
    default_cfg,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
)

__all__ = [
    "ModelDefaults",
    "create",
    "default_cfg",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]
