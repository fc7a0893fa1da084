"""A registry of training methods, keyed by name.

A method is an ``nn.Module`` that keeps the contract of ``protocol.py`` (``forward(batch)``
returns a dict with a scalar ``"loss"``; optional hooks); it is registered together with the
typed config dataclass that builds it::

    @register_method("mae", config=MAEConfig)
    class MAE(nn.Module):
        def __init__(self, cfg: MAEConfig): ...

One config class may serve several names (the six autoencoder procedures share one): the
registry binds the name, so ``get_method(name).make_config(...)`` is that method's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from .protocol import PretrainingMethod


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their own and validate in ``__post_init__``."""

    name: str  # the registered name; see MethodEntry.make_config
    img_size: int = 224
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if self.in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {self.in_chans}")

    @classmethod
    def tiny(cls, **fields: Any) -> MethodConfig:
        """The smallest flavour of this method, for CPU tests and smoke runs."""
        raise NotImplementedError(f"{cls.__name__} has no tiny flavour")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type[nn.Module]
    config: type[MethodConfig]

    def make_config(self, **fields: Any) -> MethodConfig:
        """This method's config: the class defaults, ``fields``, and the registered name."""
        return self.config(**{**fields, "name": self.name})

    def tiny(self) -> MethodConfig:
        """This method's tiny flavour (``MethodConfig.tiny``) under the registered name."""
        return self.config.tiny(name=self.name)


class UnknownMethodError(ValueError):
    """Raised for a method name that is not registered."""


_METHODS: dict[str, MethodEntry] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_method(name: str, *, config: type[MethodConfig]) -> Callable[[M], M]:
    """Class decorator: make ``cls`` buildable as ``name`` from a ``config`` instance."""

    def decorator(cls: M) -> M:
        if name in _METHODS:
            raise ValueError(
                f"method {name!r} is registered twice ({_METHODS[name].cls.__qualname__} and "
                f"{cls.__qualname__}); known methods: {', '.join(method_names())}"
            )
        _METHODS[name] = MethodEntry(name, cls, config)
        return cls

    return decorator


def method_names() -> list[str]:
    return sorted(_METHODS)


def pretraining_methods() -> list[str]:
    """Methods that pretrain an encoder to probe and export (``protocol.PretrainingMethod``): a study's choices."""
    return [name for name in method_names() if issubclass(_METHODS[name].cls, PretrainingMethod)]


def get_method(name: str) -> MethodEntry:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def build_method(cfg: MethodConfig) -> nn.Module:
    """Instantiate the method named by ``cfg.name`` from its config."""
    entry = get_method(cfg.name)
    if not isinstance(cfg, entry.config):
        raise TypeError(f"method {cfg.name!r} takes a {entry.config.__name__}, got {type(cfg).__name__}")
    return entry.cls(cfg)
