"""Model constructors behind one registry: ``lipnet.models.create(name, **kwargs)``."""

from lipnet.models import small as small  # registers small_cnn
from lipnet.models.registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model"]
