"""Training methods: pure torch/timm models and losses, found through a registry.

Importing this package registers every method; ``launcher/`` builds them by name.
"""

from . import autoencoders, classifier, mae, pcae  # noqa: F401  (registers the methods)
from .registry import (
    MethodConfig,
    UnknownMethodError,
    build_method,
    get_method,
    method_names,
    register_method,
)

__all__ = [
    "MethodConfig",
    "UnknownMethodError",
    "build_method",
    "get_method",
    "method_names",
    "register_method",
]
